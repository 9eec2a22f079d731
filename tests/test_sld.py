"""`sld` guidance (Safe Latent Diffusion) against diffusers' StableDiffusionPipelineSafe."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas
import pytest
import torch
from click.testing import CliRunner
from diffusers.pipelines.deprecated.stable_diffusion_safe import (
    SafetyConfig,
    StableDiffusionPipelineSafe,
)
from folders import pixels
from tiny_models import save_pipeline
from tiny_sd import pipeline_parts, save_sd_pipeline, spy_forwards

from plugins.sld import DEFAULT_CONCEPT, PRESETS, SafeLatentDiffusion
from toolkit.cli import cli
from toolkit.errors import OptionError
from toolkit.generation.generate import generate

CAT = "a photo of a cat"
# a concept the tiny tokenizer knows word by word, so it is not truncated
CONCEPT = "a red painting of a blurry dog"
DDIM = dict(sampler="ddim", schedule="leading", schedule_options={"offset": 1}, progress=False)
DDIM_CLI = ["--sampler", "ddim", "--schedule", "leading", "--schedule-option", "offset=1"]
# diffusers' SafetyConfig keys for ours
DIFFUSERS_KEYS = {"guidance_scale": "sld_guidance_scale", "warmup_steps": "sld_warmup_steps",
                  "threshold": "sld_threshold", "momentum_scale": "sld_momentum_scale",
                  "momentum_beta": "sld_mom_beta"}  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    cond = save_pipeline(root / "cond", conditional=True)
    return {"sd": save_sd_pipeline(root / "sd"), "cond": cond}


def diffusers_safe(model_dir, prompt, n, seed, steps, preset, concept) -> np.ndarray:
    pipe = StableDiffusionPipelineSafe(**pipeline_parts(model_dir))
    pipe.safety_concept = concept
    pipe.set_progress_bar_config(disable=True)
    latents = torch.stack([
        torch.randn((4, 8, 8), generator=torch.Generator("cpu").manual_seed(seed + i))
        for i in range(n)
    ])  # fmt: skip
    images = pipe([prompt] * n, num_inference_steps=steps, guidance_scale=7.5,
                  latents=latents, output_type="np", **preset).images  # fmt: skip
    return np.round(images * 255).astype(np.int16)


# our options, diffusers' settings, and whether the images must differ from plain cfg beyond
# the tolerance (the random tiny model's prompts are close, so with the strong preset's 7
# warmup steps out of 10 the safety term moves pixels by about 1/255 only)
EQUAL_CASES = {
    "strong": (["preset=strong"], SafetyConfig.STRONG, False),
    "strong, warmup 2": (
        ["preset=strong", "warmup_steps=2"],
        {**SafetyConfig.STRONG, "sld_warmup_steps": 2},
        True,
    ),
    "max": (["preset=max"], SafetyConfig.MAX, True),
}


# the reference pipeline is diffusers' deprecated one; its own deprecation notice is not ours
@pytest.mark.filterwarnings("ignore:The decode_latents method is deprecated:FutureWarning")
@pytest.mark.parametrize("case", list(EQUAL_CASES))
def test_cli_equals_stable_diffusion_pipeline_safe(models, tmp_path, case):
    extra, settings, visible = EQUAL_CASES[case]
    options = [*extra, f"concept={CONCEPT}"]
    out = tmp_path / "out"
    # batch size 1: each batch must start SLD's momentum and warmup afresh, as diffusers does
    result = CliRunner().invoke(cli, [
        "generate", "--model", str(models["sd"]), "--prompt", CAT, "-n", "2", "--seed", "4",
        "--steps", "10", *DDIM_CLI, "--guidance", "sld",
        *[arg for option in options for arg in ("--guidance-option", option)],
        "--batch-size", "1", "--out", str(out), "-q",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    metadata = pandas.read_csv(out / "metadata.csv", keep_default_na=False)
    assert list(metadata["guidance"]) == ["sld"] * 2
    assert json.loads(metadata["guidance_options"][0])["concept"] == CONCEPT
    ours = pixels(out)
    theirs = diffusers_safe(models["sd"], CAT, 2, seed=4, steps=10, preset=settings,
                            concept=CONCEPT)  # fmt: skip
    for i in range(2):
        assert np.abs(ours[i] - theirs[i]).max() <= 1, f"sample {i}"
    if visible:
        cfg = tmp_path / "cfg"
        generate(models["sd"], out=cfg, prompt=CAT, n=1, seed=4, steps=10, guidance="cfg",
                 guidance_options={"scale": 7.5}, **DDIM)  # fmt: skip
        assert np.abs(ours[0] - pixels(cfg)[0]).max() > 4


def test_zero_safety_scale_is_cfg(models, tmp_path):
    runs = {}
    for name, guidance, options in (("sld", "sld", {"guidance_scale": 0.0}),
                                    ("cfg", "cfg", {"scale": 7.5})):  # fmt: skip
        runs[name] = tmp_path / name
        generate(models["sd"], out=runs[name], prompt=CAT, n=2, seed=1, steps=4,
                 guidance=guidance, guidance_options=options, **DDIM)  # fmt: skip
    sld, cfg = pixels(runs["sld"]), pixels(runs["cfg"])
    assert all(np.array_equal(sld[i], cfg[i]) for i in range(2))
    # the safety term itself vanishes at scale 0, even when the concept's branch is evaluated
    guidance = SafeLatentDiffusion(preset="max", guidance_scale=0.0)
    assert guidance.active(1.0) == ("cond", "uncond")
    preds = {b: torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(k))
             for k, b in enumerate(("cond", "uncond", "safety"))}  # fmt: skip
    for sigma in (10.0, 3.0, 0.5):
        expected = preds["uncond"] + 7.5 * (preds["cond"] - preds["uncond"])
        assert torch.equal(guidance(preds, sigma), expected)


def test_presets_and_overrides():
    for preset, config in (("weak", SafetyConfig.WEAK), ("medium", SafetyConfig.MEDIUM),
                           ("strong", SafetyConfig.STRONG), ("max", SafetyConfig.MAX)):  # fmt: skip
        guidance = SafeLatentDiffusion(preset=preset)
        ours = {key: getattr(guidance, key) for key in DIFFUSERS_KEYS}
        assert ours == {key: config[theirs] for key, theirs in DIFFUSERS_KEYS.items()}
        assert ours == PRESETS[preset]
    default = SafeLatentDiffusion()
    assert default.guidance_scale == 1000 and default.scale == 7.5  # medium
    assert default.text_branches == {"safety": DEFAULT_CONCEPT}
    assert DEFAULT_CONCEPT.startswith("an image showing hate, harassment, violence")
    tuned = SafeLatentDiffusion(preset="strong", threshold=0.5, warmup_steps=2)
    assert (tuned.threshold, tuned.warmup_steps, tuned.guidance_scale) == (0.5, 2, 2000)
    with pytest.raises(OptionError, match="without a preset, give"):
        SafeLatentDiffusion(preset=None, guidance_scale=10)
    explicit = SafeLatentDiffusion(preset=None, **PRESETS["weak"])
    assert explicit.momentum_beta == 0.0
    for bad in ({"momentum_beta": 2.0}, {"guidance_scale": -1.0}, {"scale": math.nan},
                {"concept": " "}, {"warmup_steps": -1}):  # fmt: skip
        with pytest.raises(OptionError):
            SafeLatentDiffusion(**bad)


def test_state_restarts_when_sigma_rises():
    guidance = SafeLatentDiffusion(preset="strong", warmup_steps=2, momentum_scale=0.5)
    preds = {b: torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(k))
             for k, b in enumerate(("cond", "uncond", "safety"))}  # fmt: skip
    cfg = preds["uncond"] + 7.5 * (preds["cond"] - preds["uncond"])
    sigmas = (10.0, 5.0, 2.0, 1.0)
    first = [guidance(preds, s) for s in sigmas]
    # warmup: the first two calls of a run are plain cfg, then the safety term applies
    assert torch.equal(first[0], cfg) and torch.equal(first[1], cfg)
    assert not torch.equal(first[2], cfg)
    second = [guidance(preds, s) for s in sigmas]  # a new run: momentum and warmup restart
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_one_forward_per_step_with_three_branches(models, tmp_path, monkeypatch):
    encoded, unet_batches = spy_forwards(monkeypatch)
    generate(models["sd"], out=tmp_path / "out", prompt=CAT, n=3, steps=3, batch_size=2,
             guidance="sld", guidance_options={"concept": CONCEPT}, **DDIM)  # fmt: skip
    # the prompt, the empty prompt and the concept: each through the encoder once
    assert len(encoded) == len(set(encoded)) == 3
    # 2 batches x 3 steps, each one forward holding cond, uncond and the concept
    assert unet_batches == [6] * 3 + [3] * 3


def test_sld_on_a_label_model_is_one_clear_line(models, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, [
        "generate", "--model", str(models["cond"]), "--condition", "digit=1", "--guidance",
        "sld", "--steps", "2", "--out", str(out), "-q",
    ])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "needs a text-to-image model" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.output
    assert not out.exists()
