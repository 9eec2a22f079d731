"""Tiny random diffusers models, saved the way users' model folders are."""

from __future__ import annotations

import json
import pathlib

import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

ATTRIBUTES = [
    {"name": "digit", "values": ["0", "1", "2"], "droppable": True},
    {"name": "group", "values": ["light", "dark"], "droppable": True},
]


def tiny_unet(num_class_embeds: int | None = None, seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        num_class_embeds=num_class_embeds,
    ).eval()


def save_pipeline(
    path: pathlib.Path,
    *,
    conditional: bool = False,
    prediction_type: str = "epsilon",
    beta_schedule: str = "linear",
) -> pathlib.Path:
    """A DDPMPipeline folder; conditional models get a toolkit.json with digit and group."""
    unet = tiny_unet(12 if conditional else None)
    scheduler = DDPMScheduler(prediction_type=prediction_type, beta_schedule=beta_schedule)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(path)
    if conditional:
        (path / "toolkit.json").write_text(json.dumps({"format": 1, "attributes": ATTRIBUTES}))
    return path


def save_bare_unet(path: pathlib.Path) -> pathlib.Path:
    """A UNet2DModel folder with scheduler_config.json beside its weights."""
    tiny_unet().save_pretrained(path)
    DDPMScheduler().save_config(path)
    return path
