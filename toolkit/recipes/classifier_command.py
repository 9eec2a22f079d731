"""``dtk train-classifier``: a small CNN or MLP attribute classifier from a dataset folder.

Registered by `toolkit.recipes.commands`. Keep imports light: the work happens in
`toolkit.recipes.classifier`.
"""

from __future__ import annotations

import pathlib
import shlex
from typing import Any

import click


@click.command("train-classifier")
@click.argument("data", type=click.Path(path_type=pathlib.Path))
@click.option("--attribute", required=True, help="The metadata.csv column to predict.")
@click.option(
    "--out",
    type=click.Path(path_type=pathlib.Path),
    required=True,
    help="Folder for model.safetensors and config.json.",
)
@click.option("--epochs", type=int, default=20, show_default=True)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Weights, batches, augmentation."
)
@click.option(
    "--augment",
    default="shift",
    show_default=True,
    metavar="A,B",
    help="Augmentations: shift (1 pixel), recolor (random global color transforms: the "
    "classifier cannot use the palette), blur (random Gaussian blur).",
)
@click.option(
    "--eval",
    "eval_data",
    type=click.Path(path_type=pathlib.Path),
    help="A dataset folder to measure the accuracy on (recorded in config.json).",
)
@click.option(
    "--eval-by",
    multiple=True,
    metavar="COLUMN",
    help="Also record the --eval accuracy per value of this column. Repeatable.",
)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--lr", type=float, default=3e-3, show_default=True, help="Peak learning rate.")
@click.option("--image-size", type=int, default=16, show_default=True, help="Input size.")
@click.option(
    "--architecture",
    type=click.Choice(["cnn", "mlp"]),
    default="cnn",
    show_default=True,
    help="cnn: three convolutions (the cnn classifier plugin serves it); mlp: fully "
    "connected layers on the pixels (the mlp plugin), a family that errs differently: "
    "the kind of judge to audit what a cnn filtered.",
)
@click.option(
    "--hidden",
    default="512,128",
    show_default=True,
    metavar="W,W",
    help="With --architecture mlp: the hidden layers' widths.",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def train_classifier_command(**kw: Any) -> None:
    """Train a small classifier to predict one attribute of the images in dataset folder DATA.

    DATA holds images and a metadata.csv with a file_name column and the --attribute
    column (as `dtk data` and `dtk generate` write). The folder --out gets
    model.safetensors and config.json (labels, architecture, the training command and
    seed, the --eval accuracy); the `cnn` (or, for --architecture mlp, the `mlp`)
    attribute classifier serves it with path=OUT.

    \b
    Examples:
      dtk data colored-digits data/train-balanced --split train-balanced
      dtk data colored-digits data/test --split test
      dtk train-classifier data/train-balanced --attribute digit --out clf/digit \\
          --eval data/test --eval-by group
      dtk train-classifier data/train-balanced --attribute group --out clf/group \\
          --augment shift,recolor,blur --epochs 10
      dtk train-classifier data/train-balanced --attribute digit --out judge/digit \
          --architecture mlp --augment shift,blur --epochs 150 --seed 1
    """
    from toolkit.errors import DtkError
    from toolkit.recipes.classifier import train_classifier

    augment = [a.strip() for a in kw["augment"].split(",") if a.strip()]
    try:
        hidden = [int(w) for w in kw["hidden"].split(",")]
    except ValueError:
        raise DtkError(f"--hidden takes widths like 512,128, got {kw['hidden']!r}") from None
    config = train_classifier(
        kw["data"],
        kw["attribute"],
        kw["out"],
        epochs=kw["epochs"],
        seed=kw["seed"],
        augment=augment,
        batch_size=kw["batch_size"],
        lr=kw["lr"],
        image_size=kw["image_size"],
        architecture=kw["architecture"],
        hidden=hidden,
        eval_data=kw["eval_data"],
        eval_by=kw["eval_by"],
        command=_command(kw, augment, hidden),
        progress=not kw["quiet"],
    )
    message = f"{kw['attribute']} classifier ({len(config['labels'])} labels) in {kw['out']}"
    if config["eval"] is not None:
        message += f"; accuracy {config['eval']['accuracy']:.4f} on {kw['eval_data']}"
    click.echo(message, err=True)


def _command(kw: dict[str, Any], augment: list[str], hidden: list[int]) -> str:
    """The command with every option spelled out, to record in config.json."""
    args = ["dtk", "train-classifier", str(kw["data"]), "--attribute", kw["attribute"]]
    args += ["--out", str(kw["out"]), "--epochs", str(kw["epochs"]), "--seed", str(kw["seed"])]
    args += ["--augment", ",".join(augment), "--batch-size", str(kw["batch_size"])]
    args += ["--lr", str(kw["lr"]), "--image-size", str(kw["image_size"])]
    if kw["architecture"] != "cnn":
        args += ["--architecture", kw["architecture"], "--hidden", ",".join(map(str, hidden))]
    if kw["eval_data"] is not None:
        args += ["--eval", str(kw["eval_data"])]
    for column in kw["eval_by"]:
        args += ["--eval-by", column]
    return shlex.join(args)
