"""The "colored digits" dataset: scikit-learn's bundled digits drawn in two visual groups.

The shipped generator and classifiers are trained on it, and the fairness tools are tested
on it. It is also a worked example of the dataset-folder format (`toolkit.data.dataset_folder`)::

    OUT/dataset.json                   how it was made: command, split, seed, minority share
    OUT/metadata.csv                   file_name, digit, group, split, source_index
    OUT/<digit>_<group>/<source>.png   16x16 RGB images

The 1,797 shapes of `sklearn.datasets.load_digits` (8x8, no download) are upsampled to
16x16 and drawn in one of two groups that differ in palette AND in spatial structure:

* ``light``: thin navy strokes on smooth cream paper;
* ``dark``: thick amber strokes (dilated) on grainy dark-teal paper.

No global color transform (inversion, jitter, any per-pixel tone curve) maps one group onto
the other: stroke width and grain are not functions of a pixel's color.

Splits. ``TEST_PER_DIGIT`` shapes of every digit are held out, the same ones whatever the
seed (so a model trained on any training split never sees a test shape):

* ``test``: the held-out shapes, each drawn in both groups (balanced: equal counts per
  digit and group);
* ``train``: every other shape drawn once; ``round(minority_share * shapes)`` of them, spread
  over the digits as evenly as the counts allow, are drawn in the minority group ``dark``;
* ``train-balanced``: the training shapes, each drawn in both groups (what the shipped
  attribute classifiers learn from). Its images include every ``train`` image exactly.

``seed`` picks which training shapes are drawn in the minority group and the paper grain.
The same arguments always give the same bytes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
from typing import TYPE_CHECKING, Any

from toolkit.checks import check_seed
from toolkit.data.images import encode_png
from toolkit.data.output import atomic_write
from toolkit.errors import DtkError
from toolkit.lazy import lazy_import
from toolkit.recipes import captions as texts

if TYPE_CHECKING:
    import numpy as np
    import pandas
else:
    np = lazy_import("numpy")

NAME = "colored-digits"
GROUPS = ("light", "dark")
MINORITY_GROUP = "dark"
SPLITS = ("train", "test", "train-balanced")
IMAGE_SIZE = 16
#: held-out shapes per digit (the rarest digit has 174 shapes: about a quarter)
TEST_PER_DIGIT = 43
#: the held-out shapes are drawn with this seed, whatever ``seed`` is
HOLDOUT_SEED = 0
COLUMNS = ("file_name", "digit", "group", "split", "source_index")


@dataclasses.dataclass(frozen=True)
class Style:
    """How one group is drawn: RGB ink and paper in [0, 1], stroke width and paper grain."""

    ink: tuple[float, float, float]
    paper: tuple[float, float, float]
    thick: bool
    grain: float  # standard deviation of the paper's per-pixel brightness noise

    def describe(self) -> str:
        def rgb(c: tuple[float, ...]) -> str:
            return "#" + "".join(f"{round(v * 255):02x}" for v in c)

        width = "thick (dilated)" if self.thick else "thin"
        paper = f"grainy (std {self.grain})" if self.grain else "smooth"
        return f"{width} {rgb(self.ink)} strokes on {paper} {rgb(self.paper)} paper"


STYLES: dict[str, Style] = {
    "light": Style(ink=(0.10, 0.14, 0.40), paper=(0.96, 0.93, 0.84), thick=False, grain=0.0),
    "dark": Style(ink=(0.98, 0.80, 0.30), paper=(0.12, 0.22, 0.24), thick=True, grain=0.06),
}


@functools.lru_cache(maxsize=1)
def shapes() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digit shapes upsampled to 16x16 (float in [0, 1]) and their digits."""
    from scipy import ndimage
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float64) / 16.0
    up = ndimage.zoom(images, (1, 2, 2), order=3, mode="nearest", grid_mode=True)
    up = np.clip(up, 0.0, 1.0)
    up.setflags(write=False)
    target = np.asarray(digits.target, dtype=np.int64)
    target.setflags(write=False)
    return up, target


def _coverage(shape: np.ndarray, thick: bool) -> np.ndarray:
    """Ink coverage in [0, 1]: a thin stroke, or one dilated by a pixel each way (faint
    pixels keep some ink in both, so that loops drawn lightly stay readable)."""
    from scipy import ndimage

    if thick:
        plus = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)
        return np.clip((ndimage.grey_dilation(shape, footprint=plus) - 0.2) / 0.4, 0.0, 1.0)
    return np.clip((shape - 0.2) / 0.6, 0.0, 1.0)


