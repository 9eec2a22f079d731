"""The Stable Diffusion XL family: text-to-image latent diffusion with two CLIP encoders and
SDXL's added conditioning (SDXL base and its fine-tunes; refiner-style folders).

The folder is what ``StableDiffusionXLPipeline.save_pretrained`` writes: ``model_index.json``,
``unet/`` (a ``UNet2DConditionModel`` with ``addition_embed_type="text_time"``), ``vae/``,
``text_encoder/`` (a ``CLIPTextModel``) with ``tokenizer/``, ``text_encoder_2/`` (a
``CLIPTextModelWithProjection``) with ``tokenizer_2/``, and ``scheduler/``. A refiner-style
folder (SDXL's refiner, ``StableDiffusionXLImg2ImgPipeline``) names no first encoder
(``text_encoder`` null) and runs on the second alone.

The UNet is a VP denoiser in the VAE's latent space (`VPModel`), so every sampler runs on it.
Each guidance branch feeds it ``encoder_hidden_states`` (both encoders' penultimate hidden
states side by side), ``text_embeds`` (the second encoder's projection) and ``time_ids``
(original size, crop's top-left corner and target size: ``(H, W, 0, 0, H, W)`` for the
image size, the folder's or ``--height``/``--width``; a refiner's
``requires_aesthetics_score`` puts the aesthetic score, 6 on the conditional branch and 2.5
on the unconditional one, in place of the target size), which
`StableDiffusionXL.forward` hands the UNet as its ``added_cond_kwargs``, exactly as diffusers'
pipelines compute them. With ``force_zeros_for_empty_prompt`` (the pipeline's default) a
sample without a negative prompt has zeros on the unconditional branch, as the pipeline does.
Defaults are the pipeline's: 50 steps and ``cfg`` at 5.0, and the sampler that takes the
steps of the folder's scheduler (`default_sampling`).
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from toolkit import defaults
from toolkit.errors import DtkError
from toolkit.lazy import lazy_import
from toolkit.models.detect import _present as present
from toolkit.models.family import VPModel
from toolkit.models.loading import (
    check_prediction_type,
    quiet_transformers,
    read_config,
    unet_shape,
)
from toolkit.models.lora import apply_loras
from toolkit.models.stable_diffusion import (
    PromptEmbeddings,
    TextConditioning,
    TextFolder,
    TextModel,
    check_parts,
    decode_latents,
    load_part,
    load_tokenizer,
    load_unet_vae,
    penultimate_states,
)
from toolkit.models.twins import scheduler_twin

if TYPE_CHECKING:
    import torch

    from toolkit.registry.protocols import SampleRequest
else:
    torch = lazy_import("torch")

#: what every folder must hold: (component, its config file or None for a folder)
PARTS = (("unet", "config.json"), ("vae", "config.json"), ("text_encoder_2", "config.json"),
         ("tokenizer_2", None), ("scheduler", "scheduler_config.json"))  # fmt: skip
#: ... and a folder with the first encoder (every one but a refiner-style folder)
FIRST_PARTS = (("text_encoder", "config.json"), ("tokenizer", None))
#: the second encoder's class: its projection is the pooled text
PROJECTION_CLASS = "CLIPTextModelWithProjection"
#: the pipeline's defaults: guidance scale, steps
CFG_SCALE = 5.0
STEPS = 50
#: a refiner's aesthetic scores on the cond and uncond branches (the Img2Img pipeline's)
AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5
#: the UNet's added conditioning inputs, what ``added_cond_kwargs`` holds
ADDED = ("text_embeds", "time_ids")


#: a diffusers scheduler -> our sampler that takes the same steps on the same sigmas
class StableDiffusionXLFolder(TextFolder):
    """A ``StableDiffusionXLPipeline`` folder (or a refiner-style one), read from its
    configs."""

    family = "sdxl"
    cfg_scale = CFG_SCALE
    lora_pipeline = "StableDiffusionXLPipeline"

    def __init__(self, path: pathlib.Path) -> None:
        super().__init__(path)
        index = read_config(path / "model_index.json")
        self.pipeline_class = str(index.get("_class_name"))
        #: whether the folder holds the first encoder (a refiner-style folder does not)
        self.has_text_encoder = present(index.get("text_encoder"))
        #: the pipeline's: zeros on the unconditional branch when there is no negative prompt
        self.force_zeros_for_empty_prompt = bool(index.get("force_zeros_for_empty_prompt", True))
        #: a refiner's: the aesthetic score in place of the target size in ``time_ids``
        self.requires_aesthetics_score = bool(index.get("requires_aesthetics_score", False))
        encoder_2 = index.get("text_encoder_2")
        if present(encoder_2) and encoder_2[-1] != PROJECTION_CLASS:
            raise DtkError(f"{path}: text_encoder_2 is a {encoder_2[-1]}; a Stable Diffusion XL "
                           f"folder's second encoder is a {PROJECTION_CLASS}")  # fmt: skip
        check_parts(path, PARTS + (FIRST_PARTS if self.has_text_encoder else ()))
        self.unet_config = read_config(path / "unet" / "config.json")
        self.vae_config = read_config(path / "vae" / "config.json")
        encoders = ("text_encoder", "text_encoder_2") if self.has_text_encoder else (
            "text_encoder_2",)  # fmt: skip
        self.text_configs = [read_config(path / part / "config.json") for part in encoders]
        self._scheduler_config = read_config(path / "scheduler" / "scheduler_config.json")
        check_prediction_type(path, self._scheduler_config)
        self._check_configs()

    def _check_configs(self) -> None:
        path, unet = self.path, self.unet_config
        if unet.get("_class_name") != "UNet2DConditionModel":
            raise DtkError(f"{path}: the UNet is a {unet.get('_class_name')}; a Stable Diffusion "
                           "XL folder needs UNet2DConditionModel")  # fmt: skip
        if unet.get("addition_embed_type") != "text_time":
            raise DtkError(f"{path}: the UNet takes no pooled text and size conditioning "
                           f"(addition_embed_type {unet.get('addition_embed_type')}, not "
                           "text_time): it is not a Stable Diffusion XL UNet")  # fmt: skip
        channels, latents = unet.get("in_channels", 4), self.vae_config.get("latent_channels", 4)
        if channels != latents:
            raise DtkError(f"{path}: the UNet takes {channels} input channels but the VAE gives "
                           f"{latents} (an inpainting UNet?)")  # fmt: skip
        width = unet.get("cross_attention_dim")
        hidden = sum(int(c.get("hidden_size", 0)) for c in self.text_configs)
        if isinstance(width, int) and width != hidden:
            raise DtkError(f"{path}: the UNet attends to {width}-wide text features but the text "
                           f"encoders give {hidden} together")  # fmt: skip
        ids, dim = len(self.time_ids()), int(unet.get("addition_time_embed_dim") or 0)
        projection = int(self.text_configs[-1].get("projection_dim", 0))
        takes = unet.get("projection_class_embeddings_input_dim")
        if takes != ids * dim + projection:
            hint = ""
            if isinstance(takes, int) and abs(takes - ids * dim - projection) == dim:
                hint = (" (model_index.json's requires_aesthetics_score is "
                        f"{str(self.requires_aesthetics_score).lower()}: the UNet was trained "
                        "with the other)")  # fmt: skip
            raise DtkError(f"{path}: the UNet's added conditioning takes {takes} features; the "
                           f"pooled text ({projection}) and {ids} time ids of {dim} give "
                           f"{ids * dim + projection}{hint}")  # fmt: skip

    @property
    def scheduler_config(self) -> dict[str, Any]:
        return self._scheduler_config

    @property
    def default_sample_shape(self) -> tuple[int, int, int]:
        return unet_shape(self.unet_config)

    def time_ids(self, negative: bool = False) -> list[float]:
        """The UNet's ``time_ids`` for a branch, as the pipeline's ``_get_add_time_ids``:
        original size, crop top-left (0, 0) and target size, the image's (height, width);
        with ``requires_aesthetics_score`` the aesthetic score in place of the target size
        (`NEGATIVE_AESTHETIC_SCORE` on the `negative` branch)."""
        _, height, width = self.image_shape
        if self.requires_aesthetics_score:
            score = NEGATIVE_AESTHETIC_SCORE if negative else AESTHETIC_SCORE
            return [height, width, 0, 0, score]
        return [height, width, 0, 0, height, width]

    def describe(self) -> dict[str, Any]:
        encoders = [c.get("architectures", ["CLIPTextModel"])[0] for c in self.text_configs]
        return {
            **super().describe(),
            "class": self.unet_config.get("_class_name"),
            "pipeline": self.pipeline_class,
            "text_encoders": encoders,
            "image_shape": list(self.image_shape),
            "force_zeros_for_empty_prompt": self.force_zeros_for_empty_prompt,
            "time_ids": self.time_ids(),
        }

    def default_sampling(self) -> tuple[str, str, int]:
        """The pipeline's 50 steps with the twin of the folder's scheduler
        (`toolkit.models.twins`: SDXL's ``EulerDiscreteScheduler`` with ``leading`` spacing
        and ``steps_offset`` 1 is ``euler`` on ``leading`` with ``offset=1``); a scheduler
        without a twin gets the toolkit's sampling."""
        twin = scheduler_twin(self._scheduler_config)
        if twin is None:
            return defaults.SAMPLER, defaults.SCHEDULE, defaults.STEPS
        return twin[0], twin[1], STEPS

    def default_schedule_options(self) -> dict[str, Any]:
        twin = scheduler_twin(self._scheduler_config)
        return {} if twin is None else twin[2]

    # -- weights -------------------------------------------------------------------------

    def load(self, *, device: Any, dtype: Any, trust_pickle: bool = False,
             attention_slicing: bool = False, vae_tiling: bool = False
             ) -> StableDiffusionXL:  # fmt: skip
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        unet, vae = load_unet_vae(self, device=device, dtype=dtype, trust_pickle=trust_pickle,
                                  attention_slicing=attention_slicing,
                                  vae_tiling=vae_tiling)  # fmt: skip
        parts = [("text_encoder", CLIPTextModel, "tokenizer")] if self.has_text_encoder else []
        parts.append(("text_encoder_2", CLIPTextModelWithProjection, "tokenizer_2"))
        with quiet_transformers():
            clips = [(load_part(self.path, part, cls, "model", device=device, dtype=dtype,
                                trust_pickle=trust_pickle), load_tokenizer(self.path, tokens))
                     for part, cls, tokens in parts]  # fmt: skip
        encoders = dict(zip(("text_encoder", "text_encoder_2")[2 - len(clips):],
                            (encoder for encoder, _ in clips)))  # fmt: skip
        apply_loras(self, {"unet": unet, "text_encoder": None, **encoders})
        return StableDiffusionXL(self, unet, vae, clips)


