"""Pixels: the contract's float-to-uint8 conversion, PNG encoding and grids of images
(the contact sheets of ``--grid`` and of reports)."""

from __future__ import annotations

import math
import pathlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

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


def encode_png(image: Any, *, optimize: bool = False) -> bytes:
    """A PIL image, or a ``[H, W, C]`` uint8 array (C = 1, 3 or 4), as PNG bytes; `optimize`
    spends time for smaller files (reports embed theirs)."""
    import io

    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=optimize)
    return buffer.getvalue()


def grid(images: Sequence[Any], *, columns: int | None = None, cell: int | None = None,
         gap: int = 2, background: Any = (255, 255, 255), captions: Sequence[str] = (),
         caption_height: int = 14) -> Any:  # fmt: skip
    """PIL images in a grid of `columns` (default: a square), `gap` pixels apart on
    `background`. Each image at its own size (all as the first's), or with `cell` fitted into
    a square of that side and centred (small ones scaled up by whole factors, so pixel art
    stays crisp). With `captions`, each one's caption in a strip under its cell."""
    from PIL import Image, ImageDraw, ImageFont

    if not images:
        raise ValueError("no images for a grid")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = (cell, cell) if cell else images[0].size
    strip = caption_height if any(captions) else 0
    step_x, step_y = width + gap, height + strip + gap
    sheet = Image.new("RGB", (columns * step_x + gap, rows * step_y + gap), background)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=10) if strip else None
    for k, image in enumerate(images):
        left, top = gap + (k % columns) * step_x, gap + (k // columns) * step_y
        tile, x, y = image, left, top
        if cell:
            size = fit_size(image.size, cell)
            small = image.size[0] < size[0]
            resample = Image.Resampling.NEAREST if small else Image.Resampling.LANCZOS
            tile = image.resize(size, resample)
            x, y = left + (cell - size[0]) // 2, top + (cell - size[1]) // 2
        # a transparent image over the background, as a browser shows it
        mask = tile if tile.mode == "RGBA" else None
        sheet.paste(tile.convert("RGB"), (x, y), mask)
        if strip and k < len(captions) and captions[k]:
            box = (left, top + height, left + width - 1, top + height + strip - 1)
            draw.rectangle(box, fill="#ffffff")
            draw.text((left + width // 2, top + height + strip // 2), captions[k],
                      fill="#1f2328", font=font, anchor="mm")  # fmt: skip
    return sheet


def fit_size(size: tuple[int, int], box: int) -> tuple[int, int]:
    """An image's (width, height) fitted into a square of side `box`: a small one scaled up
    by a whole factor (pixel art stays crisp), a large one down to the box."""
    w, h = size
    if max(w, h) <= box:
        scale = max(1, box // max(w, h))
        return w * scale, h * scale
    scale = box / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def contact_sheet(paths: Sequence[pathlib.Path], columns: int | None = None) -> bytes:
    """A PNG grid of the images at `paths` (2-pixel gaps), as bytes."""
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in paths]
    if not images:
        raise ValueError("no images for a contact sheet")
    return encode_png(grid(images, columns=columns))
