"""The text-to-image recipe of ``dtk train --caption COLUMN``: a tiny Stable Diffusion 3.

What it trains is a standard ``StableDiffusion3Pipeline`` folder, small enough to ship:

* a tokenizer built from the captions' words (`word_tokenizer`: CLIP's byte-level BPE with
  every caption word a single token, so any other text still tokenizes, byte by byte);
* two CLIP text encoders with projection (the pipeline wants two), trained from scratch
  together with the transformer; no T5 (the pipeline then gives T5's 256 tokens as zeros);
* an ``AutoencoderKL`` that halves the image side, trained first (`train_vae`), whose latents'
  mean and spread become its ``shift_factor`` and ``scaling_factor`` as in SD3;
* an MMDiT (``SD3Transformer2DModel``) trained by rectified flow: ``x_t = (1 - s) x0 + s e``
  with ``s`` logit-normal, predicting ``e - x0``, as SD3 was;
* ``FlowMatchEulerDiscreteScheduler`` without shift (the latents are 8x8, not 128x128).

Captions are dropped to the empty prompt with probability ``p_drop``: the pipeline's
negative prompt, so classifier-free guidance has its unconditional branch.

T5's 256 zero tokens are identical after every layer, so training runs them as one token
whose key counts 256 times in attention (`toolkit.models.zero_tokens`, which sampling uses
too); the networks computed are the pipeline's, to rounding (tests/test_text_training.py
compares), at an eighth of the cost.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import sys
from collections.abc import Sequence
from typing import Any

import torch  # this module is imported only to train

from toolkit.models.sd3 import T5_LENGTH
from toolkit.models.zero_tokens import FoldedZeros

#: the prompt length the tokenizers pad to: captions are a few words
MAX_LENGTH = 16
LATENT_CHANNELS = 4
#: the two CLIP encoders' widths and projections; the transformer's text width is their sum
CLIP_WIDTHS, CLIP_PROJECTIONS = (64, 64), (32, 32)
#: the transformer: heads x head width, and blocks
HEADS, HEAD_DIM, LAYERS = 4, 32, 6
VAE_CHANNELS = (32, 64)
#: the VAE's loss: squared error plus this much of the KL term (small: the latents only need
#: to be smooth enough to sample, the decoder must be near lossless)
KL_WEIGHT = 1e-6
VAE_LR = 1e-3
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_chars() -> list[str]:
    """CLIP's (and GPT-2's) byte -> printable-character table: printable Latin-1 bytes stand
    for themselves, the others are shifted past 255 in byte order."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def word_tokenizer(words: Sequence[str], max_length: int = MAX_LENGTH) -> Any:
    """A ``CLIPTokenizer`` over every byte, alone and word-final, with `words` single tokens:
    the merges build each word letter by letter, so the vocabulary is a real BPE one."""
    from transformers import CLIPTokenizer

    chars = _byte_chars()
    tokens = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    for word in words:
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            merges.append((symbols[0], symbols[1]))
            symbols = [symbols[0] + symbols[1], *symbols[2:]]
            tokens.append(symbols[0])
    tokens = [*dict.fromkeys(tokens), BOS, EOS]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)},
                         merges=list(dict.fromkeys(merges)), model_max_length=max_length,
                         pad_token=EOS)  # fmt: skip


def caption_words(captions: Sequence[str]) -> list[str]:
    """The distinct words of `captions` as CLIP's tokenizer sees them (lower case, letters),
    in order of first use."""
    words = (w for caption in captions for w in re.findall(r"[a-z]+", caption.lower()))
    return list(dict.fromkeys(words))


