"""Tiny random folders of the diffusers families dtk does not load yet, saved with each
family's own pipeline class and denoiser, so their configs are what users' folders hold.

Only what tells the family apart is built (the denoiser, the scheduler, the pipeline
class); text encoders and VAEs are left out where the pipeline allows it, because nothing
here loads weights: dtk must name the family from the configs alone.
"""

from __future__ import annotations

import json
import pathlib

from diffusers import (
    DDPMPipeline,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    LCMScheduler,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
)
from diffusers.utils import logging as diffusers_logging
from tiny_models import tiny_unet
from tiny_sd import save_sd_pipeline


def _pixart(sample: bool) -> PixArtTransformer2DModel:
    return PixArtTransformer2DModel(
        sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=2,
        caption_channels=32, in_channels=4, out_channels=8 if sample else 4,
        cross_attention_dim=16, norm_type="ada_norm_single",
    )  # fmt: skip


def sd3_transformer(path: pathlib.Path) -> None:
    """A bare SD 3 transformer folder (SD 3 pipeline folders are supported: tiny_sd3.py)."""
    SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
        pooled_projection_dim=32, out_channels=4,
    ).save_pretrained(path)  # fmt: skip


def flux_transformer(path: pathlib.Path) -> None:
    """A bare transformer folder, as users download one component at a time (Flux pipeline
    folders are supported: tiny_flux.py)."""
    FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=[2, 2, 4],
    ).save_pretrained(path)  # fmt: skip


def pixart_transformer(path: pathlib.Path) -> None:
    """A bare PixArt transformer folder (PixArt pipeline folders are supported:
    tiny_pixart.py)."""
    _pixart(True).save_pretrained(path)


def dit_transformer(path: pathlib.Path) -> None:
    """A bare DiT transformer folder (DiT pipeline folders are supported: tiny_dit.py)."""
    DiTTransformer2DModel(
        sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=2,
        in_channels=4, out_channels=8, num_embeds_ada_norm=10,
    ).save_pretrained(path)  # fmt: skip


def lcm_unet2d(path: pathlib.Path) -> None:
    """A UNet2DModel folder whose scheduler is LCM's (latent consistency model folders, whose
    UNet is a text one, are supported: tiny_lcm.py)."""
    DDPMPipeline(unet=tiny_unet(), scheduler=LCMScheduler()).save_pretrained(path)


def flow_unet(path: pathlib.Path) -> None:
    """A UNet2DModel trained for rectified flow (its scheduler says so)."""
    DDPMPipeline(unet=tiny_unet(), scheduler=FlowMatchEulerDiscreteScheduler()).save_pretrained(
        path
    )


def sd_with_sdxl_unet(path: pathlib.Path) -> None:
    """An SD 1.x-style folder holding an SDXL UNet (a hand-converted checkpoint, say):
    SDXL pipeline folders are supported (tiny_sdxl.py), this one lacks the second encoder."""
    save_sd_pipeline(path)
    config = json.loads((path / "unet" / "config.json").read_text())
    config["addition_embed_type"] = "text_time"
    (path / "unet" / "config.json").write_text(json.dumps(config))


#: builder -> a phrase the refusal must contain (the family's name)
UNSUPPORTED = {
    sd3_transformer: "Stable Diffusion 3 transformer without its pipeline folder",
    flux_transformer: "Flux transformer without its pipeline folder",
    pixart_transformer: "PixArt transformer without its pipeline folder",
    dit_transformer: "DiT transformer without its pipeline folder",
    lcm_unet2d: "Latent Consistency Model (LCM)",
    flow_unet: "rectified-flow",
    sd_with_sdxl_unet: "folder holding a Stable Diffusion XL UNet",
}


def build(builder, path: pathlib.Path) -> pathlib.Path:
    diffusers_logging.set_verbosity_error()  # "vae=None cannot be saved" is expected here
    builder(path)
    return path
