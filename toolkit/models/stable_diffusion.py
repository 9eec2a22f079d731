"""The Stable-Diffusion family (1.x/2.x): text-to-image latent diffusion.

The folder is what ``StableDiffusionPipeline.save_pretrained`` writes: ``model_index.json``,
``unet/`` (a ``UNet2DConditionModel``), ``vae/`` (an ``AutoencoderKL``), ``text_encoder/``
(a ``CLIPTextModel``) with ``tokenizer/``, and ``scheduler/``. Sampling runs in the VAE's
latent space; prompts become the UNet's ``encoder_hidden_states`` exactly as diffusers'
``StableDiffusionPipeline`` computes them, so the same scheduler, seeds and prompts give the
same images. Weights load from safetensors; pickled weights only with ``trust_pickle=True``.

What any text-to-image latent family shares lives here too, and the SD 3 and SDXL families
(`toolkit.models.sd3`, `toolkit.models.sdxl`) use it: `TextFolder` (prompted requests,
guidance), loading a pipeline's components (`load_part`; a UNet and its VAE:
`load_unet_vae`), CLIP encoders' penultimate hidden states (`penultimate_states`),
`PromptEmbeddings` (each distinct prompt encoded once), `TextConditioning` and
`decode_latents`.
"""

from __future__ import annotations

import abc
import collections
import functools
import logging
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from toolkit import defaults
from toolkit.errors import DtkError
from toolkit.lazy import lazy_import
from toolkit.models.family import COND, UNCOND, Conditioning, ModelFolder, VPModel
from toolkit.models.family import refuse_unknown_branches as _refuse_unknown
from toolkit.models.loading import (
    check_prediction_type,
    load_failure,
    quiet_transformers,
    read_config,
    unet_shape,
    use_safetensors,
)
from toolkit.models.lora import apply_loras

if TYPE_CHECKING:
    import torch

    from toolkit.registry.protocols import SampleRequest
else:
    torch = lazy_import("torch")

log = logging.getLogger(__name__)

#: weights file stem of each component
SAFE = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
        "text_encoder": "model"}  # fmt: skip
#: what a folder must hold: (component, its config file or None for a folder)
PARTS = (("unet", "config.json"), ("vae", "config.json"), ("text_encoder", "config.json"),
         ("tokenizer", None), ("scheduler", "scheduler_config.json"))  # fmt: skip
TEXT_UNETS = ("UNet2DConditionModel",)
#: classifier-free guidance of a prompted request when none is named, as diffusers' pipeline
DEFAULT_CFG_SCALE = defaults.TEXT_CFG_SCALE


def prompt_folder(prompt: str, limit: int = 60) -> str:
    """The class subfolder of a prompted sample: the prompt made a safe, bounded name
    (image-folder loaders then label each image with its prompt)."""
    words = "".join(c if c.isalnum() or c in "-_." else "_" for c in prompt.strip())
    return words[:limit].strip("._") or "prompt"


def check_parts(path: pathlib.Path, parts: Sequence[tuple[str, str | None]]) -> None:
    """Refuse a pipeline folder that lacks one of `parts` ((component, its config file, or
    None for a folder))."""
    for part, config in parts:
        folder = path / part
        if not folder.is_dir() or (config is not None and not (folder / config).is_file()):
            missing = f"{part}/" if config is None else f"{part}/{config}"
            raise DtkError(f"{path}: a text-to-image pipeline folder needs {missing}")


def load_part(path: pathlib.Path, part: str, cls: Any, stem: str, *, device: Any, dtype: Any,
              trust_pickle: bool, **kwargs: Any) -> Any:  # fmt: skip
    """Component `part` of a pipeline folder (weights file `stem`), frozen, on `device`."""
    folder = path / part
    safe = use_safetensors(folder, stem, trust_pickle)
    try:
        module = cls.from_pretrained(folder, use_safetensors=safe, local_files_only=True,
                                     torch_dtype=dtype, **kwargs)  # fmt: skip
    except Exception as exc:  # loaders raise many types for a damaged folder
        raise load_failure(folder, part, exc) from None
    # diffusers may keep a float32 checkpoint's weights in float32 whatever `torch_dtype`
    # says (0.42: SD 3's transformer with low_cpu_mem_usage=False, whose state dict it
    # assigns rather than copies); a module that keeps no part in float32 on purpose is
    # cast, as the pipeline's loading leaves it (torch's own `to`: diffusers' warns)
    keeps_float32 = getattr(module, "_keep_in_fp32_modules", None)
    if dtype is not None and not keeps_float32 and any(
            p.dtype != dtype for p in module.parameters() if p.is_floating_point()):  # fmt: skip
        torch.nn.Module.to(module, dtype=dtype)
    return module.eval().requires_grad_(False).to(device=device)


