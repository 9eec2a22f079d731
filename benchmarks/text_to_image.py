"""Text-to-image generation on a Stable-Diffusion-shaped pipeline, measured in one process.

No weights can be downloaded, and speed and memory do not depend on them: the pipeline is
built with random weights, in Stable Diffusion 1.5's architecture (``--size sd15``: the
860M-parameter UNet, a ViT-L/14-sized text encoder, 512x512 images) or a small one for
CPUs (``--size small``, 64x64 images). Same prompt, DDIM, CFG 7.5, one batch of `--batch`:

* ``ours / diffusers``: `toolkit.generate` (PNG files and metadata included) against
  ``StableDiffusionPipeline`` producing the same images in memory, per dtype, both from
  the folder on disk (loading counts on both sides). Target <= 1.05.
* ``<dtype> / float32``: throughput of half precision against full (GPU: target >= 1.5x
  faster; on CPUs half precision is usually slower and is skipped unless asked for).
* ``batched / split CFG``: one UNet forward of ``2B`` (how every guidance runs its
  branches) against two forwards of ``B``. Target <= 1.00.
* CUDA only: peak memory of one generation, plain against ``--attention-slicing`` and
  ``--vae-tiling`` (ratios below 1 are savings).

Run: ``python benchmarks/text_to_image.py [--device cuda] [--size sd15] [--batch 8]``
(defaults: cuda + sd15 where a GPU is, else cpu + small). Timings are the median of
`--repeats` runs taken alternately, after a warm-up.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

import toolkit

# the tests' offline byte-level BPE tokenizer: no tokenizer files can be downloaded either
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
from tiny_clip import BOS, EOS, tiny_tokenizer

PROMPT = "a photo of a cat"
# diffusers 0.42 renames from_pretrained's torch_dtype; older releases know only that name
warnings.filterwarnings("ignore", message="Please use `dtype`", category=FutureWarning)
SIZES = {
    # Stable Diffusion 1.5 (runwayml/stable-diffusion-v1-5's configs)
    "sd15": dict(
        unet=dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280),
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                  layers_per_block=2, cross_attention_dim=768, attention_head_dim=8),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                 down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, max_position_embeddings=77),
    ),
    "small": dict(
        unet=dict(sample_size=16, block_out_channels=(64, 128),
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                  layers_per_block=1, cross_attention_dim=128, attention_head_dim=8),
        vae=dict(block_out_channels=(32, 64, 64), layers_per_block=1,
                 down_block_types=("DownEncoderBlock2D",) * 3,
                 up_block_types=("UpDecoderBlock2D",) * 3, sample_size=64),
        text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=77),
    ),
}  # fmt: skip


def build_pipeline(root: pathlib.Path, size: str) -> pathlib.Path:
    """A StableDiffusionPipeline folder of `size`'s architecture with random weights."""
    config = SIZES[size]
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(PROMPT.split(), max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS),
        pad_token_id=tokenizer.convert_tokens_to_ids(EOS), **config["text"],
    ))  # fmt: skip
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel(in_channels=4, out_channels=4, **config["unet"]),
        vae=AutoencoderKL(latent_channels=4, **config["vae"]),
        text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, clip_sample=False,
                                beta_schedule="scaled_linear", steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    path = root / f"sd-{size}"
    pipe.save_pretrained(path)
    return path


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def medians(runs: dict[str, Callable[[], object]], device: torch.device, repeats: int) -> dict:
    for fn in runs.values():  # warm-up: kernels, caches, allocator
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):  # alternately, so drift hits every side
        for name, fn in runs.items():
            times[name].append(timed(fn, device))
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default="sd15" if cuda else "small")
    parser.add_argument("--dtypes", default=None,
                        help="comma-separated (default: float32,float16,bfloat16 on cuda, "
                             "float32 on cpu)")  # fmt: skip
    parser.add_argument("--batch", type=int, default=8 if cuda else 4)
    parser.add_argument("--steps", type=int, default=50 if cuda else 10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtypes = (args.dtypes or ("float32,float16,bfloat16" if device.type == "cuda"
                              else "float32")).split(",")  # fmt: skip
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {name}, SD shape {args.size}, batch {args.batch}, DDIM {args.steps} steps, "
          f"CFG 7.5, median of {args.repeats}\n")  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        model = build_pipeline(root, args.size)
        counter = iter(range(10**6))
        rows, speed = [], {}
        for dtype in dtypes:
            torch_dtype = getattr(torch, dtype)
            pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=torch_dtype)
            pipe = pipe.to(device)
            pipe.set_progress_bar_config(disable=True)
            shape = (4, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
            latents = torch.stack([
                torch.randn(shape, generator=torch.Generator("cpu").manual_seed(i))
                for i in range(args.batch)
            ]).to(device, torch_dtype)  # fmt: skip

            def diffusers_run(torch_dtype=torch_dtype, latents=latents) -> None:
                # from the folder, as `toolkit.generate` runs: loading counts on both sides
                run = StableDiffusionPipeline.from_pretrained(model, torch_dtype=torch_dtype)
                run = run.to(device)
                run.set_progress_bar_config(disable=True)
                run([PROMPT] * args.batch, num_inference_steps=args.steps, latents=latents,
                    guidance_scale=7.5, output_type="np")  # fmt: skip

            def ours(dtype=dtype, **memory: bool) -> None:
                toolkit.generate(model, out=root / f"out{next(counter)}", prompt=PROMPT,
                                 n=args.batch, seed=0, sampler="ddim", schedule="leading",
                                 schedule_options={"offset": 1}, steps=args.steps,
                                 batch_size=args.batch, device=args.device, dtype=dtype,
                                 progress=False, **memory)  # fmt: skip

            unet = pipe.unet
            x = latents.repeat(2, 1, 1, 1)
            t = torch.full((2 * args.batch,), 500, device=device)
            states = torch.randn(2 * args.batch, 77, unet.config.cross_attention_dim,
                                 device=device, dtype=torch_dtype)  # fmt: skip

            def batched(unet=unet, x=x, t=t, states=states) -> None:
                with torch.inference_mode():
                    for _ in range(args.steps):
                        unet(x, t, encoder_hidden_states=states)

            def split(unet=unet, x=x, t=t, states=states) -> None:
                with torch.inference_mode():
                    for _ in range(args.steps):
                        for half in range(2):
                            part = slice(half * args.batch, (half + 1) * args.batch)
                            unet(x[part], t[part], encoder_hidden_states=states[part])

            m = medians({"ours": ours, "diffusers": diffusers_run, "batched": batched,
                         "split": split}, device, args.repeats)  # fmt: skip
            speed[dtype] = m["ours"]
            rows.append((dtype, m))
            del pipe, unet

        print("| dtype | ours (s) | diffusers (s) | images/s (ours) | ours / diffusers "
              "| batched / split CFG |")  # fmt: skip
        print("|---|---:|---:|---:|---:|---:|")
        for dtype, m in rows:
            print(f"| {dtype} | {m['ours']:.3f} | {m['diffusers']:.3f} | "
                  f"{args.batch / m['ours']:.2f} | {m['ours'] / m['diffusers']:.3f} | "
                  f"{m['batched'] / m['split']:.3f} |")  # fmt: skip
        for dtype in dtypes:
            if dtype != "float32" and "float32" in speed:
                print(f"{dtype} / float32 throughput: {speed['float32'] / speed[dtype]:.2f}x")

        if device.type == "cuda":
            print("\n| dtype | memory option | peak GiB | / plain |")
            print("|---|---|---:|---:|")
            for dtype in dtypes:
                peaks = {}
                for label, memory in (("plain", {}), ("attention slicing",
                                      {"attention_slicing": True}),
                                      ("vae tiling", {"vae_tiling": True})):  # fmt: skip
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                    ours(dtype, **memory)
                    peaks[label] = torch.cuda.max_memory_allocated(device) / 2**30
                for label, peak in peaks.items():
                    print(f"| {dtype} | {label} | {peak:.2f} | {peak / peaks['plain']:.2f} |")


if __name__ == "__main__":
    main()
