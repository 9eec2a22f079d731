"""Every model family against its diffusers pipeline, measured in one process.

No weights can be downloaded, and speed and memory do not depend on them: each family's
folder is built here with random weights (offline tokenizers from ``tests/``), in one of
two shapes:

* ``--size small`` (the default on a CPU): each family's architecture at widths and depths
  two CPU cores run in about one to three seconds a batch of 4 (32x32 latents, SD 3's
  16x16, a scale-4 VAE: 128-pixel images; text encoders of 2 layers at the real token
  lengths: CLIP 77, SD 3's T5 256, PixArt-Σ's 300, Flux's 512; 32x32 pixel UNets);
* ``--size full`` (the default on a GPU): the published architectures (SD 1.5, SDXL base,
  SD 3 medium, DiT-XL-2 256, PixArt-Σ 1024, LCM-Dreamshaper = SD 1.5, FLUX.1-dev's widths),
  except that Flux's blocks and every T5-XXL are cut to a few layers, so a folder builds
  in about a minute (the published widths keep every matrix its real shape).

Per family (``--family sd15|sdxl|sd3|flux|pixart|dit|lcm|iddpm|ve``, or ``all``; the last
two are the unconditional pixel-space families: a learned-variance UNet and a VE score-SDE
model, with a CIFAR-sized UNet on a CPU) and dtype, the same
request both ways, at equal steps with the same scheduler and guidance, one batch of
``--batch`` samples, each sample from its own generator seeded ``i``:

* ours: `toolkit.generate` (the family's twin of the pipeline's scheduler, PNG files,
  metadata and run.json written);
* diffusers: the family's pipeline, ``from_pretrained`` and called with the same prompt,
  steps, guidance scale and generators, its PIL images saved as PNG files (the same job: a
  generation's images on disk; ours also writes metadata.csv and run.json).

Both load from the folder on disk each time (loading counts on both sides). Timings are
the median of ``--repeats`` runs taken alternately (so drift hits both sides), after a
warm-up; the table gives ``ours / diffusers`` (target <= 1.02) and ours' images/s. It
also gives ``batched / split CFG``: one network forward of ``2B`` (how guidance runs CFG's
two branches) against two of ``B``, through the loaded model (`toolkit.models.Model`). On
CUDA the table adds the peak memory (``torch.cuda.max_memory_allocated``) of ours plain,
with ``attention_slicing`` and with ``vae_tiling``, and of the pipeline: ours moves the
text encoders off the GPU once the prompts are encoded (docs/models.md, "Text encoders and memory").

Run: ``python benchmarks/text_to_image.py --family all [--device cuda] [--dtypes ...]``
(defaults: cuda, full shapes, float32,float16,bfloat16, batch 4 where a GPU is; else cpu,
small shapes, float32, batch 4; steps: each family's small count, ``--steps`` for all).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import diffusers
import torch
import transformers
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    LCMScheduler,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
)

import toolkit

# the tests' offline tokenizers: no tokenizer files can be downloaded either
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
from tiny_clip import BOS, EOS, tiny_tokenizer
from tiny_sd3 import t5_tokenizer

PROMPT = "a photo of a cat"
WORDS = ("a", "photo", "of", "cat")
CLASS, CLASS_ID = "tabby cat", 281  # DiT's request
# diffusers 0.42 renames from_pretrained's torch_dtype; older releases know only that name
warnings.filterwarnings("ignore", message=".*Please use `dtype`", category=FutureWarning)
diffusers.utils.logging.disable_progress_bar()  # loading bars cost time on one side only
transformers.utils.logging.disable_progress_bar()


# -- the folders ---------------------------------------------------------------------------


def clip(cls: Any, hidden: int, layers: int, heads: int, **extra: Any) -> tuple[Any, Any]:
    """A random CLIP text encoder of `cls` and its offline tokenizer (77 tokens)."""
    tokenizer = tiny_tokenizer(WORDS, max_length=77)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS),
        pad_token_id=tokenizer.convert_tokens_to_ids(EOS), **extra,
    )  # fmt: skip
    return cls(config).eval(), tokenizer


def t5(width: int, layers: int, heads: int, ff: int) -> tuple[Any, Any]:
    """A random T5 encoder and the offline unigram tokenizer."""
    tokenizer = t5_tokenizer(WORDS)
    config = T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=width // heads, d_ff=ff,
                      num_layers=layers, num_heads=heads, decoder_start_token_id=0,
                      pad_token_id=0, eos_token_id=1, feed_forward_proj="gated-gelu")  # fmt: skip
    return T5EncoderModel(config).eval(), tokenizer


def vae(size: str, latent_channels: int = 4, **extra: Any) -> AutoencoderKL:
    """SD's VAE (scale factor 8) at full size; a small one of scale factor 4."""
    if size == "full":
        shape = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2)
    else:
        shape = dict(block_out_channels=(32, 64, 64), layers_per_block=1)
    levels = len(shape["block_out_channels"])
    return AutoencoderKL(latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, **shape,
                         **extra).eval()  # fmt: skip


