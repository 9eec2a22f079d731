"""Tiny random PixArt-α and PixArt-Σ pipeline folders, built offline.

A two-layer ``PixArtTransformer2DModel`` with learned sigma, a tiny T5 encoder with
`tiny_sd3`'s offline unigram tokenizer (PixArt's own vocabulary cannot be downloaded), the
tiny VAE of `tiny_dit` (scale factor 2) and PixArt's ``DPMSolverMultistepScheduler``
(linear betas, DPM-Solver++ 2). ``sample_size=128`` builds the size at which PixArt-α's
transformer takes the resolution and aspect-ratio conditions (4096 tokens; slower).
"""

from __future__ import annotations

import pathlib

import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
)
from diffusers.utils import logging as diffusers_logging
from tiny_dit import tiny_vae
from tiny_sd3 import t5_tokenizer
from transformers import T5Config, T5EncoderModel

WORDS = ("a", "photo", "of", "cat", "dog", "blurry", "red", "blue", "painting", "car")
#: T5's width (the transformer's caption_channels)
T5_WIDTH = 32
PIPELINES = {"alpha": PixArtAlphaPipeline, "sigma": PixArtSigmaPipeline}


def tiny_t5(tokenizer, seed: int = 2) -> T5EncoderModel:
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=T5_WIDTH, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1,
    )  # fmt: skip
    return T5EncoderModel(config).eval()


def tiny_pixart_transformer(sample_size: int = 8, seed: int = 0) -> PixArtTransformer2DModel:
    """Three heads: the resolution and aspect-ratio embeddings take a third of the width."""
    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        sample_size=sample_size, num_layers=2, patch_size=2, attention_head_dim=8,
        num_attention_heads=3, caption_channels=T5_WIDTH, in_channels=4, out_channels=8,
        cross_attention_dim=24, norm_type="ada_norm_single",
    ).eval()  # fmt: skip


def save_pixart_pipeline(path: pathlib.Path, variant: str = "alpha",
                         sample_size: int = 8) -> pathlib.Path:  # fmt: skip
    """A PixArtAlphaPipeline (`variant` "alpha") or PixArtSigmaPipeline ("sigma") folder."""
    diffusers_logging.set_verbosity_error()
    tokenizer = t5_tokenizer(WORDS)
    PIPELINES[variant](
        tokenizer=tokenizer, text_encoder=tiny_t5(tokenizer), vae=tiny_vae(),
        transformer=tiny_pixart_transformer(sample_size),
        scheduler=DPMSolverMultistepScheduler(beta_schedule="linear"),
    ).save_pretrained(path)  # fmt: skip
    return path


def spy_size_conditions(monkeypatch) -> list:
    """The ``added_cond_kwargs`` (resolution and aspect ratio) of each transformer call, in
    order, while `monkeypatch` holds."""
    seen: list = []
    forward = PixArtTransformer2DModel.forward

    def spy(self, hidden_states, *args, added_cond_kwargs=None, **kwargs):
        seen.append(added_cond_kwargs)
        return forward(self, hidden_states, *args, added_cond_kwargs=added_cond_kwargs, **kwargs)

    monkeypatch.setattr(PixArtTransformer2DModel, "forward", spy)
    return seen
