"""Generation overhead against diffusers, measured in one process.

Same randomly initialised UNet2DModel, batch 64, DDIM with 50 steps:

* ``ours / diffusers``: `toolkit.generate` (PNG files and metadata included) against
  ``DDIMPipeline`` producing the same images in memory. Target: <= 1.00.
* ``ours / (50 x forward)``: against 50 bare UNet forward passes of the batch. Target: <= 1.03.

Run: ``python benchmarks/generate_vs_diffusers.py [--device cuda] [--dtype float16]``.
Timings are the median of `--repeats` runs, taken alternately so drift hits both sides.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import tempfile
import time

import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler, UNet2DModel

from toolkit.generation.generate import generate


def build_model(root: pathlib.Path, size: int) -> pathlib.Path:
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=size,
        in_channels=3,
        out_channels=3,
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    )
    path = root / "model"
    DDIMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(path)
    return path


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        model = build_model(root, args.size)
        pipe = DDIMPipeline.from_pretrained(model, torch_dtype=dtype).to(device)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
        pipe.set_progress_bar_config(disable=True)
        unet = pipe.unet
        x = torch.randn(args.batch, 3, args.size, args.size, device=device, dtype=dtype)
        t = torch.full((args.batch,), 500, device=device)

        def run_forwards() -> None:
            with torch.inference_mode():
                for _ in range(args.steps):
                    unet(x, t)

        def run_diffusers() -> None:
            generators = [torch.Generator("cpu").manual_seed(i) for i in range(args.batch)]
            with torch.inference_mode():
                pipe(batch_size=args.batch, generator=generators,
                     num_inference_steps=args.steps, eta=0.0)  # fmt: skip

        counter = iter(range(10**6))

        def run_ours() -> None:
            generate(model, out=root / f"out{next(counter)}", n=args.batch, seed=0,
                     sampler="ddim", schedule="leading", steps=args.steps, guidance="none",
                     batch_size=args.batch, device=args.device, dtype=args.dtype,
                     progress=False)  # fmt: skip

        def timed(fn) -> float:
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            return time.perf_counter() - start

        for fn in (run_forwards, run_diffusers, run_ours):  # warm-up
            fn()
        times: dict[str, list[float]] = {"forwards": [], "diffusers": [], "ours": []}
        for _ in range(args.repeats):
            times["forwards"].append(timed(run_forwards))
            times["diffusers"].append(timed(run_diffusers))
            times["ours"].append(timed(run_ours))

    median = {k: statistics.median(v) for k, v in times.items()}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {name}, dtype {args.dtype}, batch {args.batch}, DDIM {args.steps} steps, "
          f"{args.size}x{args.size}, median of {args.repeats}")  # fmt: skip
    for key, value in median.items():
        print(f"  {key:10s} {value:8.3f} s")
    print(f"ours / diffusers        = {median['ours'] / median['diffusers']:.3f}  (target <= 1.00)")
    print(f"ours / ({args.steps} x forward) = {median['ours'] / median['forwards']:.3f}  "
          "(target <= 1.03)")  # fmt: skip


if __name__ == "__main__":
    main()