SD_UNET = {
    "full": dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 layers_per_block=2, cross_attention_dim=768, attention_head_dim=8),
    "small": dict(sample_size=32, block_out_channels=(64, 128),
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                  layers_per_block=1, cross_attention_dim=128, attention_head_dim=8),
}  # fmt: skip
SD_CLIP = {"full": (768, 12, 12), "small": (128, 2, 4)}
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def sd_parts(size: str, **unet: Any) -> dict[str, Any]:
    text_encoder, tokenizer = clip(CLIPTextModel, *SD_CLIP[size])
    return dict(unet=UNet2DConditionModel(in_channels=4, out_channels=4, **SD_UNET[size], **unet),
                vae=vae(size), text_encoder=text_encoder, tokenizer=tokenizer,
                safety_checker=None, feature_extractor=None,
                requires_safety_checker=False)  # fmt: skip


def build_sd15(size: str) -> Any:
    scheduler = DDIMScheduler(**SD_BETAS, clip_sample=False, steps_offset=1)
    return diffusers.StableDiffusionPipeline(**sd_parts(size), scheduler=scheduler)


def build_lcm(size: str) -> Any:
    return diffusers.LatentConsistencyModelPipeline(**sd_parts(size, time_cond_proj_dim=256),
                                                    scheduler=LCMScheduler())  # fmt: skip


def build_sdxl(size: str) -> Any:
    if size == "full":
        (h1, l1, a1), (h2, l2, a2), proj, time_dim = (768, 12, 12), (1280, 32, 20), 1280, 256
        unet = dict(
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
        )
    else:
        (h1, l1, a1), (h2, l2, a2), proj, time_dim = (64, 2, 4), (128, 2, 4), 128, 32
        unet = dict(sample_size=32, block_out_channels=(64, 128), layers_per_block=1,
                    attention_head_dim=(2, 4))  # fmt: skip
    levels = len(unet["block_out_channels"])
    text_encoder, tokenizer = clip(CLIPTextModel, h1, l1, a1)
    text_encoder_2, tokenizer_2 = clip(CLIPTextModelWithProjection, h2, l2, a2,
                                       projection_dim=proj)  # fmt: skip
    unet_model = UNet2DConditionModel(
        in_channels=4, out_channels=4, cross_attention_dim=h1 + h2, use_linear_projection=True,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=proj + 6 * time_dim, **unet,
    )  # fmt: skip
    scheduler = EulerDiscreteScheduler(**SD_BETAS, steps_offset=1, timestep_spacing="leading")
    return diffusers.StableDiffusionXLPipeline(
        unet=unet_model, vae=vae(size, scaling_factor=0.13025, force_upcast=True),
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2, scheduler=scheduler, add_watermarker=False,
    )  # fmt: skip


def build_sd3(size: str) -> Any:
    if size == "full":  # SD 3 medium; T5-XXL's width, 2 of its 24 layers
        (h1, l1, a1), (h2, l2, a2), joint = (768, 12, 12), (1280, 32, 20), 4096
        transformer = dict(sample_size=128, num_layers=24, attention_head_dim=64,
                           num_attention_heads=24, caption_projection_dim=1536,
                           pos_embed_max_size=192)  # fmt: skip
        text_3 = t5(joint, 2, 64, 10240)
    else:
        (h1, l1, a1), (h2, l2, a2), joint = (64, 2, 4), (128, 2, 4), 256
        transformer = dict(sample_size=16, num_layers=4, attention_head_dim=32,
                           num_attention_heads=4, caption_projection_dim=128,
                           pos_embed_max_size=32)  # fmt: skip
        text_3 = t5(joint, 2, 4, 512)
    text_encoder, tokenizer = clip(CLIPTextModelWithProjection, h1, l1, a1, projection_dim=h1)
    text_encoder_2, tokenizer_2 = clip(CLIPTextModelWithProjection, h2, l2, a2, projection_dim=h2)
    return diffusers.StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(patch_size=2, in_channels=16, out_channels=16,
                                          joint_attention_dim=joint,
                                          pooled_projection_dim=h1 + h2, **transformer),
        vae=vae(size, 16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                use_post_quant_conv=False),
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2, text_encoder_3=text_3[0], tokenizer_3=text_3[1],
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )  # fmt: skip


