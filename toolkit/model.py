"""Loading a local diffusers model folder into a `LoadedModel`.

Two layouts are accepted:

* a pipeline folder as ``DDPMPipeline.save_pretrained`` writes it: ``model_index.json``,
  ``unet/`` and ``scheduler/``;
* a bare ``UNet2DModel`` folder (``config.json`` + weights) with ``scheduler_config.json``
  beside the weights.

`load_model` hands Stable-Diffusion-style pipeline folders (text encoder, VAE,
``UNet2DConditionModel``) to `toolkit.text_model`.

An optional ``toolkit.json`` (next to ``model_index.json`` or in the UNet folder) names the
model's conditioning attributes (see `toolkit.conditions`). Weights load from safetensors;
pickled ``.bin`` weights only with ``trust_pickle=True``, because unpickling runs code.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import TYPE_CHECKING, Any

from toolkit._lazy import lazy_import
from toolkit.conditions import LabelSpace
from toolkit.errors import DtkError
from toolkit.families import detect_family
from toolkit.loading import load_failure, read_config, scheduler_noise, use_safetensors
from toolkit.noise import NoiseLevels
from toolkit.text_model import TextModel, is_text_model, load_text_model

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_import("torch")

WEIGHTS_STEM = "diffusion_pytorch_model"


@dataclasses.dataclass
class LoadedModel:
    """A UNet with everything needed to turn it into a sigma-space denoiser."""

    path: pathlib.Path
    unet: Any
    noise_levels: NoiseLevels
    prediction_type: str
    scheduler_config: dict[str, Any]
    labels: LabelSpace | None

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return unet_sample_shape(self.unet)

    @property
    def conditional(self) -> bool:
        return self.labels is not None

    def describe(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "class": type(self.unet).__name__,
            "prediction_type": self.prediction_type,
            "sample_shape": list(self.sample_shape),
            "attributes": self.labels.to_json()["attributes"] if self.labels else [],
        }


def unet_sample_shape(unet: Any) -> tuple[int, int, int]:
    """(channels, height, width) a UNet samples in (pixels, or latents for a VAE model)."""
    config = unet.config
    size = config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return (config.in_channels, height, width)


def find_unet_folder(path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path | None]:
    """(unet folder, scheduler config file, toolkit.json or None) of a model folder."""
    detect_family(path)  # a folder of a family dtk does not load is refused by name
    if (path / "model_index.json").is_file():
        unet_dir = path / "unet"
        scheduler = path / "scheduler" / "scheduler_config.json"
        extra = [path / "toolkit.json", unet_dir / "toolkit.json"]
    else:
        unet_dir = path
        scheduler = path / "scheduler_config.json"
        extra = [path / "toolkit.json"]
    if not (unet_dir / "config.json").is_file():
        raise DtkError(
            f"{path} is not a diffusers model folder: expected model_index.json with unet/ "
            "and scheduler/, or a UNet2DModel folder with config.json and scheduler_config.json"
        )
    if not scheduler.is_file():
        raise DtkError(f"{path}: missing scheduler config ({scheduler.relative_to(path)})")
    toolkit_json = next((p for p in extra if p.is_file()), None)
    return unet_dir, scheduler, toolkit_json


def label_space(path: str | pathlib.Path) -> LabelSpace | None:
    """The attributes a model folder is conditioned on, read without loading its weights
    (None for an unconditional model)."""
    path = pathlib.Path(path)
    unet_dir, _, toolkit_json = find_unet_folder(path)
    if toolkit_json is not None:
        return LabelSpace.from_json(toolkit_json)
    num_classes = read_config(unet_dir / "config.json").get("num_class_embeds")
    return LabelSpace.single_class(num_classes) if num_classes else None


def load_model(
    path: str | pathlib.Path, *, trust_pickle: bool = False, device: Any = "cpu", dtype: Any = None
) -> LoadedModel | TextModel:
    """Load a UNet2DModel folder (see the module docstring), or a text-to-image pipeline
    folder as a `TextModel`; clear errors for bad folders."""
    from diffusers import UNet2DModel

    path = pathlib.Path(path)
    if is_text_model(path):
        return load_text_model(path, trust_pickle=trust_pickle, device=device, dtype=dtype)
    unet_dir, scheduler_file, toolkit_json = find_unet_folder(path)
    unet_config = read_config(unet_dir / "config.json")
    scheduler_config = read_config(scheduler_file)
    if unet_config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise DtkError(
            f"{path}: the UNet is a {unet_config['_class_name']}; this loader takes UNet2DModel"
        )
    safetensors = use_safetensors(unet_dir, WEIGHTS_STEM, trust_pickle)

    try:
        unet = UNet2DModel.from_pretrained(
            unet_dir,
            use_safetensors=safetensors,
            local_files_only=True,
            low_cpu_mem_usage=False,
            torch_dtype=dtype,
        )
    except Exception as exc:  # diffusers raises many types for a damaged folder
        raise load_failure(unet_dir, "UNet", exc) from None
    unet.eval().requires_grad_(False)
    unet.to(device=device)

    prediction_type, noise_levels = scheduler_noise(path, scheduler_config)

    num_classes = unet.config.num_class_embeds
    labels = LabelSpace.from_json(toolkit_json) if toolkit_json else None
    if labels is not None and num_classes is None:
        raise DtkError(f"{toolkit_json} names attributes but the UNet takes no class labels")
    if labels is None and num_classes is not None:
        labels = LabelSpace.single_class(num_classes)
    if labels is not None and labels.num_labels > num_classes:
        raise DtkError(
            f"{toolkit_json}: its attributes need {labels.num_labels} labels but the UNet "
            f"has {num_classes} class embeddings"
        )
    return LoadedModel(path, unet, noise_levels, prediction_type, scheduler_config, labels)
