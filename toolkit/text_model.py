"""Loading a local Stable-Diffusion-style pipeline folder into a `TextModel`.

The folder is what ``StableDiffusionPipeline.save_pretrained`` writes: ``model_index.json``,
``unet/`` (a ``UNet2DConditionModel``), ``vae/`` (an ``AutoencoderKL``), ``text_encoder/``
(a ``CLIPTextModel``) with ``tokenizer/``, and ``scheduler/``. Sampling runs in the VAE's
latent space; prompts become the UNet's ``encoder_hidden_states`` exactly as diffusers'
``StableDiffusionPipeline`` computes them, so the same scheduler, seeds and prompts give the
same images. Weights load from safetensors; pickled weights only with ``trust_pickle=True``.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from toolkit._lazy import lazy_import
from toolkit.errors import DtkError
from toolkit.loading import (
    load_failure,
    quiet_transformers,
    read_config,
    scheduler_noise,
    use_safetensors,
)
from toolkit.noise import NoiseLevels

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_import("torch")

log = logging.getLogger(__name__)

SAFE = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
}
TEXT_UNETS = ("UNet2DConditionModel",)


def is_text_model(path: pathlib.Path) -> bool:
    """Whether a model folder is a text-conditioned pipeline (read from its configs only);
    a folder of a family dtk does not load is refused (`toolkit.families`)."""
    from toolkit.families import TEXT, detect_family

    return detect_family(path) == TEXT


@dataclasses.dataclass
class TextModel:
    """A text-conditioned latent diffusion model: UNet, VAE, text encoder and tokenizer."""

    path: pathlib.Path
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_levels: NoiseLevels
    prediction_type: str
    scheduler_config: dict[str, Any]
    labels: None = None
    takes_prompts: ClassVar[bool] = True
    #: how many prompts went through the text encoder (each distinct prompt once per run)
    encoded: int = 0
    _embeddings: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """The latent shape one sample is drawn in."""
        from toolkit.model import unet_sample_shape  # toolkit.model imports this module

        return unet_sample_shape(self.unet)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        _, height, width = self.sample_shape
        factor = self.vae_scale_factor
        return (self.vae.config.out_channels, height * factor, width * factor)

    @property
    def conditional(self) -> bool:
        return True

    @property
    def max_length(self) -> int:
        # tokenizers saved without a limit report a huge sentinel; the encoder's positions
        # are the real limit then
        limit = self.text_encoder.config.max_position_embeddings
        return min(int(self.tokenizer.model_max_length), limit)

    def describe(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "class": type(self.unet).__name__,
            "text_encoder": type(self.text_encoder).__name__,
            "prediction_type": self.prediction_type,
            "sample_shape": list(self.sample_shape),
            "image_shape": list(self.image_shape),
            "attributes": [],
        }

    def embed(self, prompts: Sequence[str]) -> torch.Tensor:
        """The UNet's ``encoder_hidden_states`` ``[B, L, D]`` for `prompts`; each distinct
        prompt goes through the text encoder once per model (cached), in one batched call."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._embeddings]
        if missing:
            tokens = self.tokenizer(
                missing,
                padding="max_length",
                max_length=self.max_length,
                truncation=True,
                return_tensors="pt",
            )
            self._warn_truncated(missing)
            device = self.text_encoder.device
            mask = None
            if getattr(self.text_encoder.config, "use_attention_mask", False):
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


def load_text_model(
    path: str | pathlib.Path, *, trust_pickle: bool = False, device: Any = "cpu", dtype: Any = None
) -> TextModel:
    """Load a Stable-Diffusion-style pipeline folder (see the module docstring)."""
    path = pathlib.Path(path)
    for part, what in (("unet", "config.json"), ("vae", "config.json"),
                       ("text_encoder", "config.json"), ("tokenizer", None),
                       ("scheduler", "scheduler_config.json")):  # fmt: skip
        folder = path / part
        if not folder.is_dir() or (what is not None and not (folder / what).is_file()):
            missing = f"{part}/" if what is None else f"{part}/{what}"
            raise DtkError(f"{path}: a text-to-image pipeline folder needs {missing}")
    unet_class = read_config(path / "unet" / "config.json").get("_class_name")
    if unet_class not in TEXT_UNETS:
        raise DtkError(f"{path}: the UNet is a {unet_class}; a text-to-image pipeline needs "
                       "UNet2DConditionModel")  # fmt: skip
    scheduler_config = read_config(path / "scheduler" / "scheduler_config.json")
    prediction_type, noise_levels = scheduler_noise(path, scheduler_config)

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    def load(part: str, cls: Any, part_dtype: Any = dtype, **kwargs: Any) -> Any:
        folder = path / part
        safe = use_safetensors(folder, SAFE[part], trust_pickle)
        try:
            module = cls.from_pretrained(folder, use_safetensors=safe, local_files_only=True,
                                         torch_dtype=part_dtype, **kwargs)  # fmt: skip
        except Exception as exc:  # loaders raise many types for a damaged folder
            raise load_failure(folder, part, exc) from None
        return module.eval().requires_grad_(False).to(device=device)

    diffusers_kwargs = {"low_cpu_mem_usage": False}
    unet = load("unet", UNet2DConditionModel, **diffusers_kwargs)
    # SD's VAE overflows in float16 (its config says force_upcast), as diffusers knows
    upcast = dtype == torch.float16 and read_config(path / "vae" / "config.json").get(
        "force_upcast", False
    )
    vae = load("vae", AutoencoderKL, torch.float32 if upcast else dtype, **diffusers_kwargs)
    with quiet_transformers():
        text_encoder = load("text_encoder", CLIPTextModel)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
    except Exception as exc:  # a broken tokenizer folder can fail in many ways
        raise load_failure(path / "tokenizer", "tokenizer", exc) from None
    width = unet.config.cross_attention_dim
    if isinstance(width, int) and width != text_encoder.config.hidden_size:
        raise DtkError(
            f"{path}: the UNet attends to {width}-wide text features "
            f"but the text encoder gives {text_encoder.config.hidden_size}"
        )
    return TextModel(
        path, unet, vae, text_encoder, tokenizer, noise_levels, prediction_type, scheduler_config
    )