def build_vae() -> Any:
    """An SD3-style ``AutoencoderKL`` (no quant convs) that halves the side, 4 channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=VAE_CHANNELS,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_CHANNELS),
        latent_channels=LATENT_CHANNELS, layers_per_block=1, norm_num_groups=32,
        use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip


def build_text_encoder(tokenizer: Any, width: int, projection: int) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    eos = tokenizer.convert_tokens_to_ids(EOS)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_LENGTH,
        projection_dim=projection, bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
        eos_token_id=eos, pad_token_id=eos,
    )  # fmt: skip
    return CLIPTextModelWithProjection(config)


def build_transformer(latent_side: int) -> Any:
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=latent_side, patch_size=2, in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS, num_layers=LAYERS, attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS, joint_attention_dim=sum(CLIP_WIDTHS),
        caption_projection_dim=HEADS * HEAD_DIM, pooled_projection_dim=sum(CLIP_PROJECTIONS),
        pos_embed_max_size=latent_side // 2,
    )  # fmt: skip


class TextNetwork(torch.nn.Module):
    """What the flow loss trains: the transformer and both text encoders, as one module (so
    one optimizer, one moving average and one checkpoint file cover them)."""

    def __init__(self, tokenizer: Any, latent_side: int) -> None:
        super().__init__()
        self.transformer = build_transformer(latent_side)
        self.text_encoder = build_text_encoder(tokenizer, CLIP_WIDTHS[0], CLIP_PROJECTIONS[0])
        self.text_encoder_2 = build_text_encoder(tokenizer, CLIP_WIDTHS[1], CLIP_PROJECTIONS[1])

    def encode(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids ``[B, L]`` -> the CLIP part of the pipeline's ``prompt_embeds``
        ``[B, L, sum(widths)]`` (each encoder's penultimate layer) and the pooled
        projections ``[B, sum(projections)]``, as ``StableDiffusion3Pipeline.encode_prompt``
        computes them."""
        hidden, pooled = [], []
        for encoder in (self.text_encoder, self.text_encoder_2):
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        return torch.cat(hidden, dim=-1), torch.cat(pooled, dim=-1)

    def forward(self, latents: torch.Tensor, sigmas: torch.Tensor, ids: torch.Tensor) -> Any:
        """The velocity the transformer predicts at noise levels `sigmas` for captions `ids`,
        with T5's zero tokens run as one (`toolkit.models.zero_tokens`)."""
        clip, pooled = self.encode(ids)
        context = torch.cat([clip, clip.new_zeros(clip.shape[0], 1, clip.shape[-1])], dim=1)
        with FoldedZeros(self.transformer, copies=T5_LENGTH):
            return self.transformer(
                hidden_states=latents, encoder_hidden_states=context,
                pooled_projections=pooled, timestep=sigmas * 1000,
            ).sample  # fmt: skip


def train_vae(images: torch.Tensor, *, steps: int, batch_size: int, seed: int,
              progress: bool) -> Any:  # fmt: skip
    """`build_vae` fitted to `images` (``[N, 3, H, W]`` in [-1, 1]): AdamW on squared error
    plus `KL_WEIGHT` times the KL term, seeded by `seed`, one draw order (batch, posterior)."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    vae = build_vae().train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=VAE_LR, weight_decay=0.0)
    bar = tqdm(range(steps), desc="autoencoder", unit="step", file=sys.stderr,
               disable=not progress)  # fmt: skip
    for _ in bar:
        x = images[torch.randint(0, len(images), (batch_size,), generator=g)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=g)).sample
        loss = torch.nn.functional.mse_loss(recon, x) + KL_WEIGHT * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.5f}")
    return vae.eval().requires_grad_(False)


def encode_latents(vae: Any, images: torch.Tensor) -> torch.Tensor:
    """The images' latents, scaled as the pipeline's transformer sees them: each posterior's
    mean, less their overall mean, over their spread. The two numbers go into the VAE's
    config (``shift_factor``, ``scaling_factor``), where the pipeline reads them to decode."""
    with torch.no_grad():
        means = torch.cat([vae.encode(chunk).latent_dist.mode() for chunk in images.split(256)])
    shift, scale = means.mean().item(), 1.0 / means.std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return (means - shift) * scale


@dataclasses.dataclass
class TextData:
    """The training set as the flow loop samples it."""

    latents: torch.Tensor  # [N, C, h, w], scaled by the VAE's shift and scale
    ids: torch.Tensor  # [N, MAX_LENGTH]: each image's caption, tokenized
    empty: torch.Tensor  # [MAX_LENGTH]: the empty prompt (a dropped caption)


def tokenize(tokenizer: Any, captions: Sequence[str]) -> torch.Tensor:
    """Token ids as the pipeline makes them: padded to the tokenizer's length, truncated."""
    return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids  # fmt: skip


