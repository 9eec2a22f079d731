"""The DiT family: class-conditional latent diffusion transformers (Peebles & Xie 2023).

The folder is what ``DiTPipeline`` loads: ``model_index.json`` (with the pipeline's
``id2label``, where the published folders keep the class names), ``transformer/`` (a
``DiTTransformer2DModel``; the published folders name it ``Transformer2DModel`` with
``norm_type`` ``ada_norm_zero``, which diffusers loads as the same model), ``vae/`` (an
``AutoencoderKL``) and ``scheduler/`` (DiT-XL-2's: ``DDIMScheduler``, linear betas).

Sampling is VP in the VAE's latent space, as the pipeline computes it: the transformer
sees ``x / sqrt(sigma^2 + 1)`` at the timestep of ``sigma`` and its class label, and
predicts epsilon; with learned sigma (``out_channels`` twice the latent's, every published
DiT) the mean's channels are used and the variance's dropped, as the pipeline drops them
(`toolkit.models.label_unet.mean_channels`; a scheduler config whose ``variance_type`` is
``learned``/``learned_range`` keeps them for ``ddpm``, as for a learned-variance UNet).

Requests condition on one attribute, ``class`` (`ClassNames`): its values are the class
names of ``id2label`` (``--condition class="golden retriever"``), the ids' numbers, or,
without ``id2label``, the numbers alone. The null class of classifier-free guidance is the
transformer's extra class embedding, id ``num_embeds_ada_norm`` (1000 on ImageNet DiTs,
which ``DiTPipeline`` hard-codes); a request without a class samples at it, unguided.

Guidance: ``DiTPipeline`` guides the epsilon of every latent channel,
``uncond + scale (cond - uncond)`` (the original DiT code guided the first three channels
only; diffusers no longer does), and epsilon is linear in the clean-image estimate at one
``x`` and ``sigma``, so the ``cfg`` guidance, which combines clean-image estimates, computes
the same thing. The default scale is the pipeline's 4.0.
"""

from __future__ import annotations

import dataclasses
import difflib
import pathlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from toolkit import defaults
from toolkit.conditions.labels import Attribute, LabelSpace
from toolkit.errors import DtkError
from toolkit.lazy import lazy_import
from toolkit.models.detect import LEARNED_VARIANCE
from toolkit.models.family import ModelFolder, VPModel
from toolkit.models.label_unet import (
    LabelConditioning,
    LabelUNetFolder,
    label_conditioning,
    mean_channels,
)
from toolkit.models.loading import check_prediction_type, read_config
from toolkit.models.stable_diffusion import check_parts, decode_latents, load_part, vae_dtype
from toolkit.models.twins import scheduler_twin

if TYPE_CHECKING:
    import torch

    from toolkit.registry.protocols import SampleRequest
else:
    torch = lazy_import("torch")

WEIGHTS_STEM = "diffusion_pytorch_model"
PARTS = (("transformer", "config.json"), ("vae", "config.json"),
         ("scheduler", "scheduler_config.json"))  # fmt: skip
#: the transformer classes of a DiT folder (``Transformer2DModel`` with this norm_type)
TRANSFORMERS = ("DiTTransformer2DModel", "Transformer2DModel")
NORM_TYPE = "ada_norm_zero"
#: ``DiTPipeline``'s guidance scale, and its num_inference_steps (its docstring still says
#: 250, the original DiT's; the signature's default is 50)
CFG_SCALE = 4.0
STEPS = 50
#: the attribute requests condition on
CLASS = "class"


