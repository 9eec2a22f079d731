"""The label-UNet family: ``UNet2DModel`` folders, unconditional or conditioned on
attribute labels, trained as VP diffusion models (epsilon, v or sample prediction), with a
fixed or a learned variance.

Two layouts are accepted:

* a pipeline folder as ``DDPMPipeline.save_pretrained`` writes it: ``model_index.json``,
  ``unet/`` and ``scheduler/``;
* a bare ``UNet2DModel`` folder (``config.json`` + weights) with ``scheduler_config.json``
  beside the weights.

An optional ``toolkit.json`` (next to ``model_index.json`` or in the UNet folder) names the
model's conditioning attributes (`toolkit.conditions.labels`); without it a class-conditional
UNet has one attribute ``class``. Weights load from safetensors; pickled ``.bin`` weights
only with ``trust_pickle=True``, because unpickling runs code.

A learned-variance UNet (iDDPM; Nichol & Dhariwal 2021) outputs twice the sample's
channels, the mean's (epsilon, v or x0) then the variance's, and its scheduler config says
``variance_type`` ``learned`` or ``learned_range``: the denoiser uses the first half, and
keeps the second as `Model.variance` for the samplers that use it (``ddpm``, as diffusers'
``DDPMScheduler``); the others ignore it.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from toolkit import defaults
from toolkit.conditions.labels import LabelSpace
from toolkit.errors import DtkError
from toolkit.lazy import lazy_import
from toolkit.models.detect import LEARNED_VARIANCE
from toolkit.models.family import COND, UNCOND, Conditioning, Model, ModelFolder, VPModel
from toolkit.models.family import refuse_unknown_branches as _refuse_unknown
from toolkit.models.loading import (
    check_prediction_type,
    load_failure,
    read_config,
    unet_shape,
    use_safetensors,
)

if TYPE_CHECKING:
    import torch

    from toolkit.registry.protocols import SampleRequest
else:
    torch = lazy_import("torch")

WEIGHTS_STEM = "diffusion_pytorch_model"
#: classifier-free guidance of a conditioned request, when none is named
DEFAULT_CFG_SCALE = defaults.LABEL_CFG_SCALE


class LabelUNetFolder(ModelFolder):
    """A label-UNet folder, read from its configs."""

    family = "unet"

    def __init__(self, path: pathlib.Path) -> None:
        super().__init__(path)
        self.unet_dir, scheduler_file, toolkit_json = _layout(path)
        self.unet_config = read_config(self.unet_dir / "config.json")
        self._scheduler_config = read_config(scheduler_file)
        self.check_scheduler_config()
        self._labels = _label_space(self.unet_config, toolkit_json)
        #: whether the UNet predicts its variance too (`toolkit.models.detect` checked that
        #: the UNet's channels and the scheduler's variance_type agree)
        self.learned_variance = (
            self._scheduler_config.get("variance_type") in LEARNED_VARIANCE
            and self.unet_config.get("out_channels") == 2 * self.sample_shape[0]
        )

    def check_scheduler_config(self) -> None:
        """Refuse a scheduler config the family cannot sample with (read from it alone)."""
        check_prediction_type(self.path, self._scheduler_config)

    @property
    def scheduler_config(self) -> dict[str, Any]:
        return self._scheduler_config

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return unet_shape(self.unet_config)

    @property
    def labels(self) -> LabelSpace | None:
        return self._labels

    def describe(self) -> dict[str, Any]:
        described = {**super().describe(),
                     "class": self.unet_config.get("_class_name", "UNet2DModel")}  # fmt: skip
        if self.learned_variance:
            described["variance_type"] = self._scheduler_config["variance_type"]
        return described

    # -- requests ------------------------------------------------------------------------

    def check_request(self, conditions: Sequence[Mapping[str, str]], prompt_given: bool,
                      negative_given: bool, options: Mapping[str, bool]) -> None:  # fmt: skip
        if prompt_given or negative_given:
            option = "--prompt" if prompt_given else "--negative-prompt"
            kind = ("class-conditional: use --condition KEY=VALUE" if self.labels is not None
                    else "unconditional")  # fmt: skip
            raise DtkError(f"{self.path} takes no {option}: it is not a text-to-image model "
                           f"({kind})")  # fmt: skip
        for option, on in options.items():
            if on:
                flag = "--" + option.replace("_", "-")
                raise DtkError(f"{flag} is for text-to-image (latent) models; {self.path} is "
                               "not one")  # fmt: skip
        for condition in conditions:
            self.validate(condition)

    def validate(self, condition: Mapping[str, str]) -> dict[str, str]:
        if self.labels is None:
            if condition:
                raise DtkError(f"{self.path} is unconditional; it takes no --condition")
            return {}
        return self.labels.validate(condition)

    def default_sampling(self) -> tuple[str, str, int]:
        """``deis`` on ``karras``, 20 steps (`toolkit.defaults.LABEL_SAMPLER`)."""
        return defaults.LABEL_SAMPLER, defaults.SCHEDULE, defaults.STEPS

    def default_guidance(self, conditional: bool) -> tuple[str, dict[str, Any]]:
        usable = self.labels is not None and self.labels.null_label is not None
        if conditional and usable:
            return "cfg", {"scale": DEFAULT_CFG_SCALE}
        return "none", {}

    def check_guidance(self, branches: set[str], text_branches: Mapping[str, str],
                       conditional: bool, name: str) -> None:  # fmt: skip
        if text_branches:
            raise DtkError(
                f"guidance {name!r} needs a text-to-image model (its "
                f"{'/'.join(sorted(text_branches))} branch is a prompt); {self.path} is not one"
            )
        _refuse_unknown(name, branches, {COND, UNCOND})
        if UNCOND not in branches:
            return
        if self.labels is None:
            raise DtkError(f"guidance {name!r} needs a class-conditional model; {self.path} is "
                           "unconditional: use --guidance none")  # fmt: skip
        if self.labels.null_label is None:
            raise DtkError(
                f"guidance {name!r} needs the model's unconditional (null) label, and "
                f"{self.path} has none: use --guidance none"
            )
        if not conditional:
            raise DtkError(f"guidance {name!r} needs a condition to guide towards: give "
                           "--condition KEY=VALUE, or use --guidance none")  # fmt: skip

    # -- weights -------------------------------------------------------------------------

    def load(self, *, device: Any, dtype: Any, trust_pickle: bool = False,
             attention_slicing: bool = False, vae_tiling: bool = False) -> LabelUNet:  # fmt: skip
        return LabelUNet(self, self.load_unet(device, dtype, trust_pickle))

    def load_unet(self, device: Any, dtype: Any, trust_pickle: bool) -> Any:
        """The ``UNet2DModel``, in eval mode without gradients, on `device` in `dtype`."""
        from diffusers import UNet2DModel

        safetensors = use_safetensors(self.unet_dir, WEIGHTS_STEM, trust_pickle)
        try:
            unet = UNet2DModel.from_pretrained(
                self.unet_dir, use_safetensors=safetensors, local_files_only=True,
                low_cpu_mem_usage=False, torch_dtype=dtype,
            )  # fmt: skip
        except Exception as exc:  # diffusers raises many types for a damaged folder
            raise load_failure(self.unet_dir, "UNet", exc) from None
        unet.eval().requires_grad_(False)
        return unet.to(device=device)


class LabelUNet(VPModel):
    """A loaded label-UNet: the sigma-space denoiser of a VP ``UNet2DModel``."""

    def __init__(self, folder: LabelUNetFolder, unet: Any) -> None:
        super().__init__(folder, unet)
        self.unet = unet
        #: whether the UNet outputs the mean's channels, then the variance's (iDDPM)
        self.learned_variance = folder.learned_variance

    @property
    def labels(self) -> LabelSpace | None:
        return self.folder.labels

    def forward(self, x_in: torch.Tensor, t: torch.Tensor, **inputs: torch.Tensor
                ) -> torch.Tensor:  # fmt: skip
        """The network's output; a learned-variance UNet's mean channels, its variance
        channels kept as `variance` (`toolkit.models.family.Model.variance`)."""
        out = super().forward(x_in, t, **inputs)
        return mean_channels(self, out) if self.learned_variance else out

    def conditioning(self, batch: Sequence[SampleRequest],
                     text_branches: Mapping[str, str]) -> LabelConditioning:  # fmt: skip
        return label_conditioning(self.labels, batch, self.device)


def mean_channels(model: Model, out: torch.Tensor, keep_variance: bool = True) -> torch.Tensor:
    """The mean's channels of a network output that holds the mean's, then the variance's
    (an iDDPM UNet, DiT's and PixArt's learned sigma): the first half. The second is kept as
    `model.variance` (`toolkit.models.family.Model.variance`, for the samplers that use it)
    when `keep_variance`, else dropped, as diffusers' DiT and PixArt pipelines drop it."""
    mean, variance = out.chunk(2, dim=1)
    if keep_variance:
        model.variance = variance
    return mean