class StableDiffusionXL(TextModel, VPModel):
    """A loaded SDXL model: the UNet, the VAE, and its CLIP encoders with their tokenizers
    (the second last; a refiner-style folder has only it)."""

    folder: StableDiffusionXLFolder

    def __init__(self, folder: StableDiffusionXLFolder, unet: Any, vae: Any,
                 clips: Sequence[tuple[Any, Any]]) -> None:  # fmt: skip
        super().__init__(folder, unet)
        self.unet, self.vae, self.clips = unet, vae, list(clips)
        self.prompts = PromptEmbeddings(self._encode, [encoder for encoder, _ in self.clips])

    @property
    def max_length(self) -> int:
        # the pipeline pads to each tokenizer's model_max_length (77 for both of SDXL's); a
        # tokenizer saved without a limit reports a huge sentinel: the positions bound it
        return min(min(int(tokenizer.model_max_length), encoder.config.max_position_embeddings)
                   for encoder, tokenizer in self.clips)  # fmt: skip

    def forward(self, x_in: torch.Tensor, t: torch.Tensor, **inputs: torch.Tensor
                ) -> torch.Tensor:  # fmt: skip
        added = {name: inputs.pop(name) for name in ADDED}
        return self.unet(x_in, t, **inputs, added_cond_kwargs=added, return_dict=False)[0]

    def conditioning(self, batch: Sequence[SampleRequest],
                     text_branches: Mapping[str, str]) -> TextConditioning:  # fmt: skip
        return TextConditioning.of(self.embed, batch, text_branches, negative=self.embed_negative)

    def embed(self, prompts: Sequence[str], negative: bool = False) -> dict[str, torch.Tensor]:
        """The UNet's inputs for `prompts`: ``encoder_hidden_states`` ``[B, L, D]``,
        ``text_embeds`` ``[B, P]`` and ``time_ids`` ``[B, 6]`` (``[B, 5]`` with aesthetic
        scores), as the pipeline's encode_prompt and _get_add_time_ids. On the `negative`
        branch with ``force_zeros_for_empty_prompt``, an empty prompt is zeros (never
        encoded). Each distinct prompt goes through the encoders once per model."""
        zero_empty = negative and self.folder.force_zeros_for_empty_prompt
        keep = [bool(p) or not zero_empty for p in prompts]
        encoder = self.clips[-1][0]
        like = {"dtype": encoder.dtype, "device": "cpu"}  # where PromptEmbeddings keeps rows
        width = sum(int(clip.config.hidden_size) for clip, _ in self.clips)
        hidden = torch.zeros(len(prompts), self.max_length, width, **like)
        pooled = torch.zeros(len(prompts), int(encoder.config.projection_dim), **like)
        if any(keep):
            rows = self.prompts([p for p, k in zip(prompts, keep) if k])
            mask = torch.tensor(keep)
            hidden[mask], pooled[mask] = rows["hidden"], rows["pooled"]
        time_ids = torch.tensor([self.folder.time_ids(negative)], **like)
        return {"encoder_hidden_states": hidden, "text_embeds": pooled,
                "time_ids": time_ids.expand(len(prompts), -1)}  # fmt: skip

    def embed_negative(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """`embed` on the unconditional branch."""
        return self.embed(prompts, negative=True)

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        outputs = penultimate_states(self.clips, prompts, self.max_length)
        # the pooled text is the first 2-D output: the projection's (text_encoder_2)
        pooled = next(first for first, _ in outputs if first.ndim == 2)
        dtype = self.clips[-1][0].dtype
        hidden = torch.cat([states for _, states in outputs], dim=-1)
        return {"hidden": hidden.to(dtype), "pooled": pooled.to(dtype)}

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1]: ``vae.decode(latents / scaling_factor)``, or with a
        VAE config's ``latents_mean`` and ``latents_std``, ``vae.decode(latents * std /
        scaling_factor + mean)``, as the pipeline decodes."""
        config = self.vae.config
        mean, std = config.get("latents_mean", None), config.get("latents_std", None)
        if mean is not None and std is not None:

            def channels(values: Any) -> torch.Tensor:
                return torch.tensor(values).view(1, -1, 1, 1).to(latents)

            latents = latents * channels(std) + channels(mean) * config.scaling_factor
        return decode_latents(self.vae, latents)
