"""Tiny random folders of the diffusers families dtk does not load yet, saved with each
family's own pipeline class and denoiser, so their configs are what users' folders hold.

Only what tells the family apart is built (the denoiser, the scheduler, the pipeline
class); text encoders and VAEs are left out where the pipeline allows it, because nothing
here loads weights: dtk must name the family from the configs alone.
"""

from __future__ import annotations

import json
import pathlib

import torch
from diffusers import (
    DDPMPipeline,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import logging as diffusers_logging
from tiny_models import tiny_unet
from tiny_sd import save_sd_pipeline, tiny_components


def _pixart(sample: bool) -> PixArtTransformer2DModel:
    return PixArtTransformer2DModel(
        sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=2,
        caption_channels=32, in_channels=4, out_channels=8 if sample else 4,
        cross_attention_dim=16, norm_type="ada_norm_single",
    )  # fmt: skip


def _text_unet(**extra) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=32, **extra,
    )  # fmt: skip


def sdxl(path: pathlib.Path) -> None:
    unet = _text_unet(addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=32 + 6 * 8)  # fmt: skip
    components = tiny_components()
    StableDiffusionXLPipeline(
        vae=components["vae"], text_encoder=None, text_encoder_2=None, tokenizer=None,
        tokenizer_2=None, unet=unet, scheduler=components["scheduler"],
    ).save_pretrained(path)  # fmt: skip


def sd3_transformer(path: pathlib.Path) -> None:
    """A bare SD 3 transformer folder (SD 3 pipeline folders are supported: tiny_sd3.py)."""
    SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
        pooled_projection_dim=32, out_channels=4,
    ).save_pretrained(path)  # fmt: skip


def flux(path: pathlib.Path) -> None:
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=[2, 2, 4],
    )  # fmt: skip
    FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer,
    ).save_pretrained(path)  # fmt: skip


def flux_transformer(path: pathlib.Path) -> None:
    """A bare transformer folder, as users download one component at a time."""
    FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=[2, 2, 4],
    ).save_pretrained(path)  # fmt: skip


def pixart_alpha(path: pathlib.Path) -> None:
    PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=_pixart(True),
                        scheduler=DPMSolverMultistepScheduler()).save_pretrained(path)  # fmt: skip


def pixart_sigma(path: pathlib.Path) -> None:
    PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=_pixart(True),
                        scheduler=DPMSolverMultistepScheduler()).save_pretrained(path)  # fmt: skip


def dit(path: pathlib.Path) -> None:
    transformer = DiTTransformer2DModel(
        sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=2,
        in_channels=4, out_channels=8, num_embeds_ada_norm=10,
    )  # fmt: skip
    DiTPipeline(transformer=transformer, vae=tiny_components()["vae"],
                scheduler=DPMSolverMultistepScheduler(),
                id2label={0: "golden retriever", 1: "tabby cat"}).save_pretrained(path)  # fmt: skip


def lcm(path: pathlib.Path) -> None:
    components = tiny_components()
    components.update(unet=_text_unet(time_cond_proj_dim=16), scheduler=LCMScheduler())
    LatentConsistencyModelPipeline(**components, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False).save_pretrained(path)  # fmt: skip


def flow_unet(path: pathlib.Path) -> None:
    """A UNet2DModel trained for rectified flow (its scheduler says so)."""
    DDPMPipeline(unet=tiny_unet(), scheduler=FlowMatchEulerDiscreteScheduler()).save_pretrained(
        path
    )


def sd_with_sdxl_unet(path: pathlib.Path) -> None:
    """An SD 1.x-style folder holding an SDXL UNet (a hand-converted checkpoint, say)."""
    save_sd_pipeline(path)
    config = json.loads((path / "unet" / "config.json").read_text())
    config["addition_embed_type"] = "text_time"
    (path / "unet" / "config.json").write_text(json.dumps(config))


def sd_with_lcm_unet(path: pathlib.Path) -> None:
    """An SD 1.x-style folder whose UNet is LCM-distilled (takes a guidance embedding)."""
    save_sd_pipeline(path)
    config = json.loads((path / "unet" / "config.json").read_text())
    config["time_cond_proj_dim"] = 256
    (path / "unet" / "config.json").write_text(json.dumps(config))


#: builder -> a phrase the refusal must contain (the family's name)
UNSUPPORTED = {
    sdxl: "Stable Diffusion XL",
    sd3_transformer: "Stable Diffusion 3 transformer without its pipeline folder",
    flux: "Flux",
    flux_transformer: "Flux",
    pixart_alpha: "PixArt-α",
    pixart_sigma: "PixArt-Σ",
    dit: "DiT",
    lcm: "Latent Consistency Model (LCM)",
    flow_unet: "rectified-flow",
    sd_with_sdxl_unet: "Stable Diffusion XL",
    sd_with_lcm_unet: "Latent Consistency Model",
}


def build(builder, path: pathlib.Path) -> pathlib.Path:
    diffusers_logging.set_verbosity_error()  # "vae=None cannot be saved" is expected here
    builder(path)
    return path
