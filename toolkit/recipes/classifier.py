"""Small attribute classifiers: training (`dtk train-classifier`), saving and loading.

Two families: ``small-cnn`` (convolutions; the shipped classifiers the synthesis filters
use) and ``small-mlp`` (fully connected layers on the pixels; the shipped judges that
audit what the CNNs filtered: a different family makes different mistakes).

A classifier folder holds ``model.safetensors`` and ``config.json``::

    {"format": "dtk-attribute-classifier", "attribute": "digit", "labels": ["0", ..., "9"],
     "architecture": {"name": "small-cnn", "in_channels": 3, "image_size": 16, ...},
     "training": {"command": "dtk train-classifier ...", "seed": 0, ...},
     "eval": {"data": "...", "accuracy": 0.99, ...} or null}

The built-in ``cnn`` and ``mlp`` attribute-classifier plugins serve such folders (the
shipped ones by default). Images are float ``[B, C, H, W]`` in [0, 1]; other sizes are resized.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from toolkit.checks import check_fraction, check_positive, check_seed
from toolkit.errors import DtkError
from toolkit.lazy import lazy_import

if TYPE_CHECKING:
    import torch

    from toolkit.data.dataset_folder import ImageDataset
else:
    torch = lazy_import("torch")

FORMAT = "dtk-attribute-classifier"
ARCHITECTURE = "small-cnn"
#: the other family: fully connected, no notion of neighbouring pixels
MLP_ARCHITECTURE = "small-mlp"
#: `train_classifier`'s ``architecture`` names -> the names config.json records
ARCHITECTURES = {"cnn": ARCHITECTURE, "mlp": MLP_ARCHITECTURE}
CONFIG = "config.json"
WEIGHTS = "model.safetensors"


def build_network(architecture: dict[str, Any]) -> torch.nn.Module:
    """The network config.json's ``architecture`` describes (`ARCHITECTURES`)."""
    builders = {ARCHITECTURE: _cnn, MLP_ARCHITECTURE: _mlp}
    name = architecture.get("name")
    if name not in builders:
        raise DtkError(f"unknown classifier architecture {name!r}")
    return builders[name](architecture)


