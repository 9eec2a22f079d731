"""Reading dataset folders: images plus a ``metadata.csv`` with attribute columns.

The format is the one `dtk generate` writes and ``datasets``' "imagefolder" reads: a
``metadata.csv`` whose ``file_name`` column holds paths relative to the folder, and one
column per attribute (``digit``, ``group``, ...). A sharded folder (``--format webdataset``
or ``parquet``, `toolkit.data.shards`) has the same ``metadata.csv``, whose rows also name
the ``shard`` holding their image and their ``index`` in it. Training commands and the
fairness tools read real and synthetic data of either kind through this one module.
"""

from __future__ import annotations

import dataclasses
import io
import pathlib
import re
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

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
    first image's size; a sharded folder's images are read out of its shards."""
    root = pathlib.Path(root)
    metadata = read_metadata(root, attributes)
    if metadata.empty:
        raise DtkError(f"{root}/metadata.csv lists no images")
    side = None if size is None else (size, size)
    images = read_dataset_images(root, metadata, size=side, channels=channels)
    return ImageDataset(root, images, metadata)


@dataclasses.dataclass(frozen=True)
class ShardedImage:
    """The image of sample `index` in the shard at `path` (`toolkit.data.shards`)."""

    path: pathlib.Path
    index: int

    @property
    def name(self) -> str:
        return f"{self.path.name}, sample {self.index}"

    def __str__(self) -> str:
        return f"sample {self.index} of {self.path}"


ImageSource = pathlib.Path | ShardedImage


def image_sources(root: str | pathlib.Path, rows: pandas.DataFrame) -> list[ImageSource]:
    """Where each of `rows` (of a dataset folder's metadata, or a table that kept its
    ``file_name``, ``shard`` and ``index`` columns) has its image: its file, or, in a sharded
    folder (rows with a ``shard``), its sample in that shard. Nothing is read."""
    root = pathlib.Path(root)
    if "shard" not in rows.columns:
        return [root / name for name in rows["file_name"]]
    columns = zip(rows["file_name"], rows["shard"], rows["index"])
    return [ShardedImage(root / shard, int(index)) if _given(shard) else root / name
            for name, shard, index in columns]  # fmt: skip


def iter_image_bytes(sources: Sequence[ImageSource]) -> Iterator[tuple[int, bytes]]:
    """``(position, encoded bytes)`` of each of `sources`: files in their order, then the
    sharded ones a shard at a time (each shard read once, only its images held)."""
    from toolkit.data.shards import shard_images

    by_shard: dict[pathlib.Path, list[tuple[int, int]]] = {}
    for position, source in enumerate(sources):
        if isinstance(source, ShardedImage):
            by_shard.setdefault(source.path, []).append((position, source.index))
            continue
        try:
            yield position, pathlib.Path(source).read_bytes()
        except OSError as exc:
            raise DtkError(f"cannot read image {source}: {exc.strerror or exc}") from None
    for path, samples in by_shard.items():
        records = [{"shard": path.name, "index": index} for _, index in samples]
        for found, data in shard_images(path.parent, records):
            yield samples[found][0], data


def open_image(source: ImageSource | bytes) -> Any:
    """A PIL image from a path, a sample of a shard, or encoded bytes."""
    from PIL import Image

    if isinstance(source, ShardedImage):
        ((_, source),) = iter_image_bytes([source])
    return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)


def read_dataset_images(
    root: str | pathlib.Path,
    rows: pandas.DataFrame,
    *,
    size: tuple[int, int] | None = None,
    channels: int = 3,
) -> torch.Tensor:
    """The images of `rows` of a dataset folder (files or shards, `image_sources`) as float
    ``[N, C, H, W]`` in [0, 1], each resized to `size` (width, height) or to the first
    image's size."""
    return _decode_all(image_sources(root, rows), size, channels)


def read_images(
    root: str | pathlib.Path,
    files: Sequence[str],
    *,
    size: tuple[int, int] | None = None,
    channels: int = 3,
) -> torch.Tensor:
    """The images at `files` (relative to `root`) as float ``[N, C, H, W]`` in [0, 1], each
    resized to `size` (width, height) or, by default, to the first image's size."""
    return _decode_all([pathlib.Path(root) / name for name in files], size, channels)


def _decode_all(sources: Sequence[ImageSource], size: tuple[int, int] | None,
                channels: int) -> torch.Tensor:  # fmt: skip
    """Decode `sources` in mode L or RGB, each at `size` or, by default, the first's size."""
    from PIL import Image

    mode = {1: "L", 3: "RGB"}[channels]
    # files come out in their order, a shard's samples in the shard's: the first source's
    # size is looked up first only when it is a shard's sample
    if size is None and sources and isinstance(sources[0], ShardedImage):
        size = _size(sources[0])
    arrays: list[Any] = [None] * len(sources)
    for position, data in iter_image_bytes(sources):
        try:
            with Image.open(io.BytesIO(data)) as image:
                image = image.convert(mode)
                size = size or image.size
                if image.size != size:
                    image = image.resize(size, Image.BILINEAR)
                arrays[position] = np.asarray(image, dtype=np.uint8)
        except (OSError, Image.DecompressionBombError) as exc:
            raise DtkError(f"cannot read image {sources[position]}: {exc}") from None
    stacked = np.stack(arrays)
    if stacked.ndim == 3:
        stacked = stacked[..., None]
    return torch.from_numpy(stacked).permute(0, 3, 1, 2).float() / 255


def _size(source: ImageSource) -> tuple[int, int]:
    from PIL import Image

    try:
        with open_image(source) as image:
            return image.size
    except (OSError, Image.DecompressionBombError) as exc:
        raise DtkError(f"cannot read image {source}: {exc}") from None


def _given(value: Any) -> bool:
    """A cell that holds something (not empty, not NaN)."""
    if value is None:
        return False
    if isinstance(value, float):
        return value == value
    return str(value) != ""
