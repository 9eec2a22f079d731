"""A tiny random latent consistency model folder, built offline: `tiny_sd`'s components
with a UNet that takes a guidance embedding (``time_cond_proj_dim``) and an
``LCMScheduler`` on SD's noise levels, saved by ``LatentConsistencyModelPipeline``."""

from __future__ import annotations

import json
import pathlib

import torch
from diffusers import LatentConsistencyModelPipeline, LCMScheduler, UNet2DConditionModel
from tiny_sd import HIDDEN, save_sd_pipeline, tiny_components

#: the width of the UNet's guidance embedding
GUIDANCE_DIM = 32


def tiny_lcm_components(seed: int = 0) -> dict:
    components = tiny_components(seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=HIDDEN,
        attention_head_dim=8, norm_num_groups=32, time_cond_proj_dim=GUIDANCE_DIM,
    ).eval()  # fmt: skip
    # LCMScheduler's defaults are SD's noise levels (scaled_linear, 0.00085 to 0.012)
    return {**components, "unet": unet, "scheduler": LCMScheduler()}


def save_lcm_pipeline(path: pathlib.Path) -> pathlib.Path:
    """A LatentConsistencyModelPipeline folder (no safety checker)."""
    LatentConsistencyModelPipeline(
        **tiny_lcm_components(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(path)  # fmt: skip
    return path


def save_sd_with_lcm_unet(path: pathlib.Path) -> pathlib.Path:
    """A StableDiffusionPipeline folder whose UNet config says it takes a guidance embedding
    (an LCM-distilled UNet dropped into an SD folder; configs only: its weights lack the
    embedding's layer)."""
    save_sd_pipeline(path)
    config = json.loads((path / "unet" / "config.json").read_text())
    config["time_cond_proj_dim"] = 256
    (path / "unet" / "config.json").write_text(json.dumps(config))
    return path


def save_sd_with_lcm_scheduler(path: pathlib.Path) -> pathlib.Path:
    """A StableDiffusionPipeline folder whose scheduler is an LCMScheduler (an LCM-LoRA fused
    into SD, say): its UNet takes no guidance embedding."""
    save_sd_pipeline(path)
    LCMScheduler().save_pretrained(path / "scheduler")
    return path
