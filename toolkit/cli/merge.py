"""``dtk merge``: join the metadata of shard jobs."""

from __future__ import annotations

import pathlib

import click

from toolkit.errors import DtkError


@click.command("merge")
@click.argument("out", type=click.Path(path_type=pathlib.Path, file_okay=False, exists=True))
def merge_command(out: pathlib.Path) -> None:
    """Join the metadata of shard jobs into OUT/metadata.csv and OUT/rejected.csv.

    Each `dtk generate --shard K/N` job (or torchrun rank) logs its finished samples in
    OUT/.dtk/parts/; the last job to finish merges them, and `dtk merge` does it again by
    hand, after jobs ran on machines that did not all finish, say. Merging never drops a
    sample that metadata.csv already lists: a folder copied without its hidden .dtk/
    folder, or with a damaged part log, is refused with the file and line at fault.

    \b
    Examples:
      dtk generate -n 1000 --shard 0/2 --out big &
      dtk generate -n 1000 --shard 1/2 --out big
      dtk merge big
    """
    from toolkit.data.output import OutputFolder

    folder = OutputFolder(out)
    run = folder.read_run()
    if run is None:
        raise DtkError(f"{out} is not a dtk output folder (no run.json)")
    merged = folder.merge()
    missing = run.get("n", 0) - merged.samples
    click.echo(f"{merged.images} images in {out}", err=True)
    if missing > 0:
        click.echo(f"{missing} samples not generated yet (rerun the missing shards)", err=True)