def render(source_index: int, group: str, seed: int = 0) -> np.ndarray:
    """Shape `source_index` drawn in `group`: a ``[16, 16, 3]`` uint8 array.

    The grain depends on (seed, source_index, group) only, so a shape looks the same in
    every split that holds it.
    """
    if group not in STYLES:
        raise DtkError(f"unknown group {group!r}; choose one of: {', '.join(GROUPS)}")
    style = STYLES[group]
    coverage = _coverage(shapes()[0][source_index], style.thick)[..., None]
    paper = np.broadcast_to(np.asarray(style.paper), (IMAGE_SIZE, IMAGE_SIZE, 3))
    if style.grain:
        rng = np.random.default_rng([seed, source_index, GROUPS.index(group)])
        paper = paper + rng.normal(0.0, style.grain, (IMAGE_SIZE, IMAGE_SIZE, 1))
    image = paper + coverage * (np.asarray(style.ink) - paper)
    return np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


def holdout() -> tuple[np.ndarray, np.ndarray]:
    """Source indices of the training shapes and of the held-out (test) shapes, sorted."""
    _, target = shapes()
    rng = np.random.default_rng(HOLDOUT_SEED)
    test = []
    for digit in range(10):
        members = np.flatnonzero(target == digit)
        test.extend(rng.permutation(members)[:TEST_PER_DIGIT])
    test_set = set(int(i) for i in test)
    train = np.array([i for i in range(len(target)) if i not in test_set], dtype=np.int64)
    return train, np.array(sorted(test_set), dtype=np.int64)


def minority_count(minority_share: float) -> int:
    """How many training shapes are drawn in the minority group: the share, rounded half up."""
    check_share(minority_share)
    return math.floor(minority_share * len(holdout()[0]) + 0.5)


def check_share(minority_share: float) -> None:
    if not (0.0 <= minority_share <= 0.5) or math.isnan(minority_share):
        raise DtkError(f"--minority-share must be between 0 and 0.5, got {minority_share}")


def _minority_shapes(train: np.ndarray, minority_share: float, seed: int) -> set[int]:
    """The training shapes drawn in the minority group: `minority_count` of them, spread over
    the digits by largest remainder, chosen within each digit by `seed`."""
    _, target = shapes()
    total = minority_count(minority_share)
    by_digit = [train[target[train] == d] for d in range(10)]
    quotas = [minority_share * len(m) for m in by_digit]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(10), key=lambda d: (-(quotas[d] - counts[d]), d))
    for d in by_remainder[: total - sum(counts)]:
        counts[d] += 1
    rng = np.random.default_rng(seed)
    chosen: set[int] = set()
    for members, count in zip(by_digit, counts):
        chosen.update(int(i) for i in rng.permutation(members)[:count])
    return chosen


def rows(
    split: str, minority_share: float = 0.05, seed: int = 0, captions: bool = False
) -> list[dict[str, Any]]:
    """The metadata rows of `split` (without file contents), ordered by source index; with
    `captions`, each has a ``text`` column too (`toolkit.recipes.captions`)."""
    if split not in SPLITS:
        raise DtkError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    check_share(minority_share)
    check_seed(seed, what="--seed")  # numpy takes any seed >= 0; torch's range, for one rule
    _, target = shapes()
    train, test = holdout()
    if split == "train":
        minority = _minority_shapes(train, minority_share, seed)
        majority = next(g for g in GROUPS if g != MINORITY_GROUP)
        pairs = [(int(i), MINORITY_GROUP if int(i) in minority else majority) for i in train]
    else:
        shape_ids = test if split == "test" else train
        pairs = [(int(i), group) for i in shape_ids for group in GROUPS]
    records = [
        {
            "file_name": f"{target[i]}_{group}/{i:04d}.png",
            "digit": int(target[i]),
            "group": group,
            "split": split,
            "source_index": i,
        }
        for i, group in pairs
    ]
    for record in records if captions else ():
        # the caption depends on (seed, shape, group) only: the same in every split
        key = [seed, record["source_index"], GROUPS.index(record["group"]), 1]
        record[texts.COLUMN] = texts.caption(record["digit"], record["group"],
                                             np.random.default_rng(key))  # fmt: skip
    return records


