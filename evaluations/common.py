"""What every fairness command shares: reading image folders, plugin provenance, JSON out."""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import pathlib
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import toolkit

if TYPE_CHECKING:
    import pandas
    import torch

    from toolkit import GenerationSettings

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def load_images(
    root: str | pathlib.Path, attributes: Iterable[str] = ()
) -> tuple[torch.Tensor, pandas.DataFrame]:
    """Images of a folder as float ``[N, 3, H, W]`` in [0, 1] and a metadata frame.

    A dataset folder (with ``metadata.csv``) is read through it, so its attribute columns
    come along; any other folder is searched recursively for image files (``file_name``
    only), so the fairness tools also audit other generators' outputs. Images are brought to
    the first image's size.
    """
    import pandas

    root = pathlib.Path(root)
    if not root.is_dir():
        raise toolkit.DtkError(f"image folder {root} does not exist")
    if (root / "metadata.csv").is_file():
        dataset = toolkit.load_image_folder(root, list(attributes))
        return dataset.images, dataset.metadata
    attributes = list(attributes)
    if attributes:
        raise toolkit.DtkError(f"{root} has no metadata.csv, so it has no {attributes[0]!r} column")
    files = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and ".dtk" not in p.parts
    )
    if not files:
        raise toolkit.DtkError(f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return toolkit.read_images(root, files), pandas.DataFrame({"file_name": files})


def provenance(kind: str, name: str) -> dict[str, str]:
    """Which distribution (and version) provides plugin `name` of `kind`."""
    table = toolkit.plugins(kind)
    bare = name.split(":", 1)[-1]
    rows = table[(table["name"] == bare) & (table["status"] == "ok")]
    if ":" in name:
        rows = rows[rows["distribution"] == name.split(":", 1)[0]]
    if rows.empty:
        return {"kind": kind, "name": name, "distribution": "", "version": ""}
    row = rows.iloc[0]
    return {"kind": kind, "name": bare, "distribution": row["distribution"],
            "version": row["version"]}  # fmt: skip


def versions() -> dict[str, str]:
    """`toolkit.versions` plus the libraries the fairness numbers come from."""
    return toolkit.versions("fairlearn", "pandas")


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def jsonable(value: Any) -> Any:
    """Plain JSON types; NaN and infinities become None (JSON has no spelling for them)."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, pathlib.Path):
        return str(value)
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def settings_json(settings: GenerationSettings | None) -> dict[str, Any]:
    """A `toolkit.GenerationSettings` as results.json records it: every field."""
    return {} if settings is None else jsonable(dataclasses.asdict(settings))


def write_json(path: pathlib.Path, data: Any) -> None:
    text = json.dumps(jsonable(data), indent=2, sort_keys=False, allow_nan=False)
    toolkit.atomic_write(path, (text + "\n").encode())


def write_csv(path: pathlib.Path, frame: pandas.DataFrame, index: bool = False) -> None:
    toolkit.atomic_write(path, frame.to_csv(index=index).encode())
