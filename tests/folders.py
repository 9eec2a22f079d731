"""Reading a generated dataset folder back in tests."""

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
