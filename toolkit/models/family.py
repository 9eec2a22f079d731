"""The model protocol: one class per family of model folders, in two stages.

A `ModelFolder` is what the configs say, read without torch or weights: the family, what a
request may condition on (attribute labels, prompts), the sample shape, the scheduler
config, the defaults, and every check of a request against the model. Plans are made from
it alone (`toolkit.generation.plan`), so a mistake costs no load.

`ModelFolder.load` gives the `Model`: the weights on a device, as a sigma-space denoiser
``denoise(x, sigma, **inputs) -> x0`` (its family's parameterization applied), the
`Conditioning` of a batch for each guidance branch, and ``decode`` to pixels. The
generation engine speaks only this protocol: adding a family is adding one pair of classes
to `toolkit.models.FAMILIES`.
"""

from __future__ import annotations

import abc
import contextlib
import pathlib
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar

from toolkit import defaults
from toolkit.errors import DtkError

if TYPE_CHECKING:
    import torch

    from toolkit.conditions.labels import LabelSpace
    from toolkit.models.noise import NoiseLevels
    from toolkit.registry.protocols import SampleRequest

COND, UNCOND = "cond", "uncond"
#: keys of a network's config that decide which inputs it takes besides the sample (its
#: text width, class embeddings, added conditions): a guide model's must equal the model's
INTERFACE = ("num_class_embeds", "class_embed_type", "num_embeds_ada_norm",
             "cross_attention_dim", "encoder_hid_dim", "encoder_hid_dim_type",
             "addition_embed_type", "addition_time_embed_dim",
             "projection_class_embeddings_input_dim", "time_cond_proj_dim",
             "joint_attention_dim", "pooled_projection_dim", "caption_channels",
             "use_additional_conditions", "guidance_embeds")  # fmt: skip