def label_conditioning(labels: LabelSpace | None, batch: Sequence[SampleRequest],
                       device: torch.device) -> LabelConditioning:  # fmt: skip
    """The `LabelConditioning` of `batch` for a UNet conditioned on `labels` (None: an
    unconditional one); every family of label-conditioned UNets shares it."""
    if labels is None:
        return LabelConditioning(None, None)
    cache: dict[tuple, int] = {}
    values = []
    for sample in batch:
        key = tuple(sorted(sample.conditions.items()))
        if key not in cache:
            cache[key] = labels.label(sample.conditions)
        values.append(cache[key])
    tensor = torch.tensor(values, dtype=torch.long, device=device)
    return LabelConditioning(tensor, labels.null_label)


class LabelConditioning(Conditioning):
    """Branch inputs of a label model: the samples' labels (``cond``) or the null label
    (``uncond``); nothing for an unconditional model (`labels` None)."""

    def __init__(self, labels: torch.Tensor | None, null_label: int | None) -> None:
        self.labels = labels
        self.null_label = null_label

    def inputs(self, branch: str, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
        if self.labels is None:
            return {}
        if branch == COND:
            return {"class_labels": self.labels.to(device)}
        if branch == UNCOND:
            null = torch.full((batch,), self.null_label, dtype=torch.long, device=device)
            return {"class_labels": null}
        raise KeyError(branch)


def _layout(path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path | None]:
    """(unet folder, scheduler config file, toolkit.json or None) of a model folder."""
    if (path / "model_index.json").is_file():
        unet_dir = path / "unet"
        scheduler = path / "scheduler" / "scheduler_config.json"
        extra = [path / "toolkit.json", unet_dir / "toolkit.json"]
    else:
        unet_dir = path
        scheduler = path / "scheduler_config.json"
        extra = [path / "toolkit.json"]
    if not scheduler.is_file():
        raise DtkError(f"{path}: missing scheduler config ({scheduler.relative_to(path)})")
    return unet_dir, scheduler, next((p for p in extra if p.is_file()), None)


def _label_space(unet_config: Mapping[str, Any], toolkit_json: pathlib.Path | None
                 ) -> LabelSpace | None:  # fmt: skip
    """The attributes, checked against the UNet's class embeddings."""
    num_classes = unet_config.get("num_class_embeds")
    if toolkit_json is None:
        return LabelSpace.single_class(num_classes) if num_classes else None
    labels = LabelSpace.from_json(toolkit_json)
    if num_classes is None:
        raise DtkError(f"{toolkit_json} names attributes but the UNet takes no class labels")
    if labels.num_labels > num_classes:
        raise DtkError(
            f"{toolkit_json}: its attributes need {labels.num_labels} labels but the UNet "
            f"has {num_classes} class embeddings"
        )
    return labels
