"""Model families: which family a folder holds (`detect`), and each family's class behind
one protocol (`toolkit.models.family`): a `ModelFolder` read from configs, whose ``load``
gives the runnable `Model`.
"""

from __future__ import annotations

import pathlib
from typing import Any

from toolkit.models.detect import DIT, FLUX, LCM, PIXART, SD3, SDXL, TEXT, UNET, VE, detect_family
from toolkit.models.dit import DiTFolder
from toolkit.models.family import Conditioning, Model, ModelFolder
from toolkit.models.flux import FluxFolder
from toolkit.models.label_unet import LabelUNetFolder
from toolkit.models.lcm import LatentConsistencyFolder
from toolkit.models.pixart import PixArtFolder
from toolkit.models.sd3 import StableDiffusion3Folder
from toolkit.models.sdxl import StableDiffusionXLFolder
from toolkit.models.stable_diffusion import StableDiffusionFolder
from toolkit.models.ve import VEFolder

#: detection result -> the family's folder class
FAMILIES: dict[str, type[ModelFolder]] = {
    UNET: LabelUNetFolder,
    TEXT: StableDiffusionFolder,
    VE: VEFolder,
    SD3: StableDiffusion3Folder,
    SDXL: StableDiffusionXLFolder,
    DIT: DiTFolder,
    PIXART: PixArtFolder,
    FLUX: FluxFolder,
    LCM: LatentConsistencyFolder,
}

__all__ = [
    "FAMILIES",
    "Conditioning",
    "Model",
    "ModelFolder",
    "label_space",
    "load_model",
    "open_model",
]


def open_model(path: str | pathlib.Path) -> ModelFolder:
    """The folder's family, read from its configs (no torch, no weights); a folder of a
    family dtk does not load is refused in one line naming it."""
    from toolkit.assets import model_path

    path = model_path(path)
    return FAMILIES[detect_family(path)](path)


def load_model(path: str | pathlib.Path, *, device: Any = "cpu", dtype: Any = None,
               trust_pickle: bool = False) -> Model:  # fmt: skip
    """Open and load a model folder in one step (for scripts and tests)."""
    return open_model(path).load(device=device, dtype=dtype, trust_pickle=trust_pickle)


def label_space(path: str | pathlib.Path) -> Any:
    """The attributes a model folder is conditioned on by label, read without loading its
    weights (None for an unconditional or text-to-image model)."""
    return open_model(path).labels
