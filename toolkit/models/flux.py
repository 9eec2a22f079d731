"""The Flux family: rectified-flow text-to-image latent models (FLUX.1 dev and schnell).

The folder is what ``FluxPipeline.save_pretrained`` writes: ``model_index.json``,
``transformer/`` (a ``FluxTransformer2DModel``), ``vae/`` (an ``AutoencoderKL`` with a
``shift_factor``), ``text_encoder/`` (a ``CLIPTextModel``, whose pooled output is the
transformer's ``pooled_projections``) with ``tokenizer/``, ``text_encoder_2/`` (a
``T5EncoderModel``, whose hidden states are its ``encoder_hidden_states``) with
``tokenizer_2/``, and ``scheduler/`` (a ``FlowMatchEulerDiscreteScheduler``, dynamically
shifted for dev, shift 1 for schnell).

The transformer works on packed latents: 2x2 patches of the ``(C, h, w)`` latent become
``h w / 4`` tokens of ``4 C`` features, located by their row and column (``img_ids``). A
sample is drawn, sampled and decoded in the unpacked latent shape, and packed only inside
the model (`pack`, `unpack`, as ``FluxPipeline._pack_latents``): the pipeline draws its
noise in that shape too (``prepare_latents``), then packs it, so a sample's start equals the
pipeline's from the same generator. Like SD 3 it predicts the velocity ``eps - x0``
(`toolkit.models.parameterization.Flow`), but takes the time ``t`` in ``[0, 1]`` itself,
not ``1000 t``. Its noise levels are `FlowLevels` with ``mu`` from the sample's sequence
length, as the pipeline's ``calculate_shift`` (static shift when the scheduler has no
dynamic shifting: schnell), and the pipeline's times ``1, (N - 1) / N, ..., 1 / N``
(``spacing="uniform"``), which the ``flow`` schedule follows.

FLUX.1 dev is guidance-distilled: its transformer takes the guidance scale as an input
(``guidance_embeds``), the ``guidance`` model option (default 3.5, the pipeline's), in the
one forward pass of each step; the family's default guidance is ``none``. ``cfg`` on top of
it is the pipeline's "true CFG" (``true_cfg_scale`` with a negative prompt): two branches,
each with the embedded scale. Schnell (no ``guidance_embeds``) takes no ``guidance`` option.
The image size is the request's ``--height``/``--width`` (default 128 latent pixels a side
times the VAE's scale factor: 1024 for FLUX.1, as the pipeline's; multiples of twice the
VAE's factor, for the packing), and the T5 prompt length the ``max_sequence_length`` model
option (default 512, the pipeline's).
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from toolkit.errors import DtkError
from toolkit.lazy import lazy_import
from toolkit.models.family import UNCOND, NetworkModel
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
from toolkit.registry.options import validate_options

if TYPE_CHECKING:
    import torch

    from toolkit.registry.protocols import SampleRequest
else:
    torch = lazy_import("torch")

#: weights file stem of each component
SAFE = {"transformer": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
        "text_encoder": "model", "text_encoder_2": "model"}  # fmt: skip
#: what every folder must hold: (component, its config file or None for a folder)
PARTS = (("transformer", "config.json"), ("vae", "config.json"),
         ("text_encoder", "config.json"), ("tokenizer", None),
         ("text_encoder_2", "config.json"), ("tokenizer_2", None),
         ("scheduler", "scheduler_config.json"))  # fmt: skip
SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)
#: scheduler options that change its times in ways `FlowLevels` does not model
UNSUPPORTED_SCHEDULING = ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
                          "use_beta_sigmas", "invert_sigmas", "stochastic_sampling")  # fmt: skip
#: the pipeline's defaults: embedded guidance scale, T5 tokens, latent size (its
#: ``default_sample_size``), and ``calculate_shift``'s arguments
GUIDANCE = 3.5
T5_LENGTH = 512
LATENT_SIZE = 128
SHIFT = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5,
         "max_shift": 1.15}  # fmt: skip
#: the family's default sampling: the pipeline's Euler on its own times; dev's 28 steps, and
#: schnell's 4 (as its model card samples it)
DEV_SAMPLING = ("euler", "flow", 28)
SCHNELL_SAMPLING = ("euler", "flow", 4)


class FluxOptions:
    """A Flux folder's model options (``--model-option KEY=VALUE``), checked and converted
    as plugin options are: ``guidance`` (dev only: the embedded guidance scale, default
    3.5) and the T5 prompt length ``max_sequence_length`` (default 512, at most 512).
    ``height`` and ``width`` are refused with a pointer to ``--height``/``--width``, where the
    image size moved."""

    def __init__(self, guidance: float | None = None, height: int | None = None,
                 width: int | None = None, max_sequence_length: int | None = None
                 ) -> None:  # fmt: skip
        pass


def calculate_shift(length: int, config: Mapping[str, Any]) -> float:
    """``mu`` for a sample of `length` tokens, as FluxPipeline's ``calculate_shift``."""
    settings = {key: config.get(key, default) for key, default in SHIFT.items()}
    base, top = settings["base_image_seq_len"], settings["max_image_seq_len"]
    slope = (settings["max_shift"] - settings["base_shift"]) / (top - base)
    return length * slope + settings["base_shift"] - slope * base


