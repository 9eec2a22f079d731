"""Speed levers on a loaded model's denoising network: channels-last memory format and
``torch.compile``, applied in place so that every family's forward, hooks included (the
perturbed guidance branches' in `toolkit.models.attention`), runs the faster network.

Compilation happens once per process, at the first forward pass. Inductor's automatic
dynamic shapes make a second batch shape (the smaller last batch, a guidance that skips its
unconditional branch at some noise levels) recompile once with a symbolic batch size, and
no further shape recompiles. The compiled kernels go to inductor's on-disk cache, in
`cache` when given, so a later run with the same network and shapes starts fast.
"""

from __future__ import annotations

import os
import pathlib
from typing import TYPE_CHECKING, Any

from toolkit.lazy import lazy_import

if TYPE_CHECKING:
    import torch

    from toolkit.models.family import NetworkModel
else:
    torch = lazy_import("torch")

#: the environment variable inductor reads its on-disk cache folder from
CACHE_VARIABLE = "TORCHINDUCTOR_CACHE_DIR"


def accelerate(model: NetworkModel, *, compile: str | None, cache: str | None = None,
               channels_last: bool = False) -> None:  # fmt: skip
    """`model`'s network in channels-last format if `channels_last`, then compiled in mode
    `compile` (``"default"``, ``"max-autotune"``; None: left eager)."""
    network: Any = model.network
    if channels_last:
        # only 4-D tensors (convolution weights) change format; a transformer is unaffected
        network.to(memory_format=torch.channels_last)
    if compile is None:
        return
    if cache is not None:
        folder = pathlib.Path(cache).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        os.environ[CACHE_VARIABLE] = str(folder)
    if model.device.type == "cpu":
        # freezing: the weights become constants of the graph, which oneDNN prepacks into
        # its own layouts (whole runs of the shipped model 1.15x faster than compiled
        # without it). It applies to graphs compiled for inference only (sampling runs
        # under inference_mode), and inductor reads it from its global config when the
        # first call compiles, not from torch.compile's options: set for the process
        torch._inductor.config.freezing = True
    network.compile(mode=None if compile == "default" else compile)