@dataclasses.dataclass(frozen=True)
class ClassNames(LabelSpace):
    """A class-conditional model's classes by name: one attribute, ``class``, whose values
    are one name per class id, in id order (`values`), and which also takes every other
    name of a class and its id's number (`validate` turns them into the class's value).

    ``id2label`` maps an id to ``"name, other name, ..."`` (ImageNet's synonyms), as
    ``DiTPipeline.labels`` reads it. A class's value is its first name that names no other
    class; a class whose every name also names another one (ImageNet's two "crane"s) is
    ``"crane (134)"``. A name of several classes is refused, naming their ids (the pipeline
    maps it to the last id silently). Labels are the ids themselves, and the null label
    (unspecified class) is ``num_classes``, the transformer's extra class embedding.
    """

    #: every accepted name (values, other names, ids' numbers) -> the ids it names
    aliases: Mapping[str, tuple[int, ...]] = dataclasses.field(
        default_factory=dict, hash=False, compare=False
    )

    @classmethod
    def of(cls, num_classes: int, id2label: Mapping[Any, str] | None) -> ClassNames:
        """The classes of a model with `num_classes` embeddings named by `id2label`
        (``{id: "name, other name"}``, keys as int or str; None: the ids' numbers)."""
        names: dict[str, list[int]] = {}
        per_id: dict[int, list[str]] = {}
        for key, label in (id2label or {}).items():
            index = int(key) if str(key).isdigit() else -1
            if not 0 <= index < num_classes:
                raise DtkError(f"id2label names class {key!r}, but the model's classes are "
                               f"0..{num_classes - 1}")  # fmt: skip
            for name in str(label).split(","):
                name = name.strip()
                if name:
                    per_id.setdefault(index, []).append(name)
                    names.setdefault(name, []).append(index)
        values = []
        for index in range(num_classes):
            own = [n for n in per_id.get(index, []) if names[n] == [index]]
            if own:
                values.append(own[0])
            elif index in per_id:
                values.append(f"{per_id[index][0]} ({index})")
            else:
                values.append(str(index))
        accepted = {name: tuple(dict.fromkeys(ids)) for name, ids in names.items()}
        for index, value in enumerate(values):
            accepted.setdefault(value, (index,))
            accepted.setdefault(str(index), (index,))
        attribute = Attribute(CLASS, tuple(values), droppable=True)
        return cls((attribute,), accepted)

    @property
    def num_classes(self) -> int:
        return len(self.attributes[0].values)

    @property
    def num_labels(self) -> int:
        return self.num_classes + 1

    def validate(self, condition: Mapping[str, str]) -> dict[str, str]:
        """The condition with the class given by any of its names (or id) as its value."""
        result = {}
        for name, given in condition.items():
            attribute = self.attribute(name)
            result[name] = attribute.values[self._id(str(given))]
        return result

    def _id(self, given: str) -> int:
        ids = self.aliases.get(given)
        if ids is None:
            close = difflib.get_close_matches(given, list(self.aliases), n=5, cutoff=0.6)
            hint = f"; close: {', '.join(repr(c) for c in close)}" if close else ""
            raise DtkError(
                f"the model has no class {given!r}{hint} (give a class name of its "
                f"model_index.json id2label, or an id 0..{self.num_classes - 1})"
            )
        if len(ids) > 1:
            values = self.attributes[0].values
            raise DtkError(
                f"class {given!r} names {len(ids)} classes, "
                f"{', '.join(f'{i} ({values[i]!r})' for i in ids)}: give the one you mean by "
                f"its id or value, e.g. --condition class={ids[0]}"
            )
        return ids[0]

    def label(self, condition: Mapping[str, str]) -> int:
        value = self.validate(condition).get(CLASS)
        return self.num_classes if value is None else self.aliases[value][0]

    @property
    def null_label(self) -> int:
        return self.num_classes

    def decode(self, label: int) -> dict[str, str]:
        return {} if label == self.num_classes else {CLASS: self.attributes[0].values[label]}


def sampling_twin(scheduler_config: Mapping[str, Any], steps: int) -> tuple[str, str, int]:
    """The (sampler, schedule, `steps`) of a pipeline's scheduler: its twin
    (`toolkit.models.twins`: DiT-XL-2's DDIM is ``ddim`` on ``leading``, PixArt's DPM-Solver
    ``dpmpp_2m`` on ``linspace`` with ``variant=dpmsolver``), else the toolkit's sampler
    and schedule. `steps`: the pipeline's default."""
    twin = scheduler_twin(scheduler_config)
    if twin is None:
        return defaults.SAMPLER, defaults.SCHEDULE, steps
    return twin[0], twin[1], steps


