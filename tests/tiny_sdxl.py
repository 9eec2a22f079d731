"""Tiny random Stable Diffusion XL pipeline folders, built offline.

The base folder is what ``StableDiffusionXLPipeline.save_pretrained`` writes: two CLIP text
encoders (the second with projection; tokenizers: `tiny_clip`'s offline byte-level BPE) of
different widths, a UNet with SDXL's added conditioning (``addition_embed_type="text_time"``:
the pooled text and six size numbers), a VAE with SDXL's scaling factor and SDXL's own
``EulerDiscreteScheduler`` config (``leading`` spacing, ``steps_offset=1``). The refiner folder
is what ``StableDiffusionXLImg2ImgPipeline`` writes for SDXL's refiner: ``text_encoder``
null, the second encoder alone, ``requires_aesthetics_score`` (five numbers: sizes, crop and
the aesthetic score) and ``force_zeros_for_empty_prompt`` false.
"""

from __future__ import annotations

import pathlib

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import logging as diffusers_logging
from tiny_clip import BOS, EOS, tiny_tokenizer
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

WORDS = ("a", "photo", "of", "cat", "dog", "blurry", "red", "blue", "painting", "car")
MAX_LENGTH = 16
#: the encoders' widths, the second's projection (the pooled text) and the size embedding
HIDDEN, PROJECTION, TIME_DIM = (32, 48), 24, 8
LATENT = (4, 8, 8)
#: SDXL's scheduler config (stabilityai/stable-diffusion-xl-base-1.0)
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 steps_offset=1, timestep_spacing="leading", interpolation_type="linear",
                 use_karras_sigmas=False, prediction_type="epsilon")  # fmt: skip


def _clip(cls, tokenizer, hidden: int, **extra):
    special = {name: tokenizer.convert_tokens_to_ids(token)
               for name, token in (("bos_token_id", BOS), ("eos_token_id", EOS),
                                   ("pad_token_id", EOS))}  # fmt: skip
    return cls(
        CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=MAX_LENGTH, **special, **extra)
    ).eval()  # fmt: skip


def _unet(cross_attention_dim: int, time_ids: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=LATENT[1], in_channels=LATENT[0], out_channels=LATENT[0],
        block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cross_attention_dim,
        attention_head_dim=(2, 4), norm_num_groups=32, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=PROJECTION + time_ids * TIME_DIM,
    ).eval()  # fmt: skip


def tiny_sdxl_components(refiner: bool = False, seed: int = 0) -> dict:
    """The components of a base folder, or of a refiner folder (one encoder, five ids)."""
    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = tiny_tokenizer(WORDS, MAX_LENGTH), tiny_tokenizer(WORDS, MAX_LENGTH)
    text_encoder = None if refiner else _clip(CLIPTextModel, tokenizer, HIDDEN[0])
    text_encoder_2 = _clip(CLIPTextModelWithProjection, tokenizer_2, HIDDEN[1],
                           projection_dim=PROJECTION)  # fmt: skip
    width = HIDDEN[1] if refiner else sum(HIDDEN)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=LATENT[0],
        layers_per_block=1, norm_num_groups=32, sample_size=16, scaling_factor=0.13025,
        force_upcast=True,
    ).eval()  # fmt: skip
    return {
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": None if refiner else tokenizer,
        "tokenizer_2": tokenizer_2,
        "unet": _unet(width, 5 if refiner else 6),
        "scheduler": EulerDiscreteScheduler(**SCHEDULER),
    }


def save_sdxl_pipeline(path: pathlib.Path, force_zeros: bool = True) -> pathlib.Path:
    """A StableDiffusionXLPipeline folder (`force_zeros`: its force_zeros_for_empty_prompt)."""
    pipe = StableDiffusionXLPipeline(**tiny_sdxl_components(), add_watermarker=False,
                                     force_zeros_for_empty_prompt=force_zeros)  # fmt: skip
    pipe.save_pretrained(path)
    return path


def save_sdxl_refiner(path: pathlib.Path) -> pathlib.Path:
    """A refiner-style StableDiffusionXLImg2ImgPipeline folder (text_encoder null)."""
    diffusers_logging.set_verbosity_error()  # "text_encoder=None cannot be saved"
    StableDiffusionXLImg2ImgPipeline(
        **tiny_sdxl_components(refiner=True), requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False, add_watermarker=False,
    ).save_pretrained(path)  # fmt: skip
    return path
