"""Tiny random diffusers models, saved the way users' model folders are."""

from __future__ import annotations

import json
import pathlib

import torch
from diffusers import (
    DDPMPipeline,
    DDPMScheduler,
    ScoreSdeVePipeline,
    ScoreSdeVeScheduler,
    UNet2DModel,
)

ATTRIBUTES = [
    {"name": "digit", "values": ["0", "1", "2"], "droppable": True},
    {"name": "group", "values": ["light", "dark"], "droppable": True},
]


def tiny_unet(
    num_class_embeds: int | None = None, seed: int = 0, out_channels: int = 3, **config
) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=out_channels,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        num_class_embeds=num_class_embeds,
        **config,
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


def save_learned_variance_pipeline(
    path: pathlib.Path,
    *,
    variance_type: str = "learned_range",
    conditional: bool = False,
    constant_variance: float | None = None,
) -> pathlib.Path:
    """A DDPMPipeline folder of an iDDPM-style model: the UNet outputs 6 channels (the
    mean's, then the variance's) and the scheduler's variance_type says how to read them.
    `constant_variance`: the variance channels output that value everywhere (a random
    network's are as often negative, whose square root ``learned`` would take)."""
    unet = tiny_unet(12 if conditional else None, out_channels=6)
    if constant_variance is not None:
        with torch.no_grad():
            unet.conv_out.weight[3:] = 0
            unet.conv_out.bias[3:] = constant_variance
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(variance_type=variance_type)).save_pretrained(
        path
    )
    if conditional:
        (path / "toolkit.json").write_text(json.dumps({"format": 1, "attributes": ATTRIBUTES}))
    return path


def tiny_ve_unet(num_class_embeds: int | None = None, seed: int = 0) -> UNet2DModel:
    """An NCSN++-style score network: Gaussian Fourier features of log sigma, and an output
    divided by sigma (``time_embedding_type="fourier"``)."""
    return tiny_unet(num_class_embeds, seed, time_embedding_type="fourier")


def save_ve_pipeline(
    path: pathlib.Path, *, conditional: bool = False, **scheduler_config
) -> pathlib.Path:
    """A ScoreSdeVePipeline folder (its scheduler: ScoreSdeVeScheduler's defaults, sigma
    0.01 to 1348, unless `scheduler_config` says otherwise)."""
    scheduler = ScoreSdeVeScheduler(**scheduler_config)
    ScoreSdeVePipeline(unet=tiny_ve_unet(12 if conditional else None),
                       scheduler=scheduler).save_pretrained(path)  # fmt: skip
    if conditional:
        (path / "toolkit.json").write_text(json.dumps({"format": 1, "attributes": ATTRIBUTES}))
    return path