class Conditioning(abc.ABC):
    """What one batch feeds the network on each guidance branch."""

    @abc.abstractmethod
    def inputs(self, branch: str, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
        """The network's keyword inputs for `branch` (KeyError for a branch it lacks)."""


class ModelFolder(abc.ABC):
    """A model folder of one family, read from its configs (see the module docstring)."""

    #: the family's name, recorded in run.json
    family: ClassVar[str]
    #: whether requests are prompts (text-to-image) rather than attribute labels
    takes_prompts: ClassVar[bool] = False
    #: a request's model options (``--model-option``), as `check_model_options` completed
    #: them; the plan sets them before anything reads the folder's shape or loads it
    model_options: Mapping[str, Any] = MappingProxyType({})
    #: a request's image size, ``(height, width)`` in pixels as `check_size` completed it;
    #: None: the family's default. The plan sets it before anything reads the shape
    image_size: tuple[int, int] | None = None
    #: the diffusers pipeline class whose LoRA loading (``load_lora_weights``) serves the
    #: family's networks (`toolkit.models.lora`); None: the family takes no LoRA
    lora_pipeline: ClassVar[str | None] = None
    #: a request's LoRAs (`toolkit.models.lora.Lora`), checked; `load` applies them
    loras: Sequence[Any] = ()

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    # -- what the configs say --------------------------------------------------------------

    @property
    @abc.abstractmethod
    def scheduler_config(self) -> dict[str, Any]:
        """The scheduler config the model was trained with (raw, with ``_class_name``)."""

    @property
    @abc.abstractmethod
    def sample_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) one sample is drawn in (latents for a latent model)."""

    @property
    def labels(self) -> LabelSpace | None:
        """The attributes requests condition on by label (None: none)."""
        return None

    @property
    def attributes(self) -> dict[str, list[str]]:
        """Attribute name -> values, what a guidance's ``assign`` hook may choose from
        (empty when attributes live in prompts)."""
        labels = self.labels
        return {} if labels is None else {a.name: list(a.values) for a in labels.attributes}

    def describe(self) -> dict[str, Any]:
        """The model as run.json records it."""
        labels = self.labels
        return {
            "path": str(self.path),
            "family": self.family,
            "sample_shape": list(self.sample_shape),
            "prediction_type": self.scheduler_config.get("prediction_type", "epsilon"),
            "attributes": labels.to_json()["attributes"] if labels else [],
        }

    # -- requests ------------------------------------------------------------------------

    @abc.abstractmethod
    def check_request(self, conditions: Sequence[Mapping[str, str]], prompt_given: bool,
                      negative_given: bool, options: Mapping[str, bool]) -> None:  # fmt: skip
        """Refuse what the family cannot do with a request: conditions (the distinct ones
        given), whether a prompt and a negative prompt were given, and the memory options
        (``attention_slicing``, ``vae_tiling``) and whether each is set."""

    def check_model_options(self, options: Mapping[str, Any], from_strings: bool = False
                            ) -> dict[str, Any]:  # fmt: skip
        """A request's model options (``--model-option KEY=VALUE``: what the network is
        given besides the sample, such as a distilled model's guidance scale) checked,
        converted (from command-line strings with `from_strings`) and completed with the
        family's defaults: what run.json records and `load` uses. A family without
        options refuses any."""
        if options:
            raise DtkError(f"{self.path}: a {self.family} model takes no model options; got "
                           f"{next(iter(options))!r}")  # fmt: skip
        return {}

    def check_size(self, height: int | None, width: int | None) -> tuple[int, int] | None:
        """A request's image size (``--height``/``--width`` in pixels, None: the default)
        checked: ``(height, width)`` with the family's default for a side left out, or None
        for the default size. A family with one trained size refuses any."""
        if height is None and width is None:
            return None
        raise DtkError(f"{self.path}: a {self.family} model samples at the one size it was "
                       "trained at; --width/--height apply to Stable Diffusion, SDXL, SD 3, "
                       "Flux and PixArt folders")  # fmt: skip

    @abc.abstractmethod
    def default_guidance(self, conditional: bool) -> tuple[str, dict[str, Any]]:
        """The guidance (name, options) a request gets when it names none."""

    def default_schedule_options(self) -> dict[str, Any]:
        """The options of the default schedule (applied when a request names no schedule;
        its own ``--schedule-option``s add to them)."""
        return {}

    def default_sampling(self) -> tuple[str, str, int]:
        """The (sampler, schedule, steps) a request gets for each of them it leaves at None:
        the toolkit's defaults (`toolkit.defaults`), unless the family samples otherwise
        (a rectified-flow family: its pipeline's own sampler and steps)."""
        return defaults.SAMPLER, defaults.SCHEDULE, defaults.STEPS

    @abc.abstractmethod
    def check_guidance(self, branches: set[str], text_branches: Mapping[str, str],
                       conditional: bool, name: str) -> None:  # fmt: skip
        """Refuse guidance the model or request cannot serve: `branches` a guidance asks
        for, the prompts of its own `text_branches`, whether the request is conditional."""

    def check_perturbations(self, perturbations: Mapping[str, Any], name: str) -> None:
        """Refuse a guidance's perturbed branches (branch -> `toolkit.Perturbation`) the
        network cannot run: each one's layers are resolved on the network built from its
        config on the meta device, without weights (`toolkit.models.attention`)."""
        from toolkit.models import attention

        attention.check(attention.skeleton(self), perturbations, name)

    @property
    def network_config(self) -> dict[str, Any]:
        """The denoising network's config (a UNet's or a transformer's; empty if none)."""
        config = getattr(self, "unet_config", None) or getattr(self, "transformer_config", None)
        return dict(config or {})

    def network_files(self) -> list[pathlib.Path]:
        """The files of the denoising network's folder (config and weights), which a guide
        model's recorded sha256 covers."""
        folder = getattr(self, "unet_dir", None)
        if folder is None:
            parts = [self.path / part for part in ("unet", "transformer")]
            folder = next((part for part in parts if part.is_dir()), self.path)
        return sorted(f for f in pathlib.Path(folder).iterdir() if f.is_file())

    def check_guide(self, guide: ModelFolder, name: str) -> None:
        """Refuse a guide model folder (a guidance's ``guide_models``) whose network cannot
        stand in for this model's on a branch: another family, another sample shape, other
        labels, or a network that takes other inputs (`INTERFACE`). `guide` has this
        model's model options and image size already."""
        where = f"guidance {name!r}: guide {guide.path}"
        if type(guide) is not type(self):
            raise DtkError(f"{where} is a {guide.family} model; a guide model is of the "
                           f"model's family ({self.family})")  # fmt: skip
        if guide.sample_shape != self.sample_shape:
            shapes = ["x".join(map(str, f.sample_shape)) for f in (guide, self)]
            raise DtkError(f"{where} samples {shapes[0]}; the model samples {shapes[1]}")
        labels = [None if f.labels is None else f.labels.to_json() for f in (guide, self)]
        if labels[0] != labels[1]:
            raise DtkError(f"{where} is conditioned on other labels than the model (its "
                           "toolkit.json or class count differ)")  # fmt: skip
        theirs, mine = guide.network_config, self.network_config
        for key in INTERFACE:
            if theirs.get(key) != mine.get(key):
                raise DtkError(f"{where}: its network's {key} is {theirs.get(key)!r}, the "
                               f"model's {mine.get(key)!r}; a guide takes the model's "
                               "inputs")  # fmt: skip

    def validate(self, condition: Mapping[str, str]) -> dict[str, str]:
        """One sample's condition checked against the model (values as strings)."""
        return {str(k): str(v) for k, v in condition.items()}

    def folder_name(self, sample: SampleRequest, attribute_order: Sequence[str]) -> str:
        """The class subfolder one sample's image is written to (a safe name)."""
        from toolkit.conditions.labels import folder_name

        return folder_name(sample.conditions, list(attribute_order))

    def attribute_order(self, conditions: Sequence[Mapping[str, str]]) -> list[str]:
        """The metadata's attribute columns, in order."""
        labels = self.labels
        if labels is not None:
            return labels.names
        return list(dict.fromkeys(k for c in conditions for k in c))

    # -- weights -------------------------------------------------------------------------

    @abc.abstractmethod
    def load(self, *, device: Any, dtype: Any, trust_pickle: bool = False,
             attention_slicing: bool = False, vae_tiling: bool = False) -> Model:  # fmt: skip
        """The weights, on `device` in `dtype`: the runnable `Model`."""


class Model(abc.ABC):
    """A loaded model of one family: the denoiser in sigma space (see the module docstring)."""

    folder: ModelFolder
    noise_levels: NoiseLevels
    #: a learned-variance model's predicted variance for its last `denoise` call: the
    #: network's variance channels as they are (``[B, C, H, W]``, read per the scheduler
    #: config's ``variance_type``); None for a model that predicts none. `GuidedDenoiser`
    #: hands the samplers that use it (``ddpm``) the ``cond`` branch's share as its own
    #: ``variance``; every other sampler ignores it.
    variance: torch.Tensor | None = None

    @property
    def scheduler_config(self) -> dict[str, Any]:
        return self.folder.scheduler_config

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return self.folder.sample_shape

    @property
    @abc.abstractmethod
    def device(self) -> torch.device:
        """Where the network runs."""

    @abc.abstractmethod
    def denoise(self, x: torch.Tensor, sigma: Any, **inputs: torch.Tensor) -> torch.Tensor:
        """The clean-image estimate of samples `x` at noise level `sigma` (float, 0-d or
        [B]), given a branch's network `inputs` (from a `Conditioning`)."""

    @abc.abstractmethod
    def prior(self, eps: torch.Tensor, sigma: float) -> torch.Tensor:
        """A sample of the model's prior at `sigma` made from standard normal `eps`."""

    @abc.abstractmethod
    def conditioning(self, batch: Sequence[SampleRequest],
                     text_branches: Mapping[str, str]) -> Conditioning:  # fmt: skip
        """The network inputs of `batch` on every branch (and on a guidance's own prompt
        branches, `text_branches`, for a text model)."""

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Clean samples -> images in [-1, 1] (latents through the VAE; pixels as they are)."""
        return x0

    def perturbed(self, rows: Mapping[range, Any]) -> contextlib.AbstractContextManager:
        """A context in which `denoise` runs each `range` of batch rows in `rows` through
        the network perturbed as its `toolkit.Perturbation` says (the other rows as
        usual): a guidance's perturbed branches (`GuidedDenoiser`)."""
        raise DtkError(f"a {self.folder.family} model cannot run perturbed guidance branches")

    def output_space(self, x: torch.Tensor, sigma: Any
                     ) -> tuple[torch.Tensor, torch.Tensor] | None:  # fmt: skip
        """``(a, b)`` with ``denoise(x, sigma) = a + b * output`` for the network's raw
        `output` at samples `x` and noise level `sigma` (both shaped like `x`; b is 0 only
        where the output does not matter, at sigma 0), which a guidance combining raw outputs
        needs (its ``space``, docs/plugins.md); None for a model that does not say, where
        such a guidance is refused."""
        return None


def refuse_unknown_branches(name: str, branches: set[str], allowed: set[str]) -> None:
    unknown = branches - allowed
    if unknown:
        raise DtkError(f"guidance {name!r} asks for unknown branches {sorted(unknown)}")


class NetworkModel(Model):
    """A model whose network runs through a sigma-space parameterization (`VP`, `Flow` in
    `toolkit.models.parameterization`): ``inputs(x, sigma)`` gives the network's input and
    timestep, ``denoised(x, sigma, out)`` the clean estimate from its output, ``prior``
    the start. A family calls its network in `forward` (positional, as a UNet takes it)."""

    def __init__(self, folder: ModelFolder, network: Any, noise_levels: Any,
                 parameterization: Any) -> None:  # fmt: skip
        self.folder = folder
        self.network = network
        self.noise_levels = noise_levels
        self.parameterization = parameterization
        self.dtype = next(network.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return self.network.device

    def forward(self, x_in: torch.Tensor, t: torch.Tensor, **inputs: torch.Tensor
                ) -> torch.Tensor:  # fmt: skip
        """The network's raw output at input `x_in` and timestep `t`."""
        return self.network(x_in, t, **inputs, return_dict=False)[0]

    def denoise(self, x: torch.Tensor, sigma: Any, **inputs: torch.Tensor) -> torch.Tensor:
        x_in, t = self.parameterization.inputs(x, sigma)
        # the network's precision for its float inputs (text embeddings); labels stay ints
        inputs = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        out = self.forward(x_in.to(self.dtype), t, **inputs)
        return self.parameterization.denoised(x, sigma, out)

    def prior(self, eps: torch.Tensor, sigma: float) -> torch.Tensor:
        return self.parameterization.prior(eps, sigma)

    def perturbed(self, rows: Mapping[range, Any]) -> contextlib.AbstractContextManager:
        from toolkit.models.attention import perturbed

        return perturbed(self.network, rows)

    def output_space(self, x: torch.Tensor, sigma: Any
                     ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        # every parameterization's estimate is affine in the output, with a slope that
        # depends on sigma alone (Karras et al.'s c_skip x + c_out F; a flow model at
        # sigma = inf too: x - v), so probes of `denoised` give it without per-family code;
        # the slope is probed at x = 0, where no rounding against x blurs it
        zeros, ones = x.new_zeros(x.shape), x.new_ones(x.shape)
        a = self.parameterization.denoised(x, sigma, zeros)
        b = self.parameterization.denoised(zeros, sigma, ones)
        b = b - self.parameterization.denoised(zeros, sigma, zeros)
        return a, b


class VPModel(NetworkModel):
    """A model whose network is a discrete-time VP denoiser (`VP`): the UNet families."""

    def __init__(self, folder: ModelFolder, network: Any) -> None:
        from toolkit.models.noise import NoiseLevels
        from toolkit.models.parameterization import VP

        levels = NoiseLevels.from_scheduler_config(folder.scheduler_config)
        prediction = folder.scheduler_config.get("prediction_type", "epsilon")
        super().__init__(folder, network, levels, VP(levels, prediction))