def load_tokenizer(path: pathlib.Path, part: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path / part, local_files_only=True)
    except Exception as exc:  # a broken tokenizer folder can fail in many ways
        raise load_failure(path / part, part, exc) from None


def load_unet_vae(folder: TextFolder, *, device: Any, dtype: Any, trust_pickle: bool,
                  attention_slicing: bool, vae_tiling: bool) -> tuple[Any, Any]:  # fmt: skip
    """A latent UNet family's ``unet/`` (``UNet2DConditionModel``) and ``vae/``
    (``AutoencoderKL``, in `vae_dtype`), with sliced attention and VAE tiling as asked."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    stem = SAFE["unet"]
    unet = load_part(folder.path, "unet", UNet2DConditionModel, stem, device=device, dtype=dtype,
                     trust_pickle=trust_pickle, low_cpu_mem_usage=False)  # fmt: skip
    vae = load_part(folder.path, "vae", AutoencoderKL, stem, device=device,
                    dtype=vae_dtype(dtype, folder.vae_config), trust_pickle=trust_pickle,
                    low_cpu_mem_usage=False)  # fmt: skip
    if attention_slicing:
        unet.set_attention_slice("auto")
    if vae_tiling:
        vae.enable_tiling()
    return unet, vae


def vae_dtype(dtype: Any, vae_config: Mapping[str, Any]) -> Any:
    """The VAE's precision: SD's VAEs overflow in float16 (their config says force_upcast),
    as diffusers knows."""
    upcast = dtype == torch.float16 and vae_config.get("force_upcast", False)
    return torch.float32 if upcast else dtype


class TextFolder(ModelFolder):
    """What text-to-image latent families share: prompted requests (refused without a
    prompt when they carry conditions), classifier-free guidance by default at `cfg_scale`,
    guidance checked against the cond/uncond branches and a guidance's own prompts, prompt
    subfolders, and the image shape from the VAE config (`vae_config`, set by the family).

    Size: a family gives the latent shape it was trained at (`default_sample_shape`); a
    request's ``--height``/``--width`` (`check_size`: positive multiples of the VAE's scale
    factor times the network's `latent_patch`) replace its sides in `sample_shape`."""

    takes_prompts = True
    #: classifier-free guidance scale of a prompted request that names no guidance
    cfg_scale: ClassVar[float] = DEFAULT_CFG_SCALE
    vae_config: dict[str, Any]

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_config.get("block_out_channels", [0])) - 1)

    @property
    @abc.abstractmethod
    def default_sample_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the latents at the family's default size."""

    @property
    def latent_patch(self) -> int:
        """The side of the network's latent patches (a UNet: 1), which a latent side must
        be a multiple of."""
        return 1

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        channels, height, width = self.default_sample_shape
        if self.image_size is not None:
            factor = self.vae_scale_factor
            height, width = self.image_size[0] // factor, self.image_size[1] // factor
        return (channels, height, width)

    def check_size(self, height: int | None, width: int | None) -> tuple[int, int] | None:
        """``(height, width)`` in pixels: each given side a positive multiple of the VAE's
        scale factor times the latent patch, the default's for a side left out; None for the
        default size (asked for by name or not: the same run)."""
        if height is None and width is None:
            return None
        factor, patch = self.vae_scale_factor, self.latent_patch
        _, default_height, default_width = self.default_sample_shape
        size = []
        for side, value, default in (("height", height, default_height),
                                     ("width", width, default_width)):  # fmt: skip
            if value is None:
                size.append(default * factor)
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise DtkError(f"--{side} {value!r}: give a whole number of pixels")
            multiple = factor * patch
            if value < multiple or value % multiple:
                why = f"the VAE's scale factor {factor}"
                if patch > 1:
                    why += f" times the {patch}x{patch} latent patches"
                raise DtkError(f"--{side} {value}: an image side of this {self.family} model "
                               f"is a positive multiple of {multiple} ({why})")  # fmt: skip
            size.append(value)
        if size == [default_height * factor, default_width * factor]:
            return None
        self.check_latent_size(size[0] // factor, size[1] // factor)
        return (size[0], size[1])

    def check_latent_size(self, height: int, width: int) -> None:
        """Refuse a latent size the network cannot take (beyond the multiple)."""

    @property
    def image_shape(self) -> tuple[int, int, int]:
        _, height, width = self.sample_shape
        factor = self.vae_scale_factor
        return (int(self.vae_config.get("out_channels", 3)), height * factor, width * factor)

    def check_request(self, conditions: Sequence[Mapping[str, str]], prompt_given: bool,
                      negative_given: bool, options: Mapping[str, bool]) -> None:  # fmt: skip
        if any(conditions) and not prompt_given:
            raise DtkError(
                f"{self.path} is a text-to-image model: give --prompt (there --condition only "
                "annotates prompts with the attribute values they express)"
            )

    def default_guidance(self, conditional: bool) -> tuple[str, dict[str, Any]]:
        return ("cfg", {"scale": self.cfg_scale}) if conditional else ("none", {})

    def check_guidance(self, branches: set[str], text_branches: Mapping[str, str],
                       conditional: bool, name: str) -> None:  # fmt: skip
        if text_branches.keys() & {COND, UNCOND}:
            raise DtkError(f"guidance {name!r} may not redefine the cond/uncond branches")
        _refuse_unknown(name, branches, {COND, UNCOND, *text_branches})
        if UNCOND in branches and not conditional:
            raise DtkError(
                f"guidance {name!r} needs a prompt to guide towards: give --prompt "
                "(or --negative-prompt), or use --guidance none"
            )

    def folder_name(self, sample: SampleRequest, attribute_order: Sequence[str]) -> str:
        if sample.prompt:
            return prompt_folder(sample.prompt)
        return super().folder_name(sample, attribute_order)

    def check_guide(self, guide: ModelFolder, name: str) -> None:
        """A guide's network is handed this model's prompt embeddings: besides the family's
        checks, its text encoders and tokenizers must have the same configs and files
        (their weights are not compared, nor loaded for sampling)."""
        super().check_guide(guide, name)
        mine, theirs = _text_parts(self.path), _text_parts(guide.path)
        where = f"guidance {name!r}: guide {guide.path}"
        if mine != theirs:
            raise DtkError(f"{where} has text parts {', '.join(theirs) or 'none'}; the model "
                           f"{', '.join(mine) or 'none'}")  # fmt: skip
        for part in mine:
            differing = _differing_file(self.path / part, guide.path / part)
            if differing is not None:
                raise DtkError(f"{where}: its {part}/{differing} differs from the model's; a "
                               "guide takes the model's prompt embeddings, so its text "
                               "encoders and tokenizers are the model's")  # fmt: skip


#: file suffixes of weights, which a guide's text parts are not compared by
WEIGHTS_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5")
#: config keys that do not change what a text encoder or tokenizer computes
VOLATILE_KEYS = {"_name_or_path", "name_or_path", "transformers_version", "torch_dtype", "dtype",
                 "_commit_hash"}  # fmt: skip


def _text_parts(path: pathlib.Path) -> list[str]:
    """A pipeline folder's text encoder and tokenizer folders."""
    return sorted(d.name for d in path.iterdir()
                  if d.is_dir() and d.name.startswith(("text_encoder", "tokenizer")))  # fmt: skip


def _differing_file(mine: pathlib.Path, theirs: pathlib.Path) -> str | None:
    """The first file (weights aside) that two text parts do not share alike: JSON files
    compared without `VOLATILE_KEYS`, others byte for byte; None if they agree."""
    import json

    def files(folder: pathlib.Path) -> dict[str, pathlib.Path]:
        return {f.name: f for f in folder.iterdir()
                if f.is_file() and f.suffix not in WEIGHTS_SUFFIXES}  # fmt: skip

    ours, guide = files(mine), files(theirs)
    for name in sorted(ours.keys() | guide.keys()):
        if name not in ours or name not in guide:
            return name
        a, b = ours[name].read_bytes(), guide[name].read_bytes()
        if a == b:
            continue
        if name.endswith(".json"):
            try:
                docs = [json.loads(x) for x in (a, b)]
            except ValueError:
                return name
            if all(isinstance(d, dict) for d in docs):
                docs = [{k: v for k, v in d.items() if k not in VOLATILE_KEYS} for d in docs]
            if docs[0] == docs[1]:
                continue
        return name
    return None


class StableDiffusionFolder(TextFolder):
    """A Stable-Diffusion-style pipeline folder, read from its configs."""

    family = "stable-diffusion"
    lora_pipeline = "StableDiffusionPipeline"

    def __init__(self, path: pathlib.Path) -> None:
        super().__init__(path)
        check_parts(path, PARTS)
        self.unet_config = read_config(path / "unet" / "config.json")
        self.vae_config = read_config(path / "vae" / "config.json")
        self.text_config = read_config(path / "text_encoder" / "config.json")
        self._scheduler_config = read_config(path / "scheduler" / "scheduler_config.json")
        check_prediction_type(path, self._scheduler_config)
        unet_class = self.unet_config.get("_class_name")
        if unet_class not in TEXT_UNETS:
            raise DtkError(f"{path}: the UNet is a {unet_class}; a text-to-image pipeline "
                           "needs UNet2DConditionModel")  # fmt: skip
        width, hidden = self.unet_config.get("cross_attention_dim"), self.text_config.get(
            "hidden_size")  # fmt: skip
        if isinstance(width, int) and isinstance(hidden, int) and width != hidden:
            raise DtkError(f"{path}: the UNet attends to {width}-wide text features but the "
                           f"text encoder gives {hidden}")  # fmt: skip

    @property
    def scheduler_config(self) -> dict[str, Any]:
        return self._scheduler_config

    @property
    def default_sample_shape(self) -> tuple[int, int, int]:
        return unet_shape(self.unet_config)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "class": self.unet_config.get("_class_name"),
            "text_encoder": self.text_config.get("architectures", ["CLIPTextModel"])[0],
            "image_shape": list(self.image_shape),
        }

    # -- weights -------------------------------------------------------------------------

    def load(self, *, device: Any, dtype: Any, trust_pickle: bool = False,
             attention_slicing: bool = False, vae_tiling: bool = False
             ) -> StableDiffusion:  # fmt: skip
        from transformers import CLIPTextModel

        unet, vae = load_unet_vae(self, device=device, dtype=dtype, trust_pickle=trust_pickle,
                                  attention_slicing=attention_slicing,
                                  vae_tiling=vae_tiling)  # fmt: skip
        with quiet_transformers():
            text_encoder = load_part(self.path, "text_encoder", CLIPTextModel, SAFE["text_encoder"],
                                     device=device, dtype=dtype,
                                     trust_pickle=trust_pickle)  # fmt: skip
        tokenizer = load_tokenizer(self.path, "tokenizer")
        apply_loras(self, {"unet": unet, "text_encoder": text_encoder})
        return StableDiffusion(self, unet, vae, text_encoder, tokenizer)


