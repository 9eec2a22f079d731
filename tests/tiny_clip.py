"""A tiny random CLIP model folder (`CLIPModel` + `CLIPProcessor`), built offline.

No tokenizer files can be downloaded, so `tiny_tokenizer` builds a byte-level BPE vocabulary
(`toolkit.recipes.text_model.word_tokenizer`; the tiny pipelines of `tiny_sd` and the others
use it too): every byte, alone and word-final, the special tokens, and merges that make the
given words single tokens (so prompts exercise real BPE merging).
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from toolkit.recipes.text_model import BOS, EOS, word_tokenizer

WORDS = ("a", "an", "the", "photo", "drawing", "of", "light", "dark", "digit", "picture")
MAX_LENGTH = 16
IMAGE_SIZE = 32


def tiny_tokenizer(words: Sequence[str] = WORDS, max_length: int = MAX_LENGTH) -> CLIPTokenizer:
    """A CLIPTokenizer over every byte, with `words` as single tokens (the shipped text
    model's own tokenizer recipe)."""
    return word_tokenizer(words, max_length)


def save_clip(path: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """`path` holding a random CLIP model with its tokenizer and image processor."""
    tokenizer = tiny_tokenizer()
    special = {
        "bos_token_id": tokenizer.convert_tokens_to_ids(BOS),
        "eos_token_id": tokenizer.convert_tokens_to_ids(EOS),
        "pad_token_id": tokenizer.convert_tokens_to_ids(EOS),
    }
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": MAX_LENGTH,
            **special,
        },
        vision_config={
            "image_size": IMAGE_SIZE,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    model.save_pretrained(path)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def reference_text(path: pathlib.Path, prompts: list[str]) -> torch.Tensor:
    """Unit-length text embeddings of `prompts`, straight from transformers."""
    from transformers import AutoTokenizer

    model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tokens = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        features = model.get_text_features(**tokens).pooler_output
    return features / features.norm(dim=-1, keepdim=True)


def reference_proba(path: pathlib.Path, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """softmax(logit_scale * cosine) of `images` against unit-length `text` embeddings."""
    from transformers import AutoImageProcessor

    model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
    processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    pixels = processor(
        images=list(images), do_rescale=False, input_data_format="channels_first",
        return_tensors="pt",
    ).pixel_values  # fmt: skip
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixels).pooler_output
        features = features / features.norm(dim=-1, keepdim=True)
        return (model.logit_scale.exp() * features @ text.T).softmax(dim=-1)