#: Flux's latent side per size (the image is that times the VAE's scale factor)
FLUX_LATENT = {"full": 128, "small": 32}


def build_flux(size: str) -> Any:
    if size == "full":  # FLUX.1-dev's widths; 2 of its 19 double and 4 of its 38 single blocks
        hidden, joint = 768, 4096
        transformer = dict(num_layers=2, num_single_layers=4, attention_head_dim=128,
                           num_attention_heads=24, axes_dims_rope=(16, 56, 56))  # fmt: skip
        text_2 = t5(joint, 2, 64, 10240)
        text = clip(CLIPTextModel, hidden, 12, 12)
    else:
        hidden, joint = 128, 256
        transformer = dict(num_layers=2, num_single_layers=4, attention_head_dim=32,
                           num_attention_heads=4, axes_dims_rope=(8, 12, 12))  # fmt: skip
        text_2 = t5(joint, 2, 4, 512)
        text = clip(CLIPTextModel, hidden, 2, 4)
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
        shift=3.0, use_dynamic_shifting=True,
    )  # fmt: skip
    return diffusers.FluxPipeline(
        transformer=FluxTransformer2DModel(patch_size=1, in_channels=64, joint_attention_dim=joint,
                                           pooled_projection_dim=hidden, guidance_embeds=True,
                                           **transformer),
        vae=vae(size, 16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                use_post_quant_conv=False),
        text_encoder=text[0], tokenizer=text[1], text_encoder_2=text_2[0],
        tokenizer_2=text_2[1], scheduler=scheduler,
    )  # fmt: skip


def build_pixart(size: str) -> Any:
    if size == "full":  # PixArt-Σ 1024 (no size conditions); T5-XXL's width, 2 layers
        transformer = dict(sample_size=128, num_layers=28, attention_head_dim=72,
                           num_attention_heads=16, cross_attention_dim=1152,
                           use_additional_conditions=False)  # fmt: skip
        text = t5(4096, 2, 64, 10240)
    else:
        transformer = dict(sample_size=32, num_layers=4, attention_head_dim=32,
                           num_attention_heads=4, cross_attention_dim=128)  # fmt: skip
        text = t5(256, 2, 4, 512)
    model = PixArtTransformer2DModel(patch_size=2, in_channels=4, out_channels=8,
                                     caption_channels=text[0].config.d_model,
                                     norm_type="ada_norm_single", **transformer)  # fmt: skip
    return diffusers.PixArtSigmaPipeline(
        transformer=model, vae=vae(size), text_encoder=text[0], tokenizer=text[1],
        scheduler=DPMSolverMultistepScheduler(beta_schedule="linear"),
    )  # fmt: skip


def build_dit(size: str) -> Any:
    if size == "full":  # DiT-XL-2 256
        transformer = dict(sample_size=32, num_layers=28, attention_head_dim=72,
                           num_attention_heads=16)  # fmt: skip
    else:
        transformer = dict(sample_size=32, num_layers=8, attention_head_dim=48,
                           num_attention_heads=4)  # fmt: skip
    return diffusers.DiTPipeline(
        transformer=DiTTransformer2DModel(patch_size=2, in_channels=4, out_channels=8,
                                          num_embeds_ada_norm=1000, **transformer),
        vae=vae(size), scheduler=DDIMScheduler(beta_schedule="linear", clip_sample=False),
    )  # fmt: skip


