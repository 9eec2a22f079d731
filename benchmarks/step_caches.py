"""Step caches against the honest baseline, fewer steps, measured side by side in one run.

For each model, one batch at the model's default sampler, schedule, steps and guidance
(through the same plan `dtk generate` makes), on `--device`:

* ``full``: every call in full: the reference images and time;
* each step cache that applies (``deepcache`` on UNets, ``first_block_cache`` on
  transformers) at its defaults, and at the ``--aggressive`` settings;
* ``fewer``: plain sampling with the number of steps that costs what the cache costs (the
  full run's steps scaled by the cache's time ratio, rounded), also timed.

Reports per variant: seconds (median of `--repeats` after a warm-up), speed-up over
``full``, and drift from the full images at equal seeds (mean |difference| in 1/255 levels
and the share of pixels off by more than 8); on the shipped model also the share of images
the shipped digit classifier reads as the requested digit. A cache pays off where it drifts
less than ``fewer`` at the same time.

Models: the shipped one (a label UNet, 28x28), an SD-shaped UNet (SD 1.5's blocks at about a
third of the width, 32x32 latents, a small random CLIP) and a DiT-shaped transformer
(DiT-S/2: 12 blocks of width 384, 32x32 latents), the last two random weights built here.

Run: ``python benchmarks/step_caches.py [--models shipped,sd,dit] [--batch 16] [--device cpu]``
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from tables import markdown  # benchmarks/tables.py, beside this script

import toolkit
from toolkit.generation.generate import default_model
from toolkit.generation.plan import make_plan
from toolkit.generation.request import GenerationRequest, GenerationSettings
from toolkit.sampling.engine import sample_images

#: caches by network kind, and settings that skip more than the defaults
CACHES = {"unet": "deepcache", "transformer": "first_block_cache"}
AGGRESSIVE = {"deepcache": {"interval": 5}, "first_block_cache": {"threshold": 0.3}}


def sd_shaped(root: pathlib.Path) -> pathlib.Path:
    """A Stable Diffusion folder with SD 1.5's UNet blocks at about a third of the width."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=32, block_out_channels=(96, 192, 320, 320),
                                cross_attention_dim=256, attention_head_dim=8)  # fmt: skip
    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4)  # fmt: skip
    text = CLIPTextModel(CLIPTextConfig(hidden_size=256, intermediate_size=512,
                                        num_attention_heads=4, num_hidden_layers=2,
                                        vocab_size=1000, max_position_embeddings=77))  # fmt: skip
    tokenizer = _tokenizer(root, CLIPTokenizer)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1)  # fmt: skip
    path = root / "sd"
    StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer,
                            scheduler=scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(path)  # fmt: skip
    return path


def _tokenizer(root: pathlib.Path, cls: Any) -> Any:
    """A CLIP tokenizer over a small vocabulary of letters, written here (no download)."""
    import json

    letters = list("abcdefghijklmnopqrstuvwxyz")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in letters + [f"{c}</w>" for c in letters]:
        vocab[token] = len(vocab)
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    return cls(str(root / "vocab.json"), str(root / "merges.txt"))


