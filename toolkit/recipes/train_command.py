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
    help="A metadata column to condition on; repeatable (e.g. --attribute digit "
    "--attribute group). Trains a class-conditional UNet.",
)
@click.option(
    "--caption",
    default=None,
    help="The metadata column holding each image's caption (e.g. text). Trains a "
    "text-to-image Stable Diffusion 3 pipeline instead of a label-conditioned UNet.",
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
    help="Chance of dropping each attribute to 'unspecified', or the caption to the empty "
    "prompt (classifier-free training), in [0, 1).",
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
@click.option(
    "--vae-steps",
    type=int,
    default=3000,
    show_default=True,
    help="With --caption: autoencoder steps, run before the --steps of the flow model.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from OUT.checkpoint.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def train_command(**kw: Any) -> None:
    """Train a diffusion model on a dataset folder: label-conditioned or text-to-image.

    DATA is a folder with metadata.csv (file_name and attribute or caption columns), such
    as `dtk data colored-digits` writes. The result is a model folder that `dtk generate`
    loads.

    With --attribute: a class-conditional UNet (a DDPMPipeline folder), with toolkit.json
    naming the attributes; each attribute can be left unspecified at sampling time.

    With --caption: a text-to-image Stable Diffusion 3 pipeline folder (MMDiT trained by
    rectified flow, two small CLIP text encoders trained with it, a tokenizer made from
    the captions' words, an autoencoder trained first), which diffusers'
    StableDiffusion3Pipeline loads too. Captions are dropped to the empty prompt with
    chance --p-drop, for classifier-free guidance. --channels and --beta-schedule are the
    UNet's and do not apply.

    \b
    Examples:
      dtk data colored-digits digits-train
      dtk train digits-train --attribute digit --attribute group --out my-model
      dtk train digits-train --attribute digit --out m --max-minutes 5
      dtk train digits-train --attribute digit --out m --steps 4000 --resume
      dtk data colored-digits text-train --captions
      dtk train text-train --caption text --out my-text-model --lr 1e-3 --p-drop 0.1
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
        caption=kw["caption"],
        vae_steps=kw["vae_steps"],
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