#: pixel-space UNets: a CIFAR-sized one on a CPU; at full size ImageNet-64 iDDPM's widths
#: and NCSN++ CelebA-HQ-256-like depth (the VE row)
PIXEL_UNET = {
    "full": dict(block_out_channels=(128, 256, 384, 512),
                 down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D",
                                   "DownBlock2D"),
                 up_block_types=("UpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                 layers_per_block=2),
    "small": dict(block_out_channels=(64, 128, 128),
                  down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                  layers_per_block=1),
}  # fmt: skip
PIXEL_SIZE = {"full": {"iddpm": 64, "ve": 256}, "small": {"iddpm": 32, "ve": 32}}


def build_iddpm(size: str) -> Any:
    """A learned-variance UNet (6 channels out) with iDDPM's learned_range variance."""
    unet = diffusers.UNet2DModel(sample_size=PIXEL_SIZE[size]["iddpm"], in_channels=3,
                                 out_channels=6, **PIXEL_UNET[size])  # fmt: skip
    scheduler = diffusers.DDPMScheduler(variance_type="learned_range", beta_schedule="linear")
    return diffusers.DDPMPipeline(unet=unet, scheduler=scheduler)


def build_ve(size: str) -> Any:
    """An NCSN++-style score network (Fourier time features) with ScoreSdeVeScheduler."""
    unet = diffusers.UNet2DModel(sample_size=PIXEL_SIZE[size]["ve"], in_channels=3,
                                 out_channels=3, time_embedding_type="fourier",
                                 **PIXEL_UNET[size])  # fmt: skip
    return diffusers.ScoreSdeVePipeline(unet=unet, scheduler=diffusers.ScoreSdeVeScheduler())


# -- the families ----------------------------------------------------------------------------


@dataclasses.dataclass
class Family:
    """How a family's folder is built, and the same request both ways."""

    build: Callable[[str], Any]
    pipeline: str  # the diffusers class
    steps: int  # the CPU default
    ours: Callable[[str], dict[str, Any]]  # toolkit.generate's arguments (given the size)
    theirs: Callable[[str, int], dict[str, Any]]  # the pipeline's (given size and batch)


def prompted(scale: float | None, **extra: Any) -> Callable[[str, int], dict[str, Any]]:
    """The pipeline's arguments for `PROMPT` at guidance `scale`."""

    def theirs(size: str, batch: int) -> dict[str, Any]:
        scaled = {} if scale is None else {"guidance_scale": scale}
        return {"prompt": [PROMPT] * batch, **scaled, **extra}

    return theirs


def flux_size(size: str) -> dict[str, int]:
    """The image size both ways: Flux's latent side times the VAE's scale factor."""
    side = FLUX_LATENT[size] * (8 if size == "full" else 4)
    return {"height": side, "width": side}


FAMILIES = {
    # DDIM (SD's folder's scheduler is PNDM; here the folder holds DDIM), CFG 7.5
    "sd15": Family(build_sd15, "StableDiffusionPipeline", 10,
                   lambda size: dict(prompt=PROMPT, sampler="ddim", schedule="leading",
                                     schedule_options={"offset": 1}),
                   prompted(7.5)),
    # the folder's EulerDiscreteScheduler (leading, offset 1), CFG 5
    "sdxl": Family(build_sdxl, "StableDiffusionXLPipeline", 10,
                   lambda size: dict(prompt=PROMPT), prompted(5.0)),
    # FlowMatchEulerDiscreteScheduler, CFG 7, T5 on 256 tokens
    "sd3": Family(build_sd3, "StableDiffusion3Pipeline", 10,
                  lambda size: dict(prompt=PROMPT), prompted(7.0)),
    # FLUX.1-dev: the embedded guidance 3.5 in one branch, T5 on 512 tokens
    "flux": Family(build_flux, "FluxPipeline", 10,
                   lambda size: dict(prompt=PROMPT, **flux_size(size)),
                   lambda size, batch: prompted(3.5, **flux_size(size))(size, batch)),
    # PixArt-Σ's DPMSolverMultistepScheduler, CFG 4.5, T5 on 300 tokens; no resolution
    # binning (ours samples at the folder's size, as the pipeline does without binning)
    "pixart": Family(build_pixart, "PixArtSigmaPipeline", 10,
                     lambda size: dict(prompt=PROMPT),
                     prompted(4.5, use_resolution_binning=False)),
    # DiT's DDIMScheduler, CFG 4 with a class
    "dit": Family(build_dit, "DiTPipeline", 10,
                  lambda size: dict(conditions={"class": CLASS}),
                  lambda size, batch: {"class_labels": [CLASS_ID] * batch,
                                       "guidance_scale": 4.0}),
    # LCMScheduler, the embedded guidance 8.5, no CFG
    "lcm": Family(build_lcm, "LatentConsistencyModelPipeline", 4,
                  lambda size: dict(prompt=PROMPT), prompted(8.5)),
    # unconditional pixel models: DDPMScheduler's learned variance (our ddpm on its leading
    # timesteps), and ScoreSdeVePipeline's predictor-corrector (2 forwards a step)
    "iddpm": Family(build_iddpm, "DDPMPipeline", 10,
                    lambda size: dict(sampler="ddpm", schedule="leading"),
                    lambda size, batch: {"batch_size": batch}),
    "ve": Family(build_ve, "ScoreSdeVePipeline", 10,
                 lambda size: dict(sampler="score_sde_ve", schedule="exponential"),
                 lambda size, batch: {"batch_size": batch}),
}  # fmt: skip
#: families whose networks have no unconditional branch to batch with (no CFG row)
NO_CFG = ("lcm", "iddpm", "ve")


def build(name: str, size: str, root: pathlib.Path) -> pathlib.Path:
    """The family's folder of `size` with random weights (seeded)."""
    torch.manual_seed(0)
    path = root / f"{name}-{size}"
    pipe = FAMILIES[name].build(size)
    pipe.save_pretrained(path)
    if name == "dit":  # the published folders keep the class names here
        index = json.loads((path / "model_index.json").read_text())
        index["id2label"] = {str(CLASS_ID): CLASS}
        (path / "model_index.json").write_text(json.dumps(index))
    return path


# -- timing --------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def medians(runs: dict[str, Callable[[], object]], device: torch.device, repeats: int
            ) -> dict[str, float]:  # fmt: skip
    for fn in runs.values():  # warm-up: kernels, caches, allocator, the OS's file cache
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):  # alternately, so drift hits every side
        for name, fn in runs.items():
            times[name].append(timed(fn, device))
    return {name: statistics.median(values) for name, values in times.items()}