class TextModel:
    """What a loaded text-to-image model shares (a mixin before its `Model` base): its
    prompts' embeddings (`prompts`, a `PromptEmbeddings` over its text encoders)."""

    prompts: PromptEmbeddings

    @property
    def encoded(self) -> int:
        """How many prompts went through the text encoders (each distinct prompt once)."""
        return self.prompts.encoded

    def release_text_encoders(self) -> None:
        """The text encoders leave the accelerator (`PromptEmbeddings.release`); the run
        calls it once the prompts are encoded, before sampling."""
        self.prompts.release()


class StableDiffusion(TextModel, VPModel):
    """A loaded Stable-Diffusion-style model: UNet, VAE, text encoder and tokenizer."""

    def __init__(self, folder: StableDiffusionFolder, unet: Any, vae: Any, text_encoder: Any,
                 tokenizer: Any) -> None:  # fmt: skip
        super().__init__(folder, unet)
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.prompts = PromptEmbeddings(self._encode, [text_encoder])

    @property
    def path(self) -> pathlib.Path:
        return self.folder.path

    @property
    def max_length(self) -> int:
        # tokenizers saved without a limit report a huge sentinel; the encoder's positions
        # are the real limit then
        limit = self.text_encoder.config.max_position_embeddings
        return min(int(self.tokenizer.model_max_length), limit)

    def conditioning(self, batch: Sequence[SampleRequest],
                     text_branches: Mapping[str, str]) -> TextConditioning:  # fmt: skip
        return TextConditioning.of(self.embed, batch, text_branches)

    def embed(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The UNet's ``encoder_hidden_states`` ``[B, L, D]`` for `prompts`; each distinct
        prompt goes through the text encoder once per model (cached), in one batched call."""
        return self.prompts(prompts)

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.max_length,
                                truncation=True, return_tensors="pt")  # fmt: skip
        warn_truncated(self.tokenizer, prompts, self.max_length)
        device = self.text_encoder.device
        mask = None
        if self.text_encoder.config.to_dict().get("use_attention_mask", False):
            mask = tokens.attention_mask.to(device)
        hidden = self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
        return {"encoder_hidden_states": hidden.to(self.dtype)}

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] through the VAE (``latents / scaling_factor``)."""
        return decode_latents(self.vae, latents)


def decode_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [-1, 1]: ``vae.decode(latents / scaling_factor + shift_factor)``
    (SD 3's VAE has a shift; SD 1.x/2.x's has none), as diffusers' pipelines decode."""
    scaled = latents / vae.config.scaling_factor
    shift = vae.config.get("shift_factor", None)
    if shift is not None:
        scaled = scaled + shift
    return vae.decode(scaled.to(vae.dtype), return_dict=False)[0].float()


def penultimate_states(clips: Sequence[tuple[Any, Any]], prompts: Sequence[str],
                       length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
    """Each CLIP text encoder of `clips` ((encoder, tokenizer) pairs) on `prompts` padded to
    `length` tokens: (its first output, the last hidden state or a projection's pooled
    embedding; its penultimate hidden states), the text SD 3's and SDXL's pipelines take."""
    warn_truncated(clips[0][1], prompts, length)  # every CLIP cuts at the one length
    outputs = []
    for encoder, tokenizer in clips:
        tokens = tokenizer(list(prompts), padding="max_length", max_length=length,
                           truncation=True, return_tensors="pt")  # fmt: skip
        out = encoder(tokens.input_ids.to(encoder.device), output_hidden_states=True)
        outputs.append((out[0], out.hidden_states[-2]))
    return outputs


def warn_truncated(tokenizer: Any, prompts: Sequence[str], max_length: int) -> None:
    """Log each of `prompts` longer than the text encoder's `max_length` tokens."""
    lengths = [len(ids) for ids in tokenizer(list(prompts)).input_ids]
    for prompt, length in zip(prompts, lengths):
        if length > max_length:
            log.warning("prompt truncated to the text encoder's %d tokens: %r", max_length, prompt)


class PromptEmbeddings:
    """A text model's network inputs per prompt, each distinct prompt encoded once per model
    while it is kept: ``encode(prompts) -> {input name: [len(prompts), ...]}`` is called on
    the prompts not kept, in one batched call, and its rows are kept on the CPU (a batch's
    rows go to the accelerator once, in `TextConditioning`), the `capacity` most recently
    used ones: a run of a million distinct prompts does not hold a million embeddings
    (the run encodes a window of at most `toolkit.generation.run.WINDOW_PROMPTS` at a
    time; a prompt every batch uses, such as the empty one, stays).

    The text encoders (`encoders`) run where they were loaded, the model's device (`home`).
    `release` moves them to the CPU when that is an accelerator, once the prompts are encoded
    (the run encodes every distinct prompt it has, then releases them before sampling:
    docs/models.md, "Text encoders and memory"); a prompt not seen yet brings them back first.
    """

    #: how many prompts' rows are kept (twice a run's window, and room for a guidance's own)
    capacity = 1024

    def __init__(self, encode: Any, encoders: Sequence[Any] = ()) -> None:
        self._encode = encode
        self._rows: collections.OrderedDict[str, dict[str, torch.Tensor]] = (
            collections.OrderedDict())  # fmt: skip
        #: how many prompts went through the encoders
        self.encoded = 0
        self.encoders = [encoder for encoder in encoders if encoder is not None]
        #: the device the encoders run on (None: no encoders)
        self.home = self.encoders[0].device if self.encoders else None
        #: whether `release` moved the encoders to the CPU
        self.released = False

    def __call__(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``{input name: [len(prompts), ...]}`` for `prompts`, in order (on the CPU)."""
        wanted = list(dict.fromkeys(prompts))
        missing = [p for p in wanted if p not in self._rows]
        if missing:
            self._fetch()
            encoded = {name: rows.to("cpu") for name, rows in self._encode(missing).items()}
            self.encoded += len(missing)
            for i, prompt in enumerate(missing):
                self._rows[prompt] = {name: rows[i] for name, rows in encoded.items()}
        for prompt in wanted:  # most recently used last
            self._rows.move_to_end(prompt)
        names = self._rows[prompts[0]].keys()
        stacked = {name: torch.stack([self._rows[p][name] for p in prompts]) for name in names}
        while len(self._rows) > max(self.capacity, len(wanted)):
            self._rows.popitem(last=False)
        return stacked

    def release(self) -> None:
        """Move the encoders to the CPU if they run on an accelerator (no-op on the CPU)."""
        if self.released or self.home is None or self.home.type == "cpu":
            return
        for encoder in self.encoders:
            encoder.to("cpu")
        self.released = True

    def _fetch(self) -> None:
        """The encoders back on their device, if `release` moved them."""
        if self.released:
            for encoder in self.encoders:
                encoder.to(self.home)
            self.released = False


#: in a guidance's text branch, where each sample's own prompt goes
PROMPT_FIELD = "{prompt}"


class TextConditioning(Conditioning):
    """Branch inputs of a text model, ``{input name: [B, ...]}``: per-sample prompt
    embeddings (``cond``) and negative prompt embeddings (``uncond``; the empty prompt's when
    there is none); SD's UNet takes ``encoder_hidden_states``, SD 3's transformer also
    ``pooled_projections``. A branch's inputs may be given as a function that computes them,
    called when the branch is first asked for (`of`: ``uncond``, which guidance without an
    unconditional branch never asks for); each branch moves to a device once.

    `extra` holds the inputs of a guidance's own `text_branches` (one prompt each, shared by
    the whole batch), ``[1, ...]``; they are expanded to the batch here. A branch whose
    prompt holds ``{prompt}`` is per sample instead: each sample's own prompt put in its
    place (fair's ``"{prompt} on {value} paper"``), computed when first asked for.
    """

    def __init__(self, cond: Mapping[str, torch.Tensor] | Callable[[], Mapping[str, Any]],
                 uncond: Mapping[str, torch.Tensor] | Callable[[], Mapping[str, Any]],
                 extra: Mapping[str, Mapping[str, torch.Tensor]] | None = None
                 ) -> None:  # fmt: skip
        self.embeddings = {COND: cond, UNCOND: uncond}
        self.shared = dict(extra or {})
        self._moved: dict[tuple[str, int, str], dict[str, torch.Tensor]] = {}

    @classmethod
    def of(cls, embed: Any, batch: Sequence[SampleRequest], text_branches: Mapping[str, str],
           negative: Any = None) -> TextConditioning:  # fmt: skip
        """`batch`'s prompts and negative prompts (the empty prompt when none) through
        ``embed(prompts) -> {input name: [len(prompts), ...]}`` (the negative prompts through
        `negative` when the family embeds them otherwise: SDXL's zeros for an empty one; when
        the ``uncond`` branch is first asked for), and a guidance's own prompts (sld's safety
        concept)."""
        cond = embed([sample.prompt or "" for sample in batch])
        negatives = [sample.negative_prompt or "" for sample in batch]
        uncond = functools.partial(negative or embed, negatives)
        shared, per_sample = {}, {}
        for name, prompt in text_branches.items():
            if PROMPT_FIELD in prompt:
                prompts = [prompt.replace(PROMPT_FIELD, sample.prompt or "") for sample in batch]
                per_sample[name] = functools.partial(embed, prompts)
            else:
                shared[name] = embed([prompt])
        made = cls(cond, uncond, shared)
        made.embeddings.update(per_sample)
        return made

    def inputs(self, branch: str, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
        key = (branch, batch, str(device))
        if key not in self._moved:
            if branch in self.shared:
                shared = self.shared[branch]
                moved = {k: v.expand(batch, *v.shape[1:]).to(device) for k, v in shared.items()}
            else:
                rows = self.embeddings[branch]
                if callable(rows):
                    rows = self.embeddings[branch] = rows()
                moved = {k: v.to(device) for k, v in rows.items()}
            self._moved[key] = moved
        return dict(self._moved[key])
