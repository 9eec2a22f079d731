"""A tiny random DiT pipeline folder (``DiTPipeline.save_pretrained``), built offline.

A one-layer ``DiTTransformer2DModel`` with learned sigma (out_channels twice the latent's),
ImageNet's 1000 class embeddings (``DiTPipeline`` hard-codes 1000 as the null class, so a
pipeline run needs the table's 1001 rows), a tiny ``AutoencoderKL`` (scale factor 2) and
the scheduler DiT-XL-2's folders hold (``DDIMScheduler``, linear betas, no clipping).
``id2label`` names a few classes, one of them by two names and two by one name.
"""

from __future__ import annotations

import json
import pathlib

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

LATENT = (4, 8, 8)
NUM_CLASSES = 1000
#: a few ImageNet-style labels: id -> "name, other name"; "crane" names two classes
ID2LABEL = {
    0: "tench, Tinca tinca",
    1: "goldfish",
    134: "crane",
    207: "golden retriever",
    281: "tabby, tabby cat",
    517: "crane",
}


def tiny_vae(seed: int = 1) -> AutoencoderKL:
    """An SD-style VAE with scale factor 2 (8x8 latents -> 16x16 images)."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=LATENT[0],
        layers_per_block=1, norm_num_groups=32, sample_size=16,
    ).eval()  # fmt: skip


def tiny_dit_transformer(seed: int = 0, learned_sigma: bool = True) -> DiTTransformer2DModel:
    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        sample_size=LATENT[1], num_layers=2, patch_size=2, attention_head_dim=8,
        num_attention_heads=2, in_channels=LATENT[0],
        out_channels=2 * LATENT[0] if learned_sigma else LATENT[0],
        num_embeds_ada_norm=NUM_CLASSES,
    ).eval()  # fmt: skip


def save_dit_pipeline(path: pathlib.Path, *, scheduler=None, learned_sigma: bool = True,
                      id2label: dict | None = ID2LABEL) -> pathlib.Path:  # fmt: skip
    """A DiTPipeline folder: DDIM as DiT-XL-2's, unless `scheduler` is given; `id2label`
    in model_index.json, where the published folders keep it (``save_pretrained`` does not
    write it: the pipeline does not register it in its config)."""
    if scheduler is None:
        scheduler = DDIMScheduler(beta_schedule="linear", clip_sample=False)
    DiTPipeline(transformer=tiny_dit_transformer(learned_sigma=learned_sigma), vae=tiny_vae(),
                scheduler=scheduler).save_pretrained(path)  # fmt: skip
    if id2label is not None:
        index = json.loads((path / "model_index.json").read_text())
        index["id2label"] = {str(k): v for k, v in id2label.items()}
        (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path
