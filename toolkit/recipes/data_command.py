"""``dtk data``: write ready-made datasets in the dataset-folder format.

Registered by `toolkit.recipes.commands`. Keep imports light: the work happens in
`toolkit.recipes.colored_digits`.
"""

from __future__ import annotations

import pathlib

import click

from toolkit.errors import DtkError


@click.group("data")
def data_group() -> None:
    """Write ready-made datasets as dataset folders (images + metadata.csv)."""


@data_group.command("colored-digits")
@click.argument("out", type=click.Path(path_type=pathlib.Path))
@click.option(
    "--split",
    type=click.Choice(["train", "test", "train-balanced"]),
    default="train",
    show_default=True,
    help="train: each training shape once, the minority group rare; test: held-out shapes "
    "in both groups; train-balanced: training shapes in both groups.",
)
@click.option(
    "--minority-share",
    type=float,
    default=0.05,
    show_default=True,
    help="Share of the train split drawn in the minority group 'dark' (0 to 0.5).",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Picks the minority shapes and the paper grain (the held-out shapes never change).",
)
@click.option(
    "--captions",
    is_flag=True,
    help="Add a 'text' column: one caption per image that always names the digit and names "
    "the group in half the captions ('a handwritten seven', 'a seven on dark paper'), for "
    "training a text-to-image model (dtk train --caption text).",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def colored_digits_command(
    ctx: click.Context,
    out: pathlib.Path,
    split: str,
    minority_share: float,
    seed: int,
    captions: bool,
    quiet: bool,
) -> None:
    """scikit-learn's digits at 16x16 in two groups: 'light' (thin navy strokes on smooth
    cream paper) and 'dark' (thick amber strokes on grainy dark-teal paper).

    Writes OUT/<digit>_<group>/<source>.png, OUT/metadata.csv (file_name, digit, group,
    split, source_index) and OUT/dataset.json (how it was made). A quarter of each digit's
    shapes (43) is held out for the test split, the same for every seed. The same command
    always writes the same bytes; rerunning it redoes the folder in place.

    \b
    Examples:
      dtk data colored-digits data/train
      dtk data colored-digits data/train-1pc --minority-share 0.01 --seed 1
      dtk data colored-digits data/test --split test
      dtk data colored-digits data/train-balanced --split train-balanced
      dtk data colored-digits data/train-text --captions
    """
    from toolkit.recipes.colored_digits import write

    if out.exists() and not out.is_dir():
        raise DtkError(f"OUT {out} exists and is not a folder")
    source = ctx.get_parameter_source("minority_share")
    if split != "train" and source == click.core.ParameterSource.COMMANDLINE:
        raise DtkError(f"--minority-share applies to --split train only, not {split}")
    metadata = write(out, split, minority_share, seed, captions=captions, progress=not quiet)
    counts = metadata["group"].value_counts()
    summary = ", ".join(f"{counts.get(g, 0)} {g}" for g in ("light", "dark"))
    click.echo(f"{len(metadata)} images ({summary}) in {out}", err=True)