def _cnn(architecture: dict[str, Any]) -> torch.nn.Module:
    """conv-conv-pool-conv-pool, then a linear layer over the flattened features."""
    from torch import nn

    c1, c2, c3 = architecture["channels"]
    size = architecture["image_size"]
    return nn.Sequential(
        nn.Conv2d(architecture["in_channels"], c1, 3, padding=1),
        nn.BatchNorm2d(c1),
        nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1),
        nn.BatchNorm2d(c2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c2, c3, 3, padding=1),
        nn.BatchNorm2d(c3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(architecture.get("dropout", 0.0)),
        nn.Linear(c3 * (size // 4) ** 2, architecture["num_labels"]),
    )


def _mlp(architecture: dict[str, Any]) -> torch.nn.Module:
    """The flattened pixels through GELU hidden layers (dropout after each), then linear."""
    from torch import nn

    width = architecture["in_channels"] * architecture["image_size"] ** 2
    layers: list[nn.Module] = [nn.Flatten()]
    for hidden in architecture["hidden"]:
        layers += [nn.Linear(width, hidden), nn.GELU(), nn.Dropout(architecture["dropout"])]
        width = hidden
    layers.append(nn.Linear(width, architecture["num_labels"]))
    return nn.Sequential(*layers)


class TrainedClassifier:
    """A loaded classifier folder: `attribute`, `labels` and `predict_proba`."""

    def __init__(self, config: dict[str, Any], network: torch.nn.Module) -> None:
        self.config = config
        self.attribute: str = config["attribute"]
        self.labels: list[str] = list(config["labels"])
        self.network = network.eval()

    @property
    def image_size(self) -> int:
        return int(self.config["architecture"]["image_size"])

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Float ``[B, C, H, W]`` in [0, 1] -> the network's channels and size."""
        import torch.nn.functional as F

        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
            raise DtkError(f"expected images as a [B, C, H, W] tensor, got {shape}")
        images = images.float()
        channels = self.config["architecture"]["in_channels"]
        if images.shape[1] == 4:
            images = images[:, :3]  # drop alpha
        if images.shape[1] == 1 and channels == 3:
            images = images.expand(-1, 3, -1, -1)
        if images.shape[1] != channels:
            raise DtkError(
                f"the {self.attribute} classifier takes {channels}-channel images, "
                f"got {images.shape[1]} channels"
            )
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(
                images,
                size=(self.image_size, self.image_size),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
        return images.clamp(0, 1)

    def predict_proba(self, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """``[B, len(labels)]`` probabilities, on the images' device."""
        images = self.prepare(images)
        network = self.network.to(images.device)
        with torch.no_grad():
            parts = [
                network(images[i : i + batch_size]).softmax(-1)
                for i in range(0, len(images), batch_size)
            ]
        if not parts:
            return torch.zeros(0, len(self.labels), device=images.device)
        return torch.cat(parts)


def load_classifier(path: str | pathlib.Path) -> TrainedClassifier:
    """The classifier saved in folder `path` by `train_classifier`."""
    from safetensors.torch import load_file

    path = pathlib.Path(path)
    config_file, weights_file = path / CONFIG, path / WEIGHTS
    if not config_file.is_file() or not weights_file.is_file():
        raise DtkError(
            f"{path} is not an attribute-classifier folder (it needs {CONFIG} and {WEIGHTS}, "
            "as written by dtk train-classifier)"
        )
    try:
        config = json.loads(config_file.read_text())
        if config.get("format") != FORMAT:
            raise ValueError(f"format is {config.get('format')!r}, not {FORMAT!r}")
        network = build_network(config["architecture"])
        network.load_state_dict(load_file(weights_file))
    except (ValueError, KeyError, TypeError, RuntimeError, OSError) as exc:
        raise DtkError(f"cannot load the classifier in {path}: {exc}") from None
    return TrainedClassifier(config, network)


# -- training ----------------------------------------------------------------------------


def shift(images: torch.Tensor, generator: torch.Generator, pixels: int = 1) -> torch.Tensor:
    """Move each image by up to `pixels` in x and y, repeating the border (no new colors)."""
    import torch.nn.functional as F

    n, _, h, w = images.shape
    padded = F.pad(images, (pixels,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * pixels + 1, (2, n), generator=generator)
    out = torch.empty_like(images)
    for dy in range(2 * pixels + 1):
        for dx in range(2 * pixels + 1):
            mask = (offsets[0] == dy) & (offsets[1] == dx)
            out[mask] = padded[mask, :, dy : dy + h, dx : dx + w]
    return out


def blur(images: torch.Tensor, generator: torch.Generator, max_sigma: float = 1.0) -> torch.Tensor:
    """A Gaussian blur of random width (0 to `max_sigma` pixels) per image."""
    import torch.nn.functional as F

    n, c, h, w = images.shape
    sigma = max_sigma * torch.rand(n, generator=generator) + 1e-3
    x = torch.arange(-2, 3, dtype=images.dtype)
    kernel = torch.exp(-(x[None] ** 2) / (2 * sigma[:, None] ** 2))
    kernel = kernel / kernel.sum(1, keepdim=True)  # [n, 5]
    kernel2d = (kernel[:, :, None] * kernel[:, None, :]).repeat_interleave(c, 0)[:, None]
    padded = F.pad(images.reshape(1, n * c, h, w), (2, 2, 2, 2), mode="replicate")
    return F.conv2d(padded, kernel2d, groups=n * c).reshape(n, c, h, w)


def recolor(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random global color transform per image: channels shuffled, then each channel's
    black and white sent to random levels (any per-channel affine map into [0, 1], inversions
    and low contrast included). Trained with it, a classifier cannot use the palette.
    """
    n, c = images.shape[:2]
    perm = torch.argsort(torch.rand(n, c, generator=generator), dim=1)
    images = images.gather(1, perm[:, :, None, None].expand_as(images))
    black, white = torch.rand(2, n, c, 1, 1, generator=generator)
    return black + (white - black) * images


#: the augmentations `train_classifier` can apply, in the order it applies them
AUGMENTATIONS = {"shift": shift, "recolor": recolor, "blur": blur}


def accuracy(
    classifier: TrainedClassifier, dataset: ImageDataset, by: Sequence[str] = ()
) -> dict[str, Any]:
    """Accuracy on `dataset`, overall and per value of its attribute and of the `by` columns."""
    labels = classifier.labels
    truth = dataset.codes(classifier.attribute, labels)
    predicted = classifier.predict_proba(dataset.images).argmax(-1)
    correct = (predicted == truth).numpy()
    result: dict[str, Any] = {
        "data": str(dataset.root),
        "images": len(dataset),
        "accuracy": round(float(correct.mean()), 4),
    }
    for column in dict.fromkeys((classifier.attribute, *by)):
        if column in dataset.metadata.columns:
            values = dataset.metadata[column].astype(str).to_numpy()
            result[f"accuracy_by_{column}"] = {
                value: round(float(correct[values == value].mean()), 4)
                for value in dataset.values(column)
            }
    return result


def train_classifier(
    data: str | pathlib.Path,
    attribute: str,
    out: str | pathlib.Path,
    *,
    epochs: int = 20,
    seed: int = 0,
    augment: Sequence[str] = ("shift",),
    batch_size: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    label_smoothing: float = 0.1,
    image_size: int = 16,
    channels: Sequence[int] = (16, 32, 48),
    architecture: str = "cnn",
    hidden: Sequence[int] = (512, 128),
    dropout: float | None = None,
    eval_data: str | pathlib.Path | None = None,
    eval_by: Sequence[str] = (),
    command: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a small classifier to predict `attribute` from the images of dataset folder
    `data`: `architecture` ``cnn`` (three convolutions `channels` wide) or ``mlp`` (hidden
    layers `hidden` wide); `dropout` before the CNN's last layer (default 0.2) or after each
    of the MLP's hidden layers (default 0.3).

    AdamW with a one-cycle learning rate and label smoothing; `augment` names the
    augmentations applied to every batch, in `AUGMENTATIONS` order (`shift`, `recolor`,
    `blur`). Saves ``model.safetensors`` and ``config.json`` atomically in `out` and
    returns the config, with the accuracy on dataset folder `eval_data` if given (overall
    and per value of the attribute and of each `eval_by` column).
    """
    from toolkit.checks import check_writable
    from toolkit.data.dataset_folder import load_image_folder

    # 1. Refuse every mistake before any image is read or file written.
    out = pathlib.Path(out)
    _check_optimizer(epochs, batch_size, lr, weight_decay, label_smoothing)
    check_seed(seed, what="--seed")
    network_kind = _checked_architecture(architecture, image_size, channels, hidden, dropout)
    augment = _checked_augment(augment)
    eval_by = _checked_columns(attribute, eval_data, eval_by)
    check_writable(out)
    labels = _labels(data, attribute, eval_data, eval_by)
    # 2. Read the images (and the evaluation images) at the network's size.
    dataset = load_image_folder(data, [attribute], size=image_size)
    evaluation = None
    if eval_data is not None:
        evaluation = load_image_folder(eval_data, [attribute, *eval_by], size=image_size)
    targets = dataset.codes(attribute, labels)
    # 3. Build the network. The seed fixes its initial weights, then batches and augmentation.
    described = network_kind | {"num_labels": len(labels)}
    torch.manual_seed(seed)  # the initial weights
    network = build_network(described)
    generator = torch.Generator().manual_seed(seed)  # batches and augmentation
    # 4. Train.
    recipe = _Recipe(epochs, batch_size, lr, weight_decay, label_smoothing, augment)
    seconds = _fit(network, dataset.images, targets, recipe, generator,
                   desc=f"training {attribute}", progress=progress)  # fmt: skip
    # 5. Record how it was made, and measure it on the evaluation images.
    config = _config(attribute, labels, described, recipe, seed=seed, data=data,
                     images=len(dataset), seconds=seconds, command=command)  # fmt: skip
    network.eval()
    if evaluation is not None:
        config["eval"] = accuracy(TrainedClassifier(config, network), evaluation, by=eval_by)
    # 6. Save the weights and config.
    _save(out, network, config)
    return config


@dataclasses.dataclass(frozen=True)
class _Recipe:
    """How `train_classifier` optimizes, checked: what `_fit` follows and config.json records."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    label_smoothing: float
    augment: list[str]  # names in `AUGMENTATIONS`, in its order


def _check_optimizer(
    epochs: int, batch_size: int, lr: float, weight_decay: float, label_smoothing: float
) -> None:
    """The optimizer's settings: counts >= 1, a finite rate > 0, fractions in range."""
    check_positive("--epochs", epochs)
    check_positive("--batch-size", batch_size)
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise DtkError(f"--lr must be a positive number, got {lr}")
    check_fraction("weight_decay", weight_decay, high=math.inf)
    check_fraction("label_smoothing", label_smoothing)


def _checked_architecture(
    architecture: str,
    image_size: int,
    channels: Sequence[int],
    hidden: Sequence[int],
    dropout: float | None,
) -> dict[str, Any]:
    """What `build_network` builds, as config.json records it (less ``num_labels``), once
    the family is known and its widths and the image size suit it."""
    if architecture not in ARCHITECTURES:
        raise DtkError(
            f"unknown --architecture {architecture!r}; choose one of: {', '.join(ARCHITECTURES)}"
        )
    whole = isinstance(image_size, int) and not isinstance(image_size, bool)
    cnn = architecture == "cnn"
    if not whole or image_size < 4 or (cnn and image_size % 4):  # the CNN pools twice
        needs = "a positive multiple of 4" if cnn else "at least 4"
        raise DtkError(f"--image-size must be {needs}, got {image_size}")
    widths, what = (list(channels), "channels") if cnn else (list(hidden), "hidden")
    if cnn and len(widths) != 3:
        raise DtkError(f"channels takes three widths (one per convolution), got {widths}")
    if not widths:
        raise DtkError("hidden takes at least one width")
    for width in widths:
        check_positive(f"each of {what}", width)
    dropout = (0.2 if cnn else 0.3) if dropout is None else dropout
    check_fraction("dropout", dropout, open_high=True)
    return {"name": ARCHITECTURES[architecture], "in_channels": 3, "image_size": image_size,
            what: widths, "dropout": dropout}  # fmt: skip


def _checked_augment(augment: str | Sequence[str]) -> list[str]:
    """The augmentation names (a list, or ``"a,b"``), put in `AUGMENTATIONS` order: the order
    they are applied in, whatever order they were given in."""
    augment = [a.strip() for a in augment.split(",")] if isinstance(augment, str) else augment
    unknown = [a for a in augment if a not in AUGMENTATIONS]
    if unknown:
        raise DtkError(
            f"unknown augmentation {unknown[0]!r}; choose from: {', '.join(AUGMENTATIONS)}"
        )
    return [a for a in AUGMENTATIONS if a in augment]


def _checked_columns(
    attribute: str, eval_data: str | pathlib.Path | None, eval_by: str | Sequence[str]
) -> list[str]:
    """The `eval_by` columns as a list, once `attribute` names a column and `eval_by` has
    an evaluation folder to break down."""
    if not isinstance(attribute, str) or not attribute:
        raise DtkError(f"--attribute must name a metadata column, got {attribute!r}")
    eval_by = [eval_by] if isinstance(eval_by, str) else list(eval_by)
    if eval_by and eval_data is None:
        raise DtkError("--eval-by needs --eval DATA: the folder whose accuracy it breaks down")
    return eval_by


def _labels(
    data: str | pathlib.Path,
    attribute: str,
    eval_data: str | pathlib.Path | None,
    eval_by: list[str],
) -> list[str]:
    """The attribute's values in `data`, naturally sorted: the classifier's labels. Read from
    the metadata alone, so a blank value, a single value or an evaluation value the
    classifier could not know is refused before any image is read."""
    from toolkit.data.dataset_folder import natural_key, read_metadata

    column = read_metadata(data, [attribute])[attribute].astype(str)
    if (column == "").any():
        raise DtkError(f"{data}: some images have no {attribute!r} value")
    labels = sorted(column.unique(), key=natural_key)
    if len(labels) < 2:
        raise DtkError(f"{data}: attribute {attribute!r} has one value only ({labels[0]})")
    if eval_data is not None:
        # every value must be one the classifier knows
        evaluated = read_metadata(eval_data, [attribute, *eval_by])[attribute].astype(str)
        unknown = sorted(set(evaluated) - set(labels), key=natural_key)
        if unknown:
            raise DtkError(f"{eval_data}: {attribute} values {unknown} are not in {labels}")
    return labels


def _fit(
    network: torch.nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    recipe: _Recipe,
    generator: torch.Generator,
    *,
    desc: str,
    progress: bool,
) -> float:
    """Train `network` in place; returns the seconds it took. `generator` draws each epoch's
    order, then every batch's augmentations in turn: the same seed, the same weights."""
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW(
        network.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay
    )
    steps_per_epoch = math.ceil(len(images) / recipe.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=recipe.lr, total_steps=recipe.epochs * steps_per_epoch
    )
    started = time.perf_counter()
    network.train()
    bar = tqdm(total=recipe.epochs * steps_per_epoch, desc=desc, unit="step", file=sys.stderr,
               disable=not progress)  # fmt: skip
    with bar:
        for _ in range(recipe.epochs):
            order = torch.randperm(len(images), generator=generator)
            for start in range(0, len(order), recipe.batch_size):
                index = order[start : start + recipe.batch_size]
                batch = _augmented(images[index], recipe.augment, generator)
                loss = _step(network, optimizer, batch, targets[index], recipe.label_smoothing)
                scheduler.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return time.perf_counter() - started


def _augmented(images: torch.Tensor, augment: list[str], generator: torch.Generator) -> Any:
    """`images` through each named augmentation, in order, drawing from `generator`."""
    for name in augment:
        images = AUGMENTATIONS[name](images, generator)
    return images


def _step(
    network: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    targets: torch.Tensor,
    label_smoothing: float,
) -> torch.Tensor:
    """One optimizer step on the label-smoothed cross-entropy; returns the loss."""
    logits = network(images)
    loss = torch.nn.functional.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def _config(
    attribute: str,
    labels: list[str],
    architecture: dict[str, Any],
    recipe: _Recipe,
    *,
    seed: int,
    data: str | pathlib.Path,
    images: int,
    seconds: float,
    command: str | None,
) -> dict[str, Any]:
    """config.json: what `load_classifier` needs, and how the weights were made (enough to
    make them again); ``eval`` is filled in once they are measured."""
    import importlib.metadata

    return {
        "format": FORMAT,
        "attribute": attribute,
        "labels": labels,
        "architecture": architecture,
        "training": {
            "command": command,
            "seed": seed,
            "data": str(data),
            "data_description": _description(pathlib.Path(data)),
            "images": images,
            "epochs": recipe.epochs,
            "batch_size": recipe.batch_size,
            "optimizer": "AdamW",
            "lr": recipe.lr,
            "lr_schedule": "one-cycle",
            "weight_decay": recipe.weight_decay,
            "label_smoothing": recipe.label_smoothing,
            "augment": recipe.augment,
            "seconds": round(seconds, 1),
            "versions": {
                dist: importlib.metadata.version(dist) for dist in ("diffusion-toolkit", "torch")
            },
        },
        "eval": None,
    }


def _save(out: pathlib.Path, network: torch.nn.Module, config: dict[str, Any]) -> None:
    """The classifier folder: weights, then config, each written atomically."""
    from safetensors.torch import save

    from toolkit.data.output import atomic_write

    state = {k: v.detach().contiguous() for k, v in network.state_dict().items()}
    try:
        atomic_write(out / WEIGHTS, save(state, metadata={"format": FORMAT}))
        atomic_write(out / CONFIG, (json.dumps(config, indent=2) + "\n").encode())
    except OSError as exc:  # a full disk, a folder check_writable could not foresee
        raise DtkError(f"cannot write {out}: {exc}") from None


def _description(data: pathlib.Path) -> Any:
    """The training data's ``dataset.json`` (how it was made), if it has one."""
    try:
        return json.loads((data / "dataset.json").read_text())
    except (OSError, ValueError):
        return None
