"""The Stable Diffusion 3 family: rectified-flow text-to-image latent models (SD 3, 3.5).

The folder is what ``StableDiffusion3Pipeline.save_pretrained`` writes: ``model_index.json``,
``transformer/`` (an ``SD3Transformer2DModel``, the MMDiT), ``vae/`` (an ``AutoencoderKL``
with a ``shift_factor``), ``text_encoder/`` and ``text_encoder_2/`` (two
``CLIPTextModelWithProjection``) with ``tokenizer/`` and ``tokenizer_2/``, optionally
``text_encoder_3/`` (a ``T5EncoderModel``) with ``tokenizer_3/``, and ``scheduler/`` (a
``FlowMatchEulerDiscreteScheduler``, whose ``shift`` the model samples with). A folder
whose model_index.json names no T5 (``text_encoder_3`` null) runs without it, as the
pipeline does: T5's part of the text is zeros.

The transformer predicts the velocity ``v = eps - x0`` of ``x_t = (1 - t) x0 + t eps``; the
`Flow` parameterization makes it a sigma-space denoiser (``sigma = t / (1 - t)``), on the
noise levels `FlowLevels` with the folder's shift, so every sampler runs on it; the
pipeline's own sampling is ``euler`` on the ``flow`` schedule, 28 steps (`default_sampling`).
Prompts become ``encoder_hidden_states`` and ``pooled_projections`` exactly as diffusers'
``StableDiffusion3Pipeline.encode_prompt`` computes them, each distinct prompt once.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from toolkit.errors import DtkError
from toolkit.lazy import lazy_import
from toolkit.models.family import NetworkModel
from toolkit.models.loading import quiet_transformers, read_config
from toolkit.models.lora import apply_loras
from toolkit.models.noise import FlowLevels
from toolkit.models.stable_diffusion import (
    PromptEmbeddings,
    TextConditioning,
    TextFolder,
    TextModel,
    check_parts,
    decode_latents,
    load_part,
    load_tokenizer,
    vae_dtype,
    warn_truncated,
)
from toolkit.models.zero_tokens import FoldedZeros, unfold

if TYPE_CHECKING:
    import torch

    from toolkit.registry.protocols import SampleRequest
else:
    torch = lazy_import("torch")

#: weights file stem of each component
SAFE = {"transformer": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
        "text_encoder": "model", "text_encoder_2": "model", "text_encoder_3": "model"}  # fmt: skip
#: what every folder must hold: (component, its config file or None for a folder)
PARTS = (("transformer", "config.json"), ("vae", "config.json"),
         ("text_encoder", "config.json"), ("tokenizer", None),
         ("text_encoder_2", "config.json"), ("tokenizer_2", None),
         ("scheduler", "scheduler_config.json"))  # fmt: skip
#: ... and a folder with T5
T5_PARTS = (("text_encoder_3", "config.json"), ("tokenizer_3", None))
#: the scheduler classes whose noise levels (shift included) `FlowLevels` reads
SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
#: the pipeline's defaults: guidance scale, T5 tokens (``max_sequence_length``), sampling
CFG_SCALE = 7.0
T5_LENGTH = 256
SAMPLING = ("euler", "flow", 28)


class StableDiffusion3Folder(TextFolder):
    """A ``StableDiffusion3Pipeline`` folder, read from its configs."""

    family = "sd3"
    cfg_scale = CFG_SCALE
    lora_pipeline = "StableDiffusion3Pipeline"

    def __init__(self, path: pathlib.Path) -> None:
        super().__init__(path)
        index = read_config(path / "model_index.json")
        entry = index.get("text_encoder_3")
        #: whether the folder holds T5 (model_index.json names text_encoder_3)
        self.has_t5 = isinstance(entry, list) and any(part is not None for part in entry)
        check_parts(path, PARTS + (T5_PARTS if self.has_t5 else ()))
        self.transformer_config = read_config(path / "transformer" / "config.json")
        self.vae_config = read_config(path / "vae" / "config.json")
        self.clip_configs = [read_config(path / part / "config.json")
                             for part in ("text_encoder", "text_encoder_2")]  # fmt: skip
        self.t5_config = read_config(path / "text_encoder_3" / "config.json") if self.has_t5 else {}
        self._scheduler_config = read_config(path / "scheduler" / "scheduler_config.json")
        self._check_configs()

    def _check_configs(self) -> None:
        path, transformer = self.path, self.transformer_config
        if transformer.get("_class_name") != "SD3Transformer2DModel":
            raise DtkError(f"{path}: the transformer is a {transformer.get('_class_name')}; a "
                           "Stable Diffusion 3 folder needs SD3Transformer2DModel")  # fmt: skip
        scheduler = self._scheduler_config.get("_class_name")
        if scheduler not in SCHEDULERS:
            raise DtkError(f"{path}: the scheduler is a {scheduler}; a Stable Diffusion 3 "
                           f"folder samples with {SCHEDULERS[0]} (rectified flow)")  # fmt: skip
        if self._scheduler_config.get("use_dynamic_shifting") and (
            self._scheduler_config.get("time_shift_type", "exponential") != "exponential"
        ):
            raise DtkError(f"{path}: the scheduler's linear time shift is not supported")
        channels, size = transformer.get("in_channels", 16), transformer.get("sample_size", 128)
        patch = transformer.get("patch_size", 2)
        if self.vae_config.get("latent_channels", 4) != channels:
            raise DtkError(f"{path}: the transformer takes {channels} latent channels but the "
                           f"VAE gives {self.vae_config.get('latent_channels', 4)}")  # fmt: skip
        if not isinstance(size, int) or size % patch:
            raise DtkError(f"{path}: the transformer's sample_size {size!r} is not a multiple "
                           f"of its patch_size {patch}")  # fmt: skip
        joint = transformer.get("joint_attention_dim", 4096)
        hidden = sum(c.get("hidden_size", 0) for c in self.clip_configs)
        if hidden > joint:
            raise DtkError(f"{path}: the text encoders give {hidden} features together, more "
                           f"than the transformer's joint_attention_dim {joint}")  # fmt: skip
        pooled = sum(c.get("projection_dim", 0) for c in self.clip_configs)
        if pooled != transformer.get("pooled_projection_dim", 2048):
            raise DtkError(f"{path}: the text encoders' projections give {pooled} pooled "
                           "features; the transformer takes "
                           f"{transformer.get('pooled_projection_dim', 2048)}")  # fmt: skip
        if self.has_t5 and self.t5_config.get("d_model") != joint:
            raise DtkError(f"{path}: T5 gives {self.t5_config.get('d_model')} features; the "
                           f"transformer's joint_attention_dim is {joint}")  # fmt: skip

    @property
    def scheduler_config(self) -> dict[str, Any]:
        return self._scheduler_config

    @property
    def default_sample_shape(self) -> tuple[int, int, int]:
        size = int(self.transformer_config.get("sample_size", 128))
        return (int(self.transformer_config.get("in_channels", 16)), size, size)

    @property
    def latent_patch(self) -> int:
        return int(self.transformer_config.get("patch_size", 2))

    def check_latent_size(self, height: int, width: int) -> None:
        """The transformer's positional embedding covers ``pos_embed_max_size`` patches a
        side (SD 3: 192, 3072 px at a scale-8 VAE and 2x2 patches)."""
        limit = self.transformer_config.get("pos_embed_max_size")
        patches = max(height, width) // self.latent_patch
        if isinstance(limit, int) and patches > limit:
            most = limit * self.latent_patch * self.vae_scale_factor
            raise DtkError(f"--height/--width: this SD 3 transformer's positional embedding "
                           f"covers {limit} patches a side, at most {most} pixels")  # fmt: skip

    @property
    def noise_levels(self) -> FlowLevels:
        """`FlowLevels` with the scheduler's shift; with dynamic shifting, ``mu`` from the
        sample's sequence length as the pipeline computes it (``calculate_shift``)."""
        config = self._scheduler_config
        steps = int(config.get("num_train_timesteps", 1000))
        if not config.get("use_dynamic_shifting"):
            return FlowLevels(steps, shift=float(config.get("shift", 1.0)))
        _, height, width = self.sample_shape
        patch = int(self.transformer_config.get("patch_size", 2))
        length = (height // patch) * (width // patch)
        base_length = config.get("base_image_seq_len", 256)
        base, top = config.get("base_shift", 0.5), config.get("max_shift", 1.16)
        slope = (top - base) / (config.get("max_image_seq_len", 4096) - base_length)
        return FlowLevels(steps, mu=length * slope + base - slope * base_length)

    def describe(self) -> dict[str, Any]:
        encoders = ["CLIPTextModelWithProjection"] * 2 + (["T5EncoderModel"] if self.has_t5 else [])
        return {
            **super().describe(),
            "prediction_type": "flow",  # velocity of rectified flow
            "class": self.transformer_config.get("_class_name"),
            "text_encoders": encoders,
            "noise_levels": repr(self.noise_levels),
            "image_shape": list(self.image_shape),
        }

    # -- requests ------------------------------------------------------------------------

    def check_request(self, conditions: Sequence[Mapping[str, str]], prompt_given: bool,
                      negative_given: bool, options: Mapping[str, bool]) -> None:  # fmt: skip
        super().check_request(conditions, prompt_given, negative_given, options)
        if options.get("attention_slicing"):
            raise DtkError(f"{self.path}: the SD 3 transformer has no sliced attention; drop "
                           "--attention-slicing (a smaller --batch-size saves memory)")  # fmt: skip

    def default_sampling(self) -> tuple[str, str, int]:
        """The pipeline's own: FlowMatchEulerDiscreteScheduler is ``euler`` on the ``flow``
        schedule; 28 steps."""
        return SAMPLING

    # -- weights -------------------------------------------------------------------------

    def load(self, *, device: Any, dtype: Any, trust_pickle: bool = False,
             attention_slicing: bool = False, vae_tiling: bool = False
             ) -> StableDiffusion3:  # fmt: skip
        from diffusers import AutoencoderKL, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, T5EncoderModel

        def load(part: str, cls: Any, part_dtype: Any = dtype, **kwargs: Any) -> Any:
            return load_part(self.path, part, cls, SAFE[part], device=device, dtype=part_dtype,
                             trust_pickle=trust_pickle, **kwargs)  # fmt: skip

        transformer = load("transformer", SD3Transformer2DModel, low_cpu_mem_usage=False)
        vae = load("vae", AutoencoderKL, vae_dtype(dtype, self.vae_config),
                   low_cpu_mem_usage=False)  # fmt: skip
        with quiet_transformers():
            clips = [(load(part, CLIPTextModelWithProjection), load_tokenizer(self.path, tokens))
                     for part, tokens in (("text_encoder", "tokenizer"),
                                          ("text_encoder_2", "tokenizer_2"))]  # fmt: skip
            t5 = None
            if self.has_t5:
                t5 = (load("text_encoder_3", T5EncoderModel),
                      load_tokenizer(self.path, "tokenizer_3"))  # fmt: skip
        if vae_tiling:
            vae.enable_tiling()
        apply_loras(self, {"transformer": transformer, "text_encoder": clips[0][0],
                           "text_encoder_2": clips[1][0]})  # fmt: skip
        return StableDiffusion3(self, transformer, vae, clips, t5)


class StableDiffusion3(TextModel, NetworkModel):
    """A loaded SD 3 model: the transformer (through `Flow`), the VAE, two CLIP encoders
    and tokenizers, and T5 with its tokenizer or None."""

    def __init__(self, folder: StableDiffusion3Folder, transformer: Any, vae: Any,
                 clips: Sequence[tuple[Any, Any]], t5: tuple[Any, Any] | None) -> None:  # fmt: skip
        from toolkit.models.parameterization import Flow

        levels = folder.noise_levels
        super().__init__(folder, transformer, levels, Flow(levels))
        self.transformer, self.vae, self.clips, self.t5 = transformer, vae, list(clips), t5
        encoders = [encoder for encoder, _ in self.clips] + [t5[0] if t5 else None]
        self.prompts = PromptEmbeddings(self._encode, encoders)
        #: without T5, its zero tokens travel as one (`toolkit.models.zero_tokens`)
        self.zeros = None if t5 is not None else FoldedZeros(transformer, T5_LENGTH)

    @property
    def clip_length(self) -> int:
        # the pipeline pads both CLIP prompts to the first tokenizer's model_max_length;
        # a tokenizer saved without a limit reports a huge sentinel: the positions bound it
        limit = min(encoder.config.max_position_embeddings for encoder, _ in self.clips)
        return min(int(self.clips[0][1].model_max_length), limit)

    def forward(self, x_in: torch.Tensor, t: torch.Tensor, **inputs: torch.Tensor
                ) -> torch.Tensor:  # fmt: skip
        """The transformer's velocity; without T5, its zero tokens run folded into one where
        nothing else touches the attention, else as the 256 copies the pipeline gives."""
        if self.zeros is not None:
            if self.zeros.foldable():
                with self.zeros:
                    return self.transformer(hidden_states=x_in, timestep=t, **inputs,
                                            return_dict=False)[0]  # fmt: skip
            inputs["encoder_hidden_states"] = unfold(inputs["encoder_hidden_states"], T5_LENGTH)
        return self.transformer(hidden_states=x_in, timestep=t, **inputs, return_dict=False)[0]

    def conditioning(self, batch: Sequence[SampleRequest],
                     text_branches: Mapping[str, str]) -> TextConditioning:  # fmt: skip
        return TextConditioning.of(self.embed, batch, text_branches)

    def embed(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The transformer's ``encoder_hidden_states`` ``[B, L + 256, J]`` (the two CLIP
        encoders' penultimate hidden states side by side, zero-padded to the joint width
        ``J``, then T5's 256 tokens) and ``pooled_projections`` ``[B, P]`` (the two
        projections side by side) for `prompts`, as the pipeline's encode_prompt. Without
        T5 its tokens are zeros, given as one (``[B, L + 1, J]``: `forward` runs them)."""
        rows = self.prompts(prompts)
        clip, t5 = rows["clip"], rows.get("t5")
        joint = int(self.transformer.config.joint_attention_dim)
        if t5 is None:
            t5 = clip.new_zeros(clip.shape[0], 1, joint)
        clip = torch.nn.functional.pad(clip, (0, joint - clip.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip, t5], dim=-2),
                "pooled_projections": rows["pooled"]}  # fmt: skip

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        hidden, pooled = [], []
        length = self.clip_length
        warn_truncated(self.clips[0][1], prompts, length)  # both CLIPs cut at one length
        for encoder, tokenizer in self.clips:
            tokens = tokenizer(prompts, padding="max_length", max_length=length,
                               truncation=True, return_tensors="pt")  # fmt: skip
            out = encoder(tokens.input_ids.to(encoder.device), output_hidden_states=True)
            pooled.append(out[0])
            hidden.append(out.hidden_states[-2])
        dtype = self.clips[0][0].dtype
        rows = {"clip": torch.cat(hidden, dim=-1).to(dtype), "pooled": torch.cat(pooled, dim=-1)}
        if self.t5 is not None:
            encoder, tokenizer = self.t5
            tokens = tokenizer(prompts, padding="max_length", max_length=T5_LENGTH,
                               truncation=True, add_special_tokens=True,
                               return_tensors="pt")  # fmt: skip
            warn_truncated(tokenizer, prompts, T5_LENGTH)
            rows["t5"] = encoder(tokens.input_ids.to(encoder.device))[0]
        return rows

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1]: ``vae.decode(latents / scaling_factor +
        shift_factor)``."""
        return decode_latents(self.vae, latents)
