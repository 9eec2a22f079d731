"""Reading dataset folders: images plus a ``metadata.csv`` with attribute columns.

The format is the one `dtk generate` writes and ``datasets``' "imagefolder" reads: a
``metadata.csv`` whose ``file_name`` column holds paths relative to the folder, and one
column per attribute (``digit``, ``group``, ...). Training commands and the fairness tools
read real and synthetic data through this one module.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from toolkit.errors import DtkError
from toolkit.lazy import lazy_import

if TYPE_CHECKING:
    import numpy as np
    import pandas
    import torch
else:
    np = lazy_import("numpy")
    torch = lazy_import("torch")

_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


@dataclasses.dataclass
class ImageDataset:
    """Images as a float tensor ``[N, C, H, W]`` in [0, 1] and their metadata rows."""

    root: pathlib.Path
    images: torch.Tensor
    metadata: pandas.DataFrame

    def __len__(self) -> int:
        return len(self.metadata)

    def values(self, attribute: str) -> list[str]:
        """The sorted distinct values of an attribute column (as strings)."""
        return sorted(self.metadata[attribute].astype(str).unique(), key=natural_key)

    def codes(self, attribute: str, labels: Sequence[str]) -> torch.Tensor:
        """The attribute as integer codes into `labels`."""
        index = {v: i for i, v in enumerate(labels)}
        column = self.metadata[attribute].astype(str)
        unknown = sorted(set(column) - set(index))
        if unknown:
            raise DtkError(f"{self.root}: {attribute} values {unknown} are not in {list(labels)}")
        return torch.tensor([index[v] for v in column], dtype=torch.long)


def natural_key(value: object) -> tuple:
    """Sort key: numbers by value (``2`` before ``10``) first, then other strings
    alphabetically."""
    text = str(value)
    return (0, float(text), text) if _NUMBER.fullmatch(text) else (1, 0.0, text)


def read_metadata(root: str | pathlib.Path, attributes: Sequence[str] = ()) -> pandas.DataFrame:
    """``metadata.csv`` of a dataset folder, checked for `file_name` and `attributes`."""
    import pandas

    root = pathlib.Path(root)
    path = root / "metadata.csv"
    if not path.is_file():
        raise DtkError(f"{root} is not a dataset folder: no metadata.csv")
    try:
        metadata = pandas.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as exc:
        raise DtkError(f"cannot read {path}: {exc}") from None
    missing = [c for c in ("file_name", *attributes) if c not in metadata.columns]
    if missing:
        raise DtkError(
            f"{path} has no column {missing[0]!r}; its columns: {', '.join(metadata.columns)}"
        )
    return metadata


def load_image_folder(
    root: str | pathlib.Path,
    attributes: Sequence[str] = (),
    *,
    size: int | None = None,
    channels: int = 3,
) -> ImageDataset:
    """Load every image listed in ``metadata.csv``, resized to `size` if given, else to the
    first image's size."""
    root = pathlib.Path(root)
    metadata = read_metadata(root, attributes)
    if metadata.empty:
        raise DtkError(f"{root}/metadata.csv lists no images")
    side = None if size is None else (size, size)
    images = read_images(root, metadata["file_name"], size=side, channels=channels)
    return ImageDataset(root, images, metadata)


def read_images(
    root: str | pathlib.Path,
    files: Sequence[str],
    *,
    size: tuple[int, int] | None = None,
    channels: int = 3,
) -> torch.Tensor:
    """The images at `files` (relative to `root`) as float ``[N, C, H, W]`` in [0, 1], each
    resized to `size` (width, height) or, by default, to the first image's size."""
    from PIL import Image

    root = pathlib.Path(root)
    mode = {1: "L", 3: "RGB"}[channels]
    arrays = []
    for name in files:
        path = root / name
        try:
            with Image.open(path) as image:
                image = image.convert(mode)
                size = size or image.size
                if image.size != size:
                    image = image.resize(size, Image.BILINEAR)
                arrays.append(np.asarray(image, dtype=np.uint8))
        except OSError as exc:
            raise DtkError(f"cannot read image {path}: {exc}") from None
    stacked = np.stack(arrays)
    if stacked.ndim == 3:
        stacked = stacked[..., None]
    return torch.from_numpy(stacked).permute(0, 3, 1, 2).float() / 255