def describe(
    split: str, minority_share: float, seed: int, command: str, captions: bool = False
) -> dict[str, Any]:
    """What ``dataset.json`` records: enough to make the same folder again."""
    import importlib.metadata

    return {
        "name": NAME,
        "command": command,
        "split": split,
        "seed": seed,
        "minority_share": minority_share if split == "train" else None,
        "minority_group": MINORITY_GROUP if split == "train" else None,
        "captions": _captions_info() if captions else None,
        "holdout": {"per_digit": TEST_PER_DIGIT, "seed": HOLDOUT_SEED},
        "groups": {name: style.describe() for name, style in STYLES.items()},
        "image_size": IMAGE_SIZE,
        "source": "sklearn.datasets.load_digits "
        f"(scikit-learn {importlib.metadata.version('scikit-learn')})",
        "toolkit_version": importlib.metadata.version("diffusion-toolkit"),
    }


#: dataset.json keys that must agree for a folder to be rewritten in place
IDENTITY = ("name", "split", "seed", "minority_share", "captions")


def _captions_info() -> dict[str, Any]:
    return {"column": texts.COLUMN, "group_named": texts.GROUP_NAMED,
            "neutral": list(texts.NEUTRAL), "named": list(texts.NAMED)}  # fmt: skip


def write(
    out: str | pathlib.Path,
    split: str = "train",
    minority_share: float = 0.05,
    seed: int = 0,
    *,
    captions: bool = False,
    command: str | None = None,
    progress: bool = False,
) -> pandas.DataFrame:
    """Write `split` as a dataset folder in `out`; returns its metadata.

    Every file is written atomically; ``dataset.json`` is written first (so an interrupted
    run is recognised) and again last, with the counts. Rerunning the same call rewrites the
    same bytes; a non-empty folder holding anything else is refused.
    """
    import sys

    import pandas
    from tqdm.auto import tqdm

    out = pathlib.Path(out)
    records = rows(split, minority_share, seed, captions)  # validates split and share first
    if command is None:
        command = _command(out, split, minority_share, seed, captions)
    info = describe(split, minority_share, seed, command, captions)
    _check_out(out, info)
    # written first too, so that an interrupted run is recognised and redone by its command
    atomic_write(out / "dataset.json", (json.dumps(info, indent=2) + "\n").encode())
    for record in tqdm(records, desc=f"{NAME} {split}", unit="img", file=sys.stderr,
                       disable=not progress):  # fmt: skip
        pixels = render(record["source_index"], record["group"], seed)
        atomic_write(out / record["file_name"], encode_png(pixels))
    columns = [*COLUMNS, *([texts.COLUMN] if captions else [])]
    metadata = pandas.DataFrame.from_records(records, columns=columns)
    atomic_write(out / "metadata.csv", metadata.to_csv(index=False).encode())
    counts = metadata.groupby("group").size()
    info["counts"] = {g: int(counts.get(g, 0)) for g in GROUPS}
    atomic_write(out / "dataset.json", (json.dumps(info, indent=2) + "\n").encode())
    return metadata


def _command(
    out: pathlib.Path, split: str, minority_share: float, seed: int, captions: bool
) -> str:
    """The ``dtk data`` command that writes this folder, for ``dataset.json`` to record."""
    import shlex

    args = ["dtk", "data", NAME, str(out), "--split", split]
    if split == "train":
        args += ["--minority-share", str(minority_share)]
    return shlex.join([*args, "--seed", str(seed), *(["--captions"] if captions else [])])


def _check_out(out: pathlib.Path, info: dict[str, Any]) -> None:
    from toolkit.checks import check_writable

    check_writable(out)
    if not out.exists() or not any(out.iterdir()):
        return
    existing_file = out / "dataset.json"
    try:
        existing = json.loads(existing_file.read_text())
        if not isinstance(existing, dict):
            raise ValueError("not an object")
    except (OSError, ValueError):
        raise DtkError(
            f"{out} is not empty and holds no {NAME} dataset; choose an empty or new folder"
        ) from None
    differing = [k for k in IDENTITY if existing.get(k) != info.get(k)]
    if differing:
        raise DtkError(
            f"{out} holds a different {NAME} dataset (different {', '.join(differing)}); "
            "choose another folder"
        )
