"""A tiny random Stable-Diffusion-style pipeline folder, built offline.

No weights or tokenizer files can be downloaded: the CLIP tokenizer is `tiny_clip`'s
offline byte-level BPE one, with this module's test words as single tokens.
"""

from __future__ import annotations

import pathlib

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from tiny_clip import BOS, EOS, tiny_tokenizer
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
)

WORDS = ("a", "photo", "of", "cat", "dog", "blurry", "red", "blue", "painting", "car")
MAX_LENGTH = 16
HIDDEN = 32


def tiny_components(seed: int = 0) -> dict:
    tokenizer = tiny_tokenizer(WORDS, MAX_LENGTH)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=HIDDEN,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=16,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=HIDDEN,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_LENGTH,
            bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
            eos_token_id=tokenizer.convert_tokens_to_ids(EOS),
            pad_token_id=tokenizer.convert_tokens_to_ids(EOS),
        )
    )
    # SD's betas and timestep offset; the last step goes to sigma 0 (set_alpha_to_one, the
    # DDIM default), as our samplers' do, where SD's own config stops just short of it
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
    )
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }


def save_sd_pipeline(path: pathlib.Path) -> pathlib.Path:
    """A StableDiffusionPipeline folder (no safety checker)."""
    pipe = StableDiffusionPipeline(
        **tiny_components(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path


def pipeline_parts(model_dir: pathlib.Path) -> dict:
    """A saved SD folder's components as keyword arguments for diffusers' other
    Stable Diffusion pipelines (the safe and semantic ones), without a safety checker."""
    sd = StableDiffusionPipeline.from_pretrained(model_dir)
    parts = {k: getattr(sd, k) for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
    return {**parts, "safety_checker": None, "feature_extractor": None,
            "requires_safety_checker": False}  # fmt: skip


def save_safety_checker(path: pathlib.Path, seed: int = 0) -> StableDiffusionSafetyChecker:
    """A tiny random StableDiffusionSafetyChecker and its CLIPImageProcessor, saved as a pipeline
    folder's ``safety_checker/`` and ``feature_extractor/``; returns the checker.

    diffusers' checker starts with all-ones concept embeddings (every concept alike), so they
    are drawn at random here; thresholds stay at its default 1.0 for the caller to set.
    """
    torch.manual_seed(seed)
    checker = StableDiffusionSafetyChecker(
        CLIPConfig(
            text_config=CLIPTextConfig(hidden_size=HIDDEN, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=4).to_dict(),
            vision_config=CLIPVisionConfig(hidden_size=HIDDEN, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4,
                                           image_size=32, patch_size=8).to_dict(),
            projection_dim=HIDDEN,
        )
    ).eval()  # fmt: skip
    with torch.no_grad():
        checker.concept_embeds.normal_()
        checker.special_care_embeds.normal_()
    checker.save_pretrained(path / "safety_checker")
    CLIPImageProcessor(size=32, crop_size=32).save_pretrained(path / "feature_extractor")
    return checker


def spy_forwards(monkeypatch) -> tuple[list[tuple[int, ...]], list[int]]:
    """Record every prompt the text encoder sees (token ids) and every UNet batch size."""
    encoded: list[tuple[int, ...]] = []
    unet_batches: list[int] = []
    text_forward, unet_forward = CLIPTextModel.forward, UNet2DConditionModel.forward

    def spy_text(self, input_ids=None, **kwargs):
        encoded.extend(map(tuple, input_ids.tolist()))
        return text_forward(self, input_ids=input_ids, **kwargs)

    def spy_unet(self, sample, *args, **kwargs):
        unet_batches.append(sample.shape[0])
        return unet_forward(self, sample, *args, **kwargs)

    monkeypatch.setattr(CLIPTextModel, "forward", spy_text)
    monkeypatch.setattr(UNet2DConditionModel, "forward", spy_unet)
    return encoded, unet_batches
