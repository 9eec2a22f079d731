"""Pixels: the contract's float-to-uint8 conversion and contact sheets."""

from __future__ import annotations

import math
import pathlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

from toolkit.lazy import lazy_import

if TYPE_CHECKING:
    import numpy as np
    import torch
else:
    np = lazy_import("numpy")
    torch = lazy_import("torch")


def to_unit(x0: torch.Tensor) -> torch.Tensor:
    """Clean-image estimates in [-1, 1] -> float images in [0, 1]; a non-finite value
    (NaN or inf) becomes NaN, which the clamp would otherwise hide for inf."""
    x0 = x0.float()
    return torch.where(torch.isfinite(x0), ((x0 + 1) / 2).clamp(0, 1), torch.nan)


def to_pixels(images: torch.Tensor) -> np.ndarray:
    """Float images ``[B, C, H, W]`` in [0, 1] -> uint8 ``[B, H, W, C]``:
    ``round(clamp(x, 0, 1) * 255)``, with non-finite values as 0."""
    images = torch.nan_to_num(images.float(), nan=0.0, posinf=1.0, neginf=0.0).clamp(0, 1)
    pixels = (images * 255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def contact_sheet(paths: Sequence[pathlib.Path], columns: int | None = None) -> bytes:
    """A PNG grid of the images at `paths` (2-pixel gaps), as bytes."""
    import io

    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in paths]
    if not images:
        raise ValueError("no images for a contact sheet")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    gap = 2
    sheet = Image.new(
        "RGB", (columns * (width + gap) + gap, rows * (height + gap) + gap), (255, 255, 255)
    )
    for k, image in enumerate(images):
        row, col = divmod(k, columns)
        sheet.paste(image, (gap + col * (width + gap), gap + row * (height + gap)))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()
