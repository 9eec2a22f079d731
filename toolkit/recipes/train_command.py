"""``dtk train``: a class-conditional diffusion model from a dataset folder.

Registered in `toolkit.cli.group`. Keep imports light: the work (and every check of the settings,
shared with Python callers) happens in `toolkit.recipes.training`.
"""

from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING, Any

import click

from toolkit.errors import DtkError

if TYPE_CHECKING:
    from toolkit.recipes.training import TrainConfig


@click.command("train")
@click.argument("data", type=click.Path(path_type=pathlib.Path))
@click.option(
    "--attribute",
    "attributes",
    multiple=True,
    required=True,
    help="A metadata column to condition on; repeatable (e.g. --attribute digit "
    "--attribute group).",
)
@click.option(
    "--out",
    type=click.Path(path_type=pathlib.Path),
    required=True,
    help="The model folder to write (a checkpoint goes beside it: OUT.checkpoint).",
)
@click.option("--steps", type=int, default=None, help="Optimizer steps [default: 2000].")
@click.option("--max-minutes", type=float, default=None, help="Stop after this wall time.")
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--lr", type=float, default=2e-3, show_default=True, help="AdamW peak rate.")
@click.option(
    "--ema-decay",
    type=float,
    default=0.999,
    show_default=True,
    help="Decay of the weights' moving average (the saved weights), in [0, 1).",
)
@click.option(
    "--p-drop",
    type=float,
    default=0.15,
    show_default=True,
    help="Chance of dropping each attribute to 'unspecified' (classifier-free training), "
    "in [0, 1).",
)
@click.option(
    "--beta-schedule",
    type=click.Choice(["linear", "scaled_linear", "squaredcos_cap_v2"]),
    default="linear",
    show_default=True,
)
@click.option(
    "--size",
    type=int,
    default=16,
    show_default=True,
    help="Image side in pixels: a multiple of 4 (the UNet halves it twice).",
)
@click.option(
    "--channels",
    default="32,64,64",
    show_default=True,
    help="UNet block widths (three resolutions, attention at the lowest), each a multiple of 8.",
)
@click.option(
    "--checkpoint-every",
    type=int,
    default=500,
    show_default=True,
    help="Steps between checkpoints (0: only at the end).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from OUT.checkpoint.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def train_command(**kw: Any) -> None:
    """Train a class-conditional diffusion model on a dataset folder.

    DATA is a folder with metadata.csv (file_name and attribute columns), such as
    `dtk data colored-digits` writes. The result is a model folder that `dtk generate`
    loads, with toolkit.json naming the attributes; each attribute can be left
    unspecified at sampling time.

    \b
    Examples:
      dtk data colored-digits digits-train
      dtk train digits-train --attribute digit --attribute group --out my-model
      dtk train digits-train --attribute digit --out m --max-minutes 5
      dtk train digits-train --attribute digit --out m --steps 4000 --resume
    """
    from toolkit.recipes.training import train

    out = train(_config(kw), resume=kw["resume"], progress=not kw["quiet"])
    click.echo(f"model written to {out}", err=True)


def _config(kw: dict[str, Any]) -> TrainConfig:
    """The command line as a `TrainConfig` (which `train` checks, for Python callers too):
    --channels parsed, and the default step budget applied when no budget is given."""
    from toolkit.recipes.training import TrainConfig

    try:
        channels = tuple(int(c) for c in kw["channels"].split(","))
    except ValueError:
        raise DtkError(
            f"--channels must be comma-separated integers, got {kw['channels']!r}"
        ) from None
    steps = kw["steps"]
    if steps is None and kw["max_minutes"] is None:
        steps = 2000
    return TrainConfig(
        data=str(kw["data"]),
        attributes=list(kw["attributes"]),
        out=str(kw["out"]),
        steps=steps,
        max_minutes=kw["max_minutes"],
        batch_size=kw["batch_size"],
        lr=kw["lr"],
        ema_decay=kw["ema_decay"],
        p_drop=kw["p_drop"],
        seed=kw["seed"],
        size=kw["size"],
        block_out_channels=channels,
        beta_schedule=kw["beta_schedule"],
        checkpoint_every=kw["checkpoint_every"],
    )
