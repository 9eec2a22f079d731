"""Dataset folders in tests: reading generated images back, copying part of a folder."""

from __future__ import annotations

import pathlib

import numpy as np
import pandas
from PIL import Image


def pixels(out: pathlib.Path, metadata: pandas.DataFrame | None = None) -> dict[int, np.ndarray]:
    """Each written image of folder `out` by sample index, as int16 so differences of two
    images do not wrap around; `metadata` defaults to the folder's metadata.csv."""
    if metadata is None:
        metadata = pandas.read_csv(out / "metadata.csv", keep_default_na=False)
    return {
        int(row.index): np.asarray(Image.open(out / row.file_name), dtype=np.int16)
        for row in metadata.itertuples()
    }


def copy_subset(
    source: pathlib.Path, metadata: pandas.DataFrame, out: pathlib.Path
) -> pathlib.Path:
    """A dataset folder `out` holding the images of `source` that `metadata` lists, with
    `metadata` as its metadata.csv."""
    for name in metadata["file_name"]:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes((source / name).read_bytes())
    metadata.to_csv(out / "metadata.csv", index=False)
    return out