def peak(fn: Callable[[], object], device: torch.device) -> float:
    """Peak GPU memory of one call, GiB."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    return torch.cuda.max_memory_allocated(device) / 2**30


def cfg_forwards(name: str, model: pathlib.Path, args: argparse.Namespace, dtype: str
                 ) -> float | None:  # fmt: skip
    """Time of one network forward of ``2B`` (how guidance runs CFG's two branches) over
    two of ``B``, ``--steps`` times each, at a middle noise level; None for a family
    without an unconditional branch (LCM, the unconditional pixel models)."""
    from toolkit.models import open_model
    from toolkit.registry.protocols import SampleRequest

    if name in NO_CFG:
        return None
    device = torch.device(args.device)
    request = FAMILIES[name].ours(args.size)
    # the folder as the plan leaves it: the model's options and the request's size
    folder = open_model(model)
    folder.model_options = folder.check_model_options({}, from_strings=False)
    folder.image_size = folder.check_size(request.get("height"), request.get("width"))
    loaded = folder.load(device=device, dtype=getattr(torch, dtype))
    batch = [SampleRequest(index=i, seed=i, conditions=request.get("conditions", {}),
                           prompt=request.get("prompt")) for i in range(args.batch)]  # fmt: skip
    steps = args.steps or FAMILIES[name].steps
    with torch.inference_mode():
        conditioning = loaded.conditioning(batch, {})
        cond, uncond = (conditioning.inputs(b, args.batch, device) for b in ("cond", "uncond"))
        both = {k: torch.cat([cond[k], uncond[k]]) for k in cond}
        eps = torch.randn(args.batch, *loaded.sample_shape, generator=torch.Generator("cpu"))
        x = loaded.prior(eps, 1.0).to(device)
        xx = torch.cat([x, x])

    def batched() -> None:
        with torch.inference_mode():
            for _ in range(steps):
                loaded.denoise(xx, 1.0, **both)

    def split() -> None:
        with torch.inference_mode():
            for _ in range(steps):
                loaded.denoise(x, 1.0, **cond)
                loaded.denoise(x, 1.0, **uncond)

    m = medians({"batched": batched, "split": split}, device, args.repeats)
    return m["batched"] / m["split"]


def memory_peaks(ours: Callable[..., None], device: torch.device) -> dict[str, float]:
    """CUDA: peak GiB of ours plain, with attention slicing and with VAE tiling (a family
    that refuses an option: None)."""
    peaks: dict[str, float] = {}
    for label, memory in (("plain", {}), ("slicing", {"attention_slicing": True}),
                          ("tiling", {"vae_tiling": True})):  # fmt: skip
        try:
            peaks[label] = peak(lambda memory=memory: ours(**memory), device)
        except toolkit.DtkError:  # e.g. Flux's transformer has no sliced attention
            peaks[label] = float("nan")
    return peaks


def measure(name: str, model: pathlib.Path, args: argparse.Namespace, dtype: str,
            out: pathlib.Path) -> dict[str, float]:  # fmt: skip
    """Ours and the pipeline's times (and peaks on CUDA) for one family and dtype."""
    family, device = FAMILIES[name], torch.device(args.device)
    steps = args.steps or family.steps
    torch_dtype = getattr(torch, dtype)
    counter = iter(range(10**6))
    cls = getattr(diffusers, family.pipeline)

    def ours(**memory: bool) -> None:
        toolkit.generate(model, out=out / f"{name}-{dtype}-{next(counter)}", n=args.batch,
                         seed=0, steps=steps, batch_size=args.batch, device=args.device,
                         dtype=dtype, progress=False, **family.ours(args.size),
                         **memory)  # fmt: skip

    def theirs() -> None:
        # from the folder, as `toolkit.generate` runs: loading counts on both sides
        pipe = cls.from_pretrained(model, torch_dtype=torch_dtype).to(device)
        pipe.set_progress_bar_config(disable=True)
        generators = [torch.Generator("cpu").manual_seed(i) for i in range(args.batch)]
        images = pipe(num_inference_steps=steps, generator=generators, output_type="pil",
                      **family.theirs(args.size, args.batch)).images  # fmt: skip
        folder = out / f"{name}-{dtype}-diffusers-{next(counter)}"
        folder.mkdir()
        for i, image in enumerate(images):  # the same job: the images on disk
            image.save(folder / f"{i}.png")

    result: dict[str, Any] = medians({"ours": ours, "diffusers": theirs}, device, args.repeats)
    result["cfg"] = cfg_forwards(name, model, args, dtype)
    if device.type == "cuda":
        result.update(memory_peaks(ours, device))
        result["diffusers_peak"] = peak(theirs, device)
    return result


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="sd15", choices=[*FAMILIES, "all"])
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument(
        "--size",
        choices=("small", "full"),
        default=None,
        help="folder shapes (default: full on cuda, small elsewhere)",
    )
    parser.add_argument("--dtypes", default=None,
                        help="comma-separated (default: float32,float16,bfloat16 on cuda, "
                             "float32 elsewhere)")  # fmt: skip
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="for every family (default: 10 each, LCM 4; on cuda 28)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    args.size = args.size or ("full" if device.type == "cuda" else "small")
    if args.steps is None and device.type == "cuda":
        args.steps = 28
    dtypes = (args.dtypes or ("float32,float16,bfloat16" if device.type == "cuda"
                              else "float32")).split(",")  # fmt: skip
    names = list(FAMILIES) if args.family == "all" else [args.family]
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {card}, {args.size} shapes, batch {args.batch}, median of {args.repeats}\n",
          flush=True)  # fmt: skip
    header = ("| family | dtype | steps | ours (s) | diffusers (s) | ours / diffusers "
              "| images/s | batched / split CFG |")  # fmt: skip
    rule = "|---|---|---:|---:|---:|---:|---:|---:|"
    if device.type == "cuda":
        header += (" peak GiB ours | with attention slicing | with VAE tiling "
                   "| peak GiB diffusers |")  # fmt: skip
        rule += "---:|---:|---:|---:|"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        for name in names:
            model = build(name, args.size, root)
            for dtype in dtypes:
                m = measure(name, model, args, dtype, root / "out")
                steps = args.steps or FAMILIES[name].steps
                cfg = "—" if m["cfg"] is None else f"{m['cfg']:.3f}"
                row = (f"| {name} | {dtype} | {steps} | {m['ours']:.3f} | {m['diffusers']:.3f} "
                       f"| {m['ours'] / m['diffusers']:.3f} | {args.batch / m['ours']:.2f} "
                       f"| {cfg} |")  # fmt: skip
                if device.type == "cuda":
                    row += (f" {m['plain']:.2f} | {m['slicing']:.2f} | {m['tiling']:.2f} "
                            f"| {m['diffusers_peak']:.2f} |")  # fmt: skip
                rows.append(row)
                print(row, flush=True)
    print("\n" + "\n".join([header, rule, *rows]))


if __name__ == "__main__":
    main()