def dit_shaped(root: pathlib.Path) -> pathlib.Path:
    """A DiT folder with DiT-S/2's transformer (12 blocks of width 384)."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(sample_size=32, num_layers=12, patch_size=2,
                                        attention_head_dim=64, num_attention_heads=6,
                                        in_channels=4, out_channels=8,
                                        num_embeds_ada_norm=1000)  # fmt: skip
    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4)  # fmt: skip
    path = root / "dit"
    DiTPipeline(transformer=transformer, vae=vae,
                scheduler=DDIMScheduler(clip_sample=False)).save_pretrained(path)  # fmt: skip
    return path


class Case:
    """One model at its defaults: the plan's model, sampler, guidance and requests."""

    def __init__(self, name: str, folder: pathlib.Path, batch: int, device: str,
                 root: pathlib.Path, **request: Any) -> None:  # fmt: skip
        settings = GenerationSettings(device=device)
        plan = make_plan(GenerationRequest(folder, out=root / f"{name}-out", n=batch,
                                           settings=settings, **request))  # fmt: skip
        self.name, self.plan = name, plan
        self.model = plan.folder.load(device=torch.device(device), dtype=torch.float32)
        kind = "unet" if toolkit.is_unet(self.model.network) else "transformer"
        self.cache = CACHES[kind]
        for use in (plan.sampler, plan.schedule):
            use.make()
        self.batch = [plan.samples[i] for i in range(batch)]
        self.wanted = [dict(s.conditions) for s in self.batch]

    def images(self, steps: int, cache: str | None = None, options: dict | None = None
               ) -> torch.Tensor:  # fmt: skip
        plan = self.plan
        sigmas = plan.schedule.instance(steps, self.model.noise_levels)
        step_cache = toolkit.step_cache(cache, **(options or {})) if cache else None
        return sample_images(self.model, plan.sampler.instance, plan.guidance.instance, sigmas,
                             self.batch, step_cache=step_cache)  # fmt: skip


def timed(run: Callable[[], torch.Tensor], repeats: int) -> tuple[float, torch.Tensor]:
    images = run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), images


def digit_accuracy(case: Case, images: torch.Tensor) -> float | None:
    if case.name != "shipped":
        return None
    classifier = toolkit.attribute_classifier("cnn", attribute="digit")
    wanted = torch.tensor([classifier.labels.index(w["digit"]) for w in case.wanted])
    return float((classifier.predict_proba(images).argmax(1) == wanted).float().mean())


def measure(case: Case, repeats: int) -> list[dict[str, Any]]:
    steps = case.plan.settings.steps
    full_seconds, full = timed(lambda: case.images(steps), repeats)
    rows = [_row(case, "full", steps, full_seconds, full_seconds, full, full)]
    for label, options in (("default", {}), ("aggressive", AGGRESSIVE[case.cache])):
        seconds, images = timed(lambda o=options: case.images(steps, case.cache, o), repeats)
        name = f"{case.cache} {label}" + (f" {options}" if options else "")
        rows.append(_row(case, name, steps, seconds, full_seconds, images, full))
        fewer = max(1, round(steps * seconds / full_seconds))
        few_seconds, few = timed(lambda f=fewer: case.images(f), repeats)
        rows.append(_row(case, f"fewer steps (vs {label})", fewer, few_seconds, full_seconds, few,
                         full))  # fmt: skip
    return rows


def _row(case: Case, variant: str, steps: int, seconds: float, full_seconds: float,
         images: torch.Tensor, full: torch.Tensor) -> dict[str, Any]:  # fmt: skip
    difference = (images - full).abs() * 255
    accuracy = digit_accuracy(case, images)
    row = {"model": case.name, "variant": variant, "steps": steps,
           "seconds": round(seconds, 3), "speedup": round(full_seconds / seconds, 2),
           "drift_mean_255": round(float(difference.mean()), 2),
           "drift_gt8": f"{float((difference > 8).float().mean()):.1%}",
           "digit_acc": "" if accuracy is None else f"{accuracy:.3f}"}  # fmt: skip
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="shipped,sd,dit")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        for name in args.models.split(","):
            if name == "shipped":
                digits = [{"digit": str(d % 10), "group": "light"} for d in range(args.batch)]
                case = Case("shipped", default_model(), args.batch, args.device, root,
                            conditions=digits)  # fmt: skip
            elif name == "sd":
                case = Case("sd", sd_shaped(root), args.batch, args.device, root,
                            prompt="a cat")  # fmt: skip
            else:
                classes = [{"class": str(k)} for k in range(args.batch)]
                case = Case("dit", dit_shaped(root), args.batch, args.device, root,
                            conditions=classes)  # fmt: skip
            rows += measure(case, args.repeats)
    import pandas

    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"\n{where}, batch {args.batch}, each model's default sampler, schedule, steps and "
          f"guidance; median of {args.repeats} after a warm-up\n")  # fmt: skip
    print(markdown(pandas.DataFrame(rows)))


if __name__ == "__main__":
    main()