def twin_schedule_options(scheduler_config: Mapping[str, Any]) -> dict[str, Any]:
    """The options of `sampling_twin`'s schedule."""
    twin = scheduler_twin(scheduler_config)
    return {} if twin is None else twin[2]


def transformer_config(path: pathlib.Path, classes: Sequence[str], norm_type: str,
                       family: str) -> dict[str, Any]:  # fmt: skip
    """The transformer's config, refused unless it is one of `classes` (the legacy
    ``Transformer2DModel`` only with `norm_type`, as diffusers remaps it)."""
    config = read_config(path / "transformer" / "config.json")
    cls = config.get("_class_name")
    legacy = cls == "Transformer2DModel"
    if cls not in classes or (legacy and config.get("norm_type") != norm_type):
        what = f"{cls} with norm_type {config.get('norm_type')!r}" if legacy else cls
        raise DtkError(f"{path}: the transformer is a {what}; a {family} folder needs "
                       f"{classes[0]}")  # fmt: skip
    size, patch = config.get("sample_size"), config.get("patch_size", 2)
    if not isinstance(size, int) or not isinstance(patch, int) or size % patch:
        raise DtkError(f"{path}: the transformer's sample_size {size!r} is not a multiple of "
                       f"its patch_size {patch!r}")  # fmt: skip
    return config


def check_latents(path: pathlib.Path, transformer: Mapping[str, Any],
                  vae: Mapping[str, Any]) -> None:  # fmt: skip
    channels, latent = transformer.get("in_channels", 4), vae.get("latent_channels", 4)
    if channels != latent:
        raise DtkError(f"{path}: the transformer takes {channels} latent channels but the VAE "
                       f"gives {latent}")  # fmt: skip
    out = transformer.get("out_channels") or channels
    if out not in (channels, 2 * channels):
        raise DtkError(f"{path}: the transformer outputs {out} channels for {channels} latent "
                       "channels: neither the epsilon alone nor with a learned sigma")  # fmt: skip


def transformer_shape(transformer: Mapping[str, Any]) -> tuple[int, int, int]:
    """(channels, height, width) of the latents a DiT-style transformer was trained at."""
    size = int(transformer["sample_size"])
    return (int(transformer.get("in_channels", 4)), size, size)


def learned_sigma(transformer: Mapping[str, Any], scheduler: Mapping[str, Any]
                  ) -> tuple[bool, bool]:  # fmt: skip
    """Whether a DiT-style transformer outputs a learned sigma after the epsilon (twice the
    latent channels; the sigma is dropped), and whether the scheduler config says to sample
    with it (``ddpm``: `toolkit.models.family.Model.variance`)."""
    sigma = transformer.get("out_channels") == 2 * transformer_shape(transformer)[0]
    return sigma, sigma and scheduler.get("variance_type") in LEARNED_VARIANCE