class FluxFolder(TextFolder):
    """A ``FluxPipeline`` folder, read from its configs."""

    family = "flux"
    lora_pipeline = "FluxPipeline"

    def __init__(self, path: pathlib.Path) -> None:
        super().__init__(path)
        check_parts(path, PARTS)
        self.transformer_config = read_config(path / "transformer" / "config.json")
        self.vae_config = read_config(path / "vae" / "config.json")
        self.clip_config = read_config(path / "text_encoder" / "config.json")
        self.t5_config = read_config(path / "text_encoder_2" / "config.json")
        self._scheduler_config = read_config(path / "scheduler" / "scheduler_config.json")
        self._check_configs()
        #: whether a negative prompt was given (`check_request`), which only guidance with an
        #: unconditional branch uses
        self._negative_given = False

    def _check_configs(self) -> None:
        path, transformer = self.path, self.transformer_config
        if transformer.get("_class_name") != "FluxTransformer2DModel":
            raise DtkError(f"{path}: the transformer is a {transformer.get('_class_name')}; a "
                           "Flux folder needs FluxTransformer2DModel")  # fmt: skip
        config = self._scheduler_config
        if config.get("_class_name") not in SCHEDULERS:
            raise DtkError(f"{path}: the scheduler is a {config.get('_class_name')}; a Flux "
                           f"folder samples with {SCHEDULERS[0]} (rectified flow)")  # fmt: skip
        if config.get("use_dynamic_shifting") and (
            config.get("time_shift_type", "exponential") != "exponential"
        ):
            raise DtkError(f"{path}: the scheduler's linear time shift is not supported")
        unsupported = [key for key in UNSUPPORTED_SCHEDULING if config.get(key)]
        if unsupported:
            raise DtkError(f"{path}: the scheduler's {unsupported[0]} is not supported")
        channels, latent = transformer.get("in_channels", 64), self.vae_config.get(
            "latent_channels", 16)  # fmt: skip
        if transformer.get("patch_size", 1) != 1 or channels != 4 * latent:
            raise DtkError(f"{path}: the transformer takes {channels} channels in patches of "
                           f"{transformer.get('patch_size', 1)}; a Flux text-to-image "
                           f"transformer takes the VAE's {latent} latent channels in packed "
                           f"2x2 patches ({4 * latent}), in patches of 1")  # fmt: skip
        if transformer.get("out_channels") not in (None, channels):
            raise DtkError(f"{path}: the transformer gives {transformer['out_channels']} "
                           f"channels for {channels} in")  # fmt: skip
        pooled, hidden = transformer.get("pooled_projection_dim", 768), self.clip_config.get(
            "hidden_size")  # fmt: skip
        if hidden != pooled:
            raise DtkError(f"{path}: CLIP gives {hidden} pooled features; the transformer "
                           f"takes {pooled}")  # fmt: skip
        joint = transformer.get("joint_attention_dim", 4096)
        if self.t5_config.get("d_model") != joint:
            raise DtkError(f"{path}: T5 gives {self.t5_config.get('d_model')} features; the "
                           f"transformer's joint_attention_dim is {joint}")  # fmt: skip

    @property
    def guidance_embeds(self) -> bool:
        """Whether the transformer takes the guidance scale as an input (dev, not schnell)."""
        return bool(self.transformer_config.get("guidance_embeds", False))

    @property
    def scheduler_config(self) -> dict[str, Any]:
        return self._scheduler_config

    # -- model options -------------------------------------------------------------------

    def check_model_options(self, options: Mapping[str, Any], from_strings: bool = False
                            ) -> dict[str, Any]:  # fmt: skip
        given = validate_options(FluxOptions, options, kind="model", name=self.family,
                                 from_strings=from_strings)  # fmt: skip
        given = {key: value for key, value in given.items() if value is not None}
        for side in ("height", "width"):
            if side in given:
                raise DtkError(f"model option {side}: the image size is --{side} (and "
                               f"--{'width' if side == 'height' else 'height'}) now, as for "
                               "every family that takes one")  # fmt: skip
        resolved: dict[str, Any] = {}
        if self.guidance_embeds:
            resolved["guidance"] = float(given.get("guidance", GUIDANCE))
        elif "guidance" in given:
            raise DtkError(f"{self.path}: this Flux transformer takes no guidance scale (no "
                           "guidance_embeds: schnell-style); use --guidance cfg for "
                           "classifier-free guidance")  # fmt: skip
        length = int(given.get("max_sequence_length", T5_LENGTH))
        if not 1 <= length <= T5_LENGTH:
            raise DtkError(f"model option max_sequence_length={length}: T5's prompt length is "
                           f"1 to {T5_LENGTH} tokens")  # fmt: skip
        resolved["max_sequence_length"] = length
        return resolved

    @property
    def options(self) -> dict[str, Any]:
        """The model options in use: the plan's, or the defaults."""
        return {**self.check_model_options({}), **self.model_options}

    # -- what the configs say ------------------------------------------------------------

    @property
    def default_sample_shape(self) -> tuple[int, int, int]:
        """The pipeline's default: 128 latent pixels a side (1024 px for FLUX.1)."""
        channels = int(self.transformer_config.get("in_channels", 64)) // 4
        return (channels, LATENT_SIZE, LATENT_SIZE)

    @property
    def latent_patch(self) -> int:
        """The 2x2 packing."""
        return 2

    @property
    def noise_levels(self) -> FlowLevels:
        """`FlowLevels` with the pipeline's times (``uniform``); with dynamic shifting, ``mu``
        from the sample's number of packed tokens, else the scheduler's shift."""
        config = self._scheduler_config
        steps = int(config.get("num_train_timesteps", 1000))
        if not config.get("use_dynamic_shifting"):
            return FlowLevels(steps, shift=float(config.get("shift", 1.0)), spacing="uniform")
        _, height, width = self.sample_shape
        mu = calculate_shift((height // 2) * (width // 2), config)
        return FlowLevels(steps, mu=mu, spacing="uniform")

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "prediction_type": "flow",  # velocity of rectified flow
            "class": self.transformer_config.get("_class_name"),
            "text_encoders": ["CLIPTextModel", "T5EncoderModel"],
            "guidance_embeds": self.guidance_embeds,
            "noise_levels": repr(self.noise_levels),
            "image_shape": list(self.image_shape),
        }

    # -- requests ------------------------------------------------------------------------

    def check_request(self, conditions: Sequence[Mapping[str, str]], prompt_given: bool,
                      negative_given: bool, options: Mapping[str, bool]) -> None:  # fmt: skip
        super().check_request(conditions, prompt_given, negative_given, options)
        if options.get("attention_slicing"):
            raise DtkError(f"{self.path}: the Flux transformer has no sliced attention; drop "
                           "--attention-slicing (a smaller --batch-size saves memory)")  # fmt: skip
        self._negative_given = negative_given

    def default_guidance(self, conditional: bool) -> tuple[str, dict[str, Any]]:
        """None: FluxPipeline's one forward pass a step (dev's guidance is an input, the
        ``guidance`` model option); ``cfg`` is its true CFG, asked for by name."""
        return ("none", {})

    def check_guidance(self, branches: set[str], text_branches: Mapping[str, str],
                       conditional: bool, name: str) -> None:  # fmt: skip
        super().check_guidance(branches, text_branches, conditional, name)
        if self._negative_given and UNCOND not in branches:
            embedded = " (dev's own scale is --model-option guidance=...)" * self.guidance_embeds
            raise DtkError(f"guidance {name!r} does not use a negative prompt: Flux samples "
                           f"without classifier-free guidance{embedded}; give --guidance cfg "
                           "(FluxPipeline's true_cfg_scale) to guide away from it")  # fmt: skip

    def default_sampling(self) -> tuple[str, str, int]:
        """The pipeline's: ``euler`` on the ``flow`` schedule (its times), 28 steps for dev
        and 4 for schnell (no ``guidance_embeds``)."""
        return DEV_SAMPLING if self.guidance_embeds else SCHNELL_SAMPLING

    # -- weights -------------------------------------------------------------------------

    def load(self, *, device: Any, dtype: Any, trust_pickle: bool = False,
             attention_slicing: bool = False, vae_tiling: bool = False) -> Flux:  # fmt: skip
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import CLIPTextModel, T5EncoderModel

        def load(part: str, cls: Any, part_dtype: Any = dtype, **kwargs: Any) -> Any:
            return load_part(self.path, part, cls, SAFE[part], device=device, dtype=part_dtype,
                             trust_pickle=trust_pickle, **kwargs)  # fmt: skip

        transformer = load("transformer", FluxTransformer2DModel, low_cpu_mem_usage=False)
        vae = load("vae", AutoencoderKL, vae_dtype(dtype, self.vae_config),
                   low_cpu_mem_usage=False)  # fmt: skip
        with quiet_transformers():
            clip = (load("text_encoder", CLIPTextModel), load_tokenizer(self.path, "tokenizer"))
            t5 = (load("text_encoder_2", T5EncoderModel),
                  load_tokenizer(self.path, "tokenizer_2"))  # fmt: skip
        if vae_tiling:
            vae.enable_tiling()
        apply_loras(self, {"transformer": transformer, "text_encoder": clip[0]})
        return Flux(self, transformer, vae, clip, t5, self.options)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` latents -> ``[B, h w / 4, 4 C]`` tokens of 2x2 patches, row by row
    (``FluxPipeline._pack_latents``)."""
    batch, channels, height, width = latents.shape
    patches = latents.view(batch, channels, height // 2, 2, width // 2, 2)
    return patches.permute(0, 2, 4, 1, 3, 5).reshape(batch, (height // 2) * (width // 2),
                                                     channels * 4)  # fmt: skip


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack` for a ``height`` x ``width`` latent
    (``FluxPipeline._unpack_latents``)."""
    batch, _, features = tokens.shape
    patches = tokens.view(batch, height // 2, width // 2, features // 4, 2, 2)
    return patches.permute(0, 3, 1, 4, 2, 5).reshape(batch, features // 4, height, width)


def image_ids(height: int, width: int, device: Any, dtype: Any) -> torch.Tensor:
    """Each packed token's ``(0, row, column)`` (``FluxPipeline._prepare_latent_image_ids``)
    for a ``height`` x ``width`` latent."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(height // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class Flux(TextModel, NetworkModel):
    """A loaded Flux model: the transformer (through `Flow`, packing inside), the VAE, CLIP
    and T5 with their tokenizers, and the model options (embedded guidance scale, prompt
    length)."""

    def __init__(self, folder: FluxFolder, transformer: Any, vae: Any, clip: tuple[Any, Any],
                 t5: tuple[Any, Any], options: Mapping[str, Any]) -> None:  # fmt: skip
        from toolkit.models.parameterization import Flow

        levels = folder.noise_levels
        super().__init__(folder, transformer, levels, Flow(levels))
        self.transformer, self.vae, self.clip, self.t5 = transformer, vae, clip, t5
        #: dev's embedded guidance scale (None: schnell, which takes none)
        self.guidance_scale = options.get("guidance")
        self.max_sequence_length = int(options.get("max_sequence_length", T5_LENGTH))
        self.prompts = PromptEmbeddings(self._encode, [clip[0], t5[0]])

    @property
    def clip_length(self) -> int:
        # a tokenizer saved without a limit reports a huge sentinel: the positions bound it
        encoder, tokenizer = self.clip
        return min(int(tokenizer.model_max_length), encoder.config.max_position_embeddings)

    def forward(self, x_in: torch.Tensor, t: torch.Tensor, **inputs: torch.Tensor
                ) -> torch.Tensor:  # fmt: skip
        """The velocity for unpacked latents `x_in` at timestep ``t = 1000 t'``: packed for
        the transformer, which takes the time ``t'`` itself, and unpacked again."""
        height, width = x_in.shape[-2:]
        text = inputs["encoder_hidden_states"]
        out = self.transformer(
            hidden_states=pack(x_in), timestep=t.to(x_in.dtype) / 1000,
            img_ids=image_ids(height, width, x_in.device, x_in.dtype),
            txt_ids=text.new_zeros(text.shape[1], 3), **inputs, return_dict=False,
        )[0]  # fmt: skip
        return unpack(out, height, width)

    def conditioning(self, batch: Sequence[SampleRequest],
                     text_branches: Mapping[str, str]) -> TextConditioning:  # fmt: skip
        return TextConditioning.of(self.embed, batch, text_branches)

    def embed(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The transformer's ``encoder_hidden_states`` ``[B, L, J]`` (T5's `L` tokens),
        ``pooled_projections`` ``[B, P]`` (CLIP's pooled output) and, for dev, ``guidance``
        ``[B]`` (the embedded scale) for `prompts`, as FluxPipeline's encode_prompt."""
        rows = self.prompts(prompts)
        if self.guidance_scale is not None:
            rows["guidance"] = torch.full((len(prompts),), float(self.guidance_scale))
        return rows

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        encoder, tokenizer = self.clip
        length = self.clip_length
        warn_truncated(tokenizer, prompts, length)
        tokens = tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                           return_tensors="pt")  # fmt: skip
        pooled = encoder(tokens.input_ids.to(encoder.device)).pooler_output.to(encoder.dtype)
        encoder, tokenizer = self.t5
        length = self.max_sequence_length
        warn_truncated(tokenizer, prompts, length)
        tokens = tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                           return_tensors="pt")  # fmt: skip
        hidden = encoder(tokens.input_ids.to(encoder.device))[0].to(encoder.dtype)
        return {"encoder_hidden_states": hidden, "pooled_projections": pooled}

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1]: ``vae.decode(latents / scaling_factor +
        shift_factor)``."""
        return decode_latents(self.vae, latents)
