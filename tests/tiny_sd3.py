"""A tiny random Stable Diffusion 3 pipeline folder, built offline.

Two CLIP text encoders with projection (tokenizers: `tiny_clip`'s offline byte-level BPE),
an optional T5 encoder with a tiny unigram tokenizer built here (T5's own vocabulary cannot
be downloaded), an MMDiT transformer, an SD3-style VAE (``shift_factor``, no quant convs)
and a ``FlowMatchEulerDiscreteScheduler`` with SD3's shift. The encoders' widths differ, and
the joint attention is wider than their concatenation, so the padding is exercised.
"""

from __future__ import annotations

import pathlib

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.utils import logging as diffusers_logging
from tiny_clip import BOS, EOS, tiny_tokenizer
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

WORDS = ("a", "photo", "of", "cat", "dog", "blurry", "red", "blue", "painting", "car")
MAX_LENGTH = 16
#: the CLIP encoders' widths and projections, and the transformer's text width
HIDDEN, PROJECTION = (32, 48), (16, 24)
JOINT = 96
SHIFT = 3.0
LATENT = (4, 8, 8)


def _clip(tokenizer, hidden: int, projection: int) -> CLIPTextModelWithProjection:
    return CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_LENGTH,
            projection_dim=projection, bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
            eos_token_id=tokenizer.convert_tokens_to_ids(EOS),
            pad_token_id=tokenizer.convert_tokens_to_ids(EOS),
        )
    ).eval()  # fmt: skip


def t5_tokenizer(words=WORDS) -> T5Tokenizer:
    """A T5 unigram tokenizer over `words` (each one token) and single letters."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{w}", -1.0) for w in words]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def tiny_sd3_components(t5: bool = False, seed: int = 0) -> dict:
    tokenizer, tokenizer_2 = tiny_tokenizer(WORDS, MAX_LENGTH), tiny_tokenizer(WORDS, MAX_LENGTH)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=LATENT[1], patch_size=2, in_channels=LATENT[0], num_layers=2,
        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=JOINT,
        caption_projection_dim=32, pooled_projection_dim=sum(PROJECTION), out_channels=LATENT[0],
        pos_embed_max_size=16,
    ).eval()  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=LATENT[0],
        layers_per_block=1, norm_num_groups=32, sample_size=16, scaling_factor=1.5305,
        shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
    ).eval()  # fmt: skip
    text_encoder = _clip(tokenizer, HIDDEN[0], PROJECTION[0])
    text_encoder_2 = _clip(tokenizer_2, HIDDEN[1], PROJECTION[1])
    text_encoder_3 = tokenizer_3 = None
    if t5:
        tokenizer_3 = t5_tokenizer()
        config = T5Config(
            vocab_size=len(tokenizer_3), d_model=JOINT, d_kv=8, d_ff=64, num_layers=2,
            num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0,
            pad_token_id=0, eos_token_id=1,
        )  # fmt: skip
        text_encoder_3 = T5EncoderModel(config).eval()
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": tokenizer_2,
        "text_encoder_3": text_encoder_3,
        "tokenizer_3": tokenizer_3,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=SHIFT),
    }


def save_sd3_pipeline(path: pathlib.Path, t5: bool = False) -> pathlib.Path:
    """A StableDiffusion3Pipeline folder; without T5 (text_encoder_3 null) unless `t5`."""
    diffusers_logging.set_verbosity_error()  # "text_encoder_3=None cannot be saved"
    StableDiffusion3Pipeline(**tiny_sd3_components(t5)).save_pretrained(path)
    return path
