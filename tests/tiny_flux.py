"""Tiny random Flux pipeline folders, built offline: dev (a guidance-distilled transformer,
``guidance_embeds``, with the pipeline's dynamically shifted scheduler) and schnell (no
guidance embedding, shift 1).

A CLIP text encoder (pooled output; `tiny_clip`'s offline tokenizer), a T5 encoder with
`tiny_sd3`'s offline unigram tokenizer, a Flux transformer (packed 2x2 latent patches, so
its ``in_channels`` is four times the VAE's latent channels) and a Flux-style VAE
(``shift_factor``, no quant convs, scale factor 2: a 32-pixel image is a 16x16 latent).
"""

from __future__ import annotations

import pathlib

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from tiny_clip import BOS, EOS, tiny_tokenizer
from tiny_sd3 import t5_tokenizer
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

WORDS = ("a", "photo", "of", "cat", "dog", "blurry", "red", "blue", "painting", "car")
MAX_LENGTH = 16
#: CLIP's width (the transformer's pooled projection), T5's (its joint attention)
CLIP_HIDDEN, JOINT = 32, 48
LATENT_CHANNELS = 4
#: FLUX.1-dev's scheduler config
DEV_SCHEDULER = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096,
                 "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0,
                 "use_dynamic_shifting": True}  # fmt: skip
#: FLUX.1-schnell's
SCHNELL_SCHEDULER = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096,
                     "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 1.0,
                     "use_dynamic_shifting": False}  # fmt: skip


def tiny_flux_components(guidance: bool = True, seed: int = 0) -> dict:
    tokenizer, tokenizer_2 = tiny_tokenizer(WORDS, MAX_LENGTH), t5_tokenizer(WORDS)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=1, num_single_layers=1,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=JOINT,
        pooled_projection_dim=CLIP_HIDDEN, guidance_embeds=guidance, axes_dims_rope=[2, 2, 4],
    ).eval()  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=LATENT_CHANNELS,
        layers_per_block=1, norm_num_groups=32, sample_size=32, scaling_factor=0.3611,
        shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
    ).eval()  # fmt: skip
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=CLIP_HIDDEN, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_LENGTH,
            bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
            eos_token_id=tokenizer.convert_tokens_to_ids(EOS),
            pad_token_id=tokenizer.convert_tokens_to_ids(EOS),
        )
    ).eval()  # fmt: skip
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2), d_model=JOINT, d_kv=8, d_ff=64, num_layers=2,
            num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0,
            pad_token_id=0, eos_token_id=1,
        )
    ).eval()  # fmt: skip
    config = DEV_SCHEDULER if guidance else SCHNELL_SCHEDULER
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": tokenizer_2,
        "scheduler": FlowMatchEulerDiscreteScheduler(**config),
    }


def save_flux_pipeline(path: pathlib.Path, guidance: bool = True) -> pathlib.Path:
    """A FluxPipeline folder: dev-style (guidance embedding) unless not `guidance`."""
    FluxPipeline(**tiny_flux_components(guidance)).save_pretrained(path)
    return path
