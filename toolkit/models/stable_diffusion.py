"""The Stable-Diffusion family (1.x/2.x): text-to-image latent diffusion.

The folder is what ``StableDiffusionPipeline.save_pretrained`` writes: ``model_index.json``,
``unet/`` (a ``UNet2DConditionModel``), ``vae/`` (an ``AutoencoderKL``), ``text_encoder/``
(a ``CLIPTextModel``) with ``tokenizer/``, and ``scheduler/``. Sampling runs in the VAE's
latent space; prompts become the UNet's ``encoder_hidden_states`` exactly as diffusers'
``StableDiffusionPipeline`` computes them, so the same scheduler, seeds and prompts give the
same images. Weights load from safetensors; pickled weights only with ``trust_pickle=True``.
"""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

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


class StableDiffusionFolder(ModelFolder):
    """A Stable-Diffusion-style pipeline folder, read from its configs."""

    family = "stable-diffusion"
    takes_prompts = True

    def __init__(self, path: pathlib.Path) -> None:
        super().__init__(path)
        for part, config in PARTS:
            folder = path / part
            if not folder.is_dir() or (config is not None and not (folder / config).is_file()):
                missing = f"{part}/" if config is None else f"{part}/{config}"
                raise DtkError(f"{path}: a text-to-image pipeline folder needs {missing}")
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
    def sample_shape(self) -> tuple[int, int, int]:
        return unet_shape(self.unet_config)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_config.get("block_out_channels", [0])) - 1)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        _, height, width = self.sample_shape
        factor = self.vae_scale_factor
        return (int(self.vae_config.get("out_channels", 3)), height * factor, width * factor)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "class": self.unet_config.get("_class_name"),
            "text_encoder": self.text_config.get("architectures", ["CLIPTextModel"])[0],
            "image_shape": list(self.image_shape),
        }

    # -- requests ------------------------------------------------------------------------

    def check_request(self, conditions: Sequence[Mapping[str, str]], prompt_given: bool,
                      negative_given: bool, options: Mapping[str, bool]) -> None:  # fmt: skip
        if any(conditions) and not prompt_given:
            raise DtkError(
                f"{self.path} is a text-to-image model: give --prompt (there --condition only "
                "annotates prompts with the attribute values they express)"
            )

    def default_guidance(self, conditional: bool) -> tuple[str, dict[str, Any]]:
        return ("cfg", {"scale": DEFAULT_CFG_SCALE}) if conditional else ("none", {})

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

    # -- weights -------------------------------------------------------------------------

    def load(self, *, device: Any, dtype: Any, trust_pickle: bool = False,
             attention_slicing: bool = False, vae_tiling: bool = False
             ) -> StableDiffusion:  # fmt: skip
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel

        def load(part: str, cls: Any, part_dtype: Any = dtype, **kwargs: Any) -> Any:
            folder = self.path / part
            safe = use_safetensors(folder, SAFE[part], trust_pickle)
            try:
                module = cls.from_pretrained(folder, use_safetensors=safe, local_files_only=True,
                                             torch_dtype=part_dtype, **kwargs)  # fmt: skip
            except Exception as exc:  # loaders raise many types for a damaged folder
                raise load_failure(folder, part, exc) from None
            return module.eval().requires_grad_(False).to(device=device)

        unet = load("unet", UNet2DConditionModel, low_cpu_mem_usage=False)
        # SD's VAE overflows in float16 (its config says force_upcast), as diffusers knows
        upcast = dtype == torch.float16 and self.vae_config.get("force_upcast", False)
        vae = load("vae", AutoencoderKL, torch.float32 if upcast else dtype,
                   low_cpu_mem_usage=False)  # fmt: skip
        with quiet_transformers():
            text_encoder = load("text_encoder", CLIPTextModel)
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.path / "tokenizer",
                                                      local_files_only=True)  # fmt: skip
        except Exception as exc:  # a broken tokenizer folder can fail in many ways
            raise load_failure(self.path / "tokenizer", "tokenizer", exc) from None
        if attention_slicing:
            unet.set_attention_slice("auto")
        if vae_tiling:
            vae.enable_tiling()
        return StableDiffusion(self, unet, vae, text_encoder, tokenizer)


class StableDiffusion(VPModel):
    """A loaded Stable-Diffusion-style model: UNet, VAE, text encoder and tokenizer."""

    def __init__(self, folder: StableDiffusionFolder, unet: Any, vae: Any, text_encoder: Any,
                 tokenizer: Any) -> None:  # fmt: skip
        super().__init__(folder, unet)
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        #: how many prompts went through the text encoder (each distinct prompt once per run)
        self.encoded = 0
        self._embeddings: dict[str, torch.Tensor] = {}

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
        cond = self.embed([sample.prompt or "" for sample in batch])
        uncond = self.embed([sample.negative_prompt or "" for sample in batch])
        # a guidance's own prompts (sld's safety concept), each encoded once per model
        extra = {name: self.embed([prompt]) for name, prompt in text_branches.items()}
        return TextConditioning(cond, uncond, extra)

    def embed(self, prompts: Sequence[str]) -> torch.Tensor:
        """The UNet's ``encoder_hidden_states`` ``[B, L, D]`` for `prompts`; each distinct
        prompt goes through the text encoder once per model (cached), in one batched call."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._embeddings]
        if missing:
            tokens = self.tokenizer(missing, padding="max_length", max_length=self.max_length,
                                    truncation=True, return_tensors="pt")  # fmt: skip
            self._warn_truncated(missing)
            device = self.text_encoder.device
            mask = None
            if self.text_encoder.config.to_dict().get("use_attention_mask", False):
                mask = tokens.attention_mask.to(device)
            hidden = self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
            self.encoded += len(missing)
            for prompt, row in zip(missing, hidden.to(self.unet.dtype)):
                self._embeddings[prompt] = row
        return torch.stack([self._embeddings[p] for p in prompts])

    def _warn_truncated(self, prompts: list[str]) -> None:
        lengths = [len(ids) for ids in self.tokenizer(prompts).input_ids]
        for prompt, length in zip(prompts, lengths):
            if length > self.max_length:
                log.warning(
                    "prompt truncated to the text encoder's %d tokens: %r", self.max_length, prompt
                )

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] through the VAE (``latents / scaling_factor``)."""
        scaled = latents / self.vae.config.scaling_factor
        return self.vae.decode(scaled.to(self.vae.dtype), return_dict=False)[0].float()


class TextConditioning(Conditioning):
    """Branch inputs of a text model: per-sample prompt embeddings (``cond``) and negative
    prompt embeddings (``uncond``; the empty prompt's when there is none), ``[B, L, D]``.

    `extra` holds the embeddings of a guidance's own `text_branches` (one prompt each, shared
    by the whole batch), ``[L, D]`` or ``[1, L, D]``; they are expanded to the batch here.
    """

    def __init__(self, cond: torch.Tensor, uncond: torch.Tensor,
                 extra: Mapping[str, torch.Tensor] | None = None) -> None:  # fmt: skip
        self.embeddings = {COND: cond, UNCOND: uncond}
        self.shared = {name: e.reshape(1, *e.shape[-2:]) for name, e in (extra or {}).items()}

    def inputs(self, branch: str, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
        if branch in self.shared:
            states = self.shared[branch].expand(batch, -1, -1)
        else:
            states = self.embeddings[branch]
        return {"encoder_hidden_states": states.to(device)}