def flow_loss(network: TextNetwork, data: TextData, batch_size: int, p_drop: float,
              g: torch.Generator) -> torch.Tensor:  # fmt: skip
    """Rectified flow's loss on one batch. The draws from `g` come in a fixed order (images,
    caption drops, noise levels, noise) that checkpoints depend on."""
    idx = torch.randint(0, len(data.latents), (batch_size,), generator=g)
    x0, ids = data.latents[idx], data.ids[idx].clone()
    if p_drop > 0:
        ids[torch.rand(batch_size, generator=g) < p_drop] = data.empty
    sigmas = torch.sigmoid(torch.randn(batch_size, generator=g))  # logit-normal, as SD3
    noise = torch.randn(x0.shape, generator=g)
    s = sigmas.view(-1, 1, 1, 1)
    velocity = network((1 - s) * x0 + s * noise, sigmas, ids)
    return torch.nn.functional.mse_loss(velocity, noise - x0)


def save_pipeline(out: pathlib.Path, network: TextNetwork, vae: Any, tokenizer: Any) -> None:
    """`out` as a ``StableDiffusion3Pipeline`` folder (no T5), loadable by diffusers."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # "text_encoder_3=None cannot be saved": by design
    try:
        StableDiffusion3Pipeline(
            transformer=network.transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
            text_encoder=network.text_encoder, tokenizer=tokenizer,
            text_encoder_2=network.text_encoder_2, tokenizer_2=tokenizer,
            text_encoder_3=None, tokenizer_3=None,
        ).save_pretrained(out)  # fmt: skip
    finally:
        diffusers_logging.set_verbosity(level)


@dataclasses.dataclass
class TextRecipe:
    """`dtk train --caption`'s recipe for the shared loop (`toolkit.recipes.training`)."""

    config: Any  # a TrainConfig
    tokenizer: Any
    vae: Any
    data: TextData

    @classmethod
    def load(cls, config: Any, checkpoint: pathlib.Path, *, progress: bool) -> TextRecipe:
        """The images and captions, the tokenizer their words make, the autoencoder (taken
        from `checkpoint` when an earlier run trained it there) and the latents."""
        from toolkit.data.dataset_folder import load_image_folder

        dataset = load_image_folder(config.data, [config.caption], size=config.size)
        captions = dataset.metadata[config.caption].astype(str).tolist()
        tokenizer = word_tokenizer(caption_words(captions))
        images = dataset.images * 2 - 1
        vae = _autoencoder(config, checkpoint / "vae", images, progress)
        data = TextData(encode_latents(vae, images), tokenize(tokenizer, captions),
                        tokenize(tokenizer, [""])[0])  # fmt: skip
        return cls(config, tokenizer, vae, data)

    def networks(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        side = self.data.latents.shape[-1]
        return TextNetwork(self.tokenizer, side), TextNetwork(self.tokenizer, side)

    def loss(self, network: torch.nn.Module, g: torch.Generator) -> torch.Tensor:
        return flow_loss(network, self.data, self.config.batch_size, self.config.p_drop, g)

    def write(self, folder: pathlib.Path, ema: torch.nn.Module) -> None:
        save_pipeline(folder, ema, self.vae, self.tokenizer)


def _autoencoder(config: Any, saved: pathlib.Path, images: torch.Tensor, progress: bool) -> Any:
    """The autoencoder a checkpoint holds, or one trained now and saved there (renamed into
    place whole, so that a resumed run never finds half of one)."""
    import os
    import shutil
    import tempfile

    from diffusers import AutoencoderKL

    if (saved / "config.json").is_file():
        from diffusers.configuration_utils import FrozenDict

        vae = AutoencoderKL.from_pretrained(saved).eval().requires_grad_(False)
        # from_pretrained records where it read from, which the model folder must not ship
        vae._internal_dict = FrozenDict({k: v for k, v in vae.config.items()
                                         if k != "_name_or_path"})  # fmt: skip
        return vae
    vae = train_vae(images, steps=config.vae_steps, batch_size=config.batch_size,
                    seed=config.seed, progress=progress)  # fmt: skip
    saved.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(dir=saved.parent, prefix=".vae."))
    try:
        vae.save_pretrained(staging)
        os.replace(staging, saved)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return vae
