"""Speed levers on the shipped model, measured side by side in one process against diffusers.

One batch of `--batch` samples of digit 7, DDIM `--steps` steps on the model's timesteps
(`ddim` + `leading`, clipping as the model's config says, as `DDIMScheduler`), no guidance:

* ``diffusers``: the shipped UNet in diffusers' standard loop with its ``DDIMScheduler``
  (eager, float32): the baseline;
* ours through `toolkit.generate` (PNG files and metadata included; the model loaded once per
  variant inside `toolkit.reuse_models`, as the baseline loads its UNet once), eager and with each
  lever: ``bfloat16``, ``--compile`` (float32), ``--compile`` + ``bfloat16`` +
  ``--channels-last``.

Prints each variant's median time (compiled ones after a warm-up batch that compiles), its
ratio to the baseline, and its images' difference from the baseline's in 1/255 levels: the
largest, the mean, and the share of pixels off by more than 8.
The targets of issue 16: compile float32 <= 0.75 with images within 1/255; compile + bf16
<= 0.55. On a GPU (``--device cuda``) the same command also reports peak memory.

Run: ``python benchmarks/speed.py [--device cuda] [--batch 64] [--steps 20] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch
from diffusers import DDIMScheduler, UNet2DModel
from PIL import Image

import toolkit
from toolkit.generation.generate import default_model

#: our variants: name -> the generation settings that differ from eager float32
VARIANTS = {
    "ours eager": {},
    "ours bf16": {"dtype": "bfloat16"},
    "ours compile": {"compile": "default"},
    "ours compile+bf16+cl": {"compile": "default", "dtype": "bfloat16", "channels_last": True},
}
DIGIT = "7"


def diffusers_images(folder: pathlib.Path, batch: int, steps: int, device: torch.device
                     ) -> Callable[[], np.ndarray]:  # fmt: skip
    """The baseline: the shipped UNet in diffusers' DDIM loop, each sample from its own
    generator as ours; returns uint8 images ``[B, H, W, C]``."""
    unet = UNet2DModel.from_pretrained(folder / "unet").to(device).eval()
    scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
    label = _label(folder)

    def run() -> np.ndarray:
        scheduler.set_timesteps(steps)
        shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        x = torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(i))
                         for i in range(batch)]).to(device)  # fmt: skip
        labels = torch.full((batch,), label, device=device)
        with torch.inference_mode():
            for t in scheduler.timesteps:
                eps = unet(x, t, class_labels=labels).sample
                x = scheduler.step(eps, t, x, eta=0.0).prev_sample
        pixels = ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return pixels.permute(0, 2, 3, 1).cpu().numpy()

    return run


def _label(folder: pathlib.Path) -> int:
    """The class label the model's own label space gives digit 7 (group light)."""
    from toolkit.models import label_space

    space = label_space(folder)
    return int(space.label({"digit": DIGIT, "group": "light"}))


def ours(folder: pathlib.Path, root: pathlib.Path, batch: int, steps: int, device: str,
         settings: dict) -> Callable[[], np.ndarray]:  # fmt: skip
    counter = iter(range(10**6))

    def run() -> np.ndarray:
        out = root / f"out{next(counter)}"
        toolkit.generate(folder, out=out, n=batch, seed=0, conditions={"digit": DIGIT,
                         "group": "light"}, sampler="ddim", schedule="leading", steps=steps,
                         guidance="none", batch_size=batch, device=device, progress=False,
                         **settings)  # fmt: skip
        files = sorted(out.rglob("*.png"), key=lambda p: int(p.stem))
        return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])

    return run


def timed(fn: Callable[[], np.ndarray], device: torch.device) -> tuple[float, np.ndarray]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    images = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    folder = default_model()
    # ours loads the model once, as the baseline does: repeated runs in one process
    with tempfile.TemporaryDirectory() as tmp, toolkit.reuse_models(keep=len(VARIANTS)):
        runs = {"diffusers": diffusers_images(folder, args.batch, args.steps, device)}
        for name, settings in VARIANTS.items():
            root = pathlib.Path(tmp) / name.replace(" ", "_").replace("+", "_")
            runs[name] = ours(folder, root, args.batch, args.steps, args.device, settings)
        images, times = {}, {name: [] for name in runs}
        for name, run in runs.items():  # warm-up: compiles the compiled variants
            images[name] = run()
        for _ in range(args.repeats):  # alternately, so that drift hits every variant
            for name, run in runs.items():
                seconds, _ = timed(run, device)
                times[name].append(seconds)
    base = statistics.median(times["diffusers"])
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{where}, shipped model, batch {args.batch}, DDIM {args.steps} steps, no guidance, "
          f"median of {args.repeats} after a warm-up")  # fmt: skip
    print(f"{'variant':24s} {'seconds':>8s} {'ratio':>6s} {'max |diff|':>10s} "
          f"{'mean |diff|':>11s} {'> 8 levels':>10s}")  # fmt: skip
    for name in runs:
        median = statistics.median(times[name])
        diff = np.abs(images[name].astype(int) - images["diffusers"].astype(int))
        print(f"{name:24s} {median:8.3f} {median / base:6.3f} {diff.max():10d} "
              f"{diff.mean():11.3f} {(diff > 8).mean():10.2%}")  # fmt: skip
    if device.type == "cuda":
        print(f"peak memory {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