class DiTFolder(ModelFolder):
    """A ``DiTPipeline`` folder, read from its configs."""

    family = "dit"

    def __init__(self, path: pathlib.Path) -> None:
        super().__init__(path)
        check_parts(path, PARTS)
        index = read_config(path / "model_index.json")
        self.transformer_config = transformer_config(path, TRANSFORMERS, NORM_TYPE, "DiT")
        self.vae_config = read_config(path / "vae" / "config.json")
        self._scheduler_config = read_config(path / "scheduler" / "scheduler_config.json")
        check_prediction_type(path, self._scheduler_config)
        check_latents(path, self.transformer_config, self.vae_config)
        num_classes = self.transformer_config.get("num_embeds_ada_norm")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise DtkError(f"{path}: the transformer's num_embeds_ada_norm {num_classes!r} is "
                           "not a number of classes")  # fmt: skip
        id2label = index.get("id2label")
        if id2label is not None and not isinstance(id2label, dict):
            raise DtkError(f"{path / 'model_index.json'}: id2label is not a JSON object")
        self._labels = ClassNames.of(num_classes, id2label)
        #: whether the transformer outputs a learned sigma (dropped), and samples with it
        self.learned_sigma, self.learned_variance = learned_sigma(
            self.transformer_config, self._scheduler_config)  # fmt: skip

    @property
    def scheduler_config(self) -> dict[str, Any]:
        return self._scheduler_config

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return transformer_shape(self.transformer_config)

    @property
    def labels(self) -> ClassNames:
        return self._labels

    @property
    def image_shape(self) -> tuple[int, int, int]:
        factor = 2 ** (len(self.vae_config.get("block_out_channels", [0])) - 1)
        _, height, width = self.sample_shape
        return (int(self.vae_config.get("out_channels", 3)), height * factor, width * factor)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "class": self.transformer_config.get("_class_name"),
            "num_classes": self._labels.num_classes,
            "learned_sigma": self.learned_sigma,
            "image_shape": list(self.image_shape),
        }

    # -- requests (a label model's: the label-UNet family's checks) ----------------------

    validate = LabelUNetFolder.validate
    check_guidance = LabelUNetFolder.check_guidance

    def check_request(self, conditions: Sequence[Mapping[str, str]], prompt_given: bool,
                      negative_given: bool, options: Mapping[str, bool]) -> None:  # fmt: skip
        if prompt_given or negative_given:
            option = "--prompt" if prompt_given else "--negative-prompt"
            raise DtkError(f"{self.path} takes no {option}: DiT is class-conditional (use "
                           "--condition class=NAME)")  # fmt: skip
        if options.get("attention_slicing"):
            raise DtkError(f"{self.path}: the DiT transformer has no sliced attention; drop "
                           "--attention-slicing (a smaller --batch-size saves memory)")  # fmt: skip
        for condition in conditions:
            self.validate(condition)

    def default_guidance(self, conditional: bool) -> tuple[str, dict[str, Any]]:
        return ("cfg", {"scale": CFG_SCALE}) if conditional else ("none", {})

    def default_sampling(self) -> tuple[str, str, int]:
        """The pipeline's: DiT-XL-2's DDIM is ``ddim`` on ``leading``, 50 steps
        (`sampling_twin`)."""
        return sampling_twin(self._scheduler_config, STEPS)

    def default_schedule_options(self) -> dict[str, Any]:
        return twin_schedule_options(self._scheduler_config)

    # -- weights -------------------------------------------------------------------------

    def load(self, *, device: Any, dtype: Any, trust_pickle: bool = False,
             attention_slicing: bool = False, vae_tiling: bool = False) -> DiT:  # fmt: skip
        from diffusers import AutoencoderKL, DiTTransformer2DModel

        transformer = load_part(self.path, "transformer", DiTTransformer2DModel, WEIGHTS_STEM,
                                device=device, dtype=dtype, trust_pickle=trust_pickle,
                                low_cpu_mem_usage=False)  # fmt: skip
        vae = load_part(self.path, "vae", AutoencoderKL, WEIGHTS_STEM, device=device,
                        dtype=vae_dtype(dtype, self.vae_config), trust_pickle=trust_pickle,
                        low_cpu_mem_usage=False)  # fmt: skip
        if vae_tiling:
            vae.enable_tiling()
        return DiT(self, transformer, vae)


class DiT(VPModel):
    """A loaded DiT: the transformer (VP, epsilon; its learned sigma dropped) and the VAE."""

    def __init__(self, folder: DiTFolder, transformer: Any, vae: Any) -> None:
        super().__init__(folder, transformer)
        self.transformer, self.vae = transformer, vae

    @property
    def labels(self) -> ClassNames:
        return self.folder.labels

    def forward(self, x_in: torch.Tensor, t: torch.Tensor, **inputs: torch.Tensor
                ) -> torch.Tensor:  # fmt: skip
        out = self.transformer(x_in, timestep=t, class_labels=inputs["class_labels"],
                               return_dict=False)[0]  # fmt: skip
        if self.folder.learned_sigma:
            return mean_channels(self, out, keep_variance=self.folder.learned_variance)
        return out

    def conditioning(self, batch: Sequence[SampleRequest],
                     text_branches: Mapping[str, str]) -> LabelConditioning:  # fmt: skip
        return label_conditioning(self.labels, batch, self.device)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1]: ``vae.decode(latents / scaling_factor)``."""
        return decode_latents(self.vae, latents)
