"""The latent consistency model family (`toolkit.models.lcm`), the ``lcm`` sampler and the
``lcm`` schedule on a tiny random folder built offline (`tiny_lcm.py`): ``dtk generate``
equals ``LatentConsistencyModelPipeline`` run with one generator per sample, natively and
with the folder's own ``LCMScheduler`` through ``--sampler diffusers``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import LatentConsistencyModelPipeline, LCMScheduler
from folders import capture_decoded, max_pixel_difference, pixels, prompts_file
from invoke import dtk
from tiny_lcm import (
    GUIDANCE_DIM,
    save_lcm_pipeline,
    save_sd_with_lcm_scheduler,
    save_sd_with_lcm_unet,
)

import toolkit
from toolkit import DtkError
from toolkit.models import open_model
from toolkit.models.detect import LCM, detect_family
from toolkit.models.lcm import ConsistencyLevels, LatentConsistency, guidance_embedding

CAT, DOG = "a photo of a cat", "a red dog"
#: latents of two float32 runs of the same math (measured: 1.7e-5 on latents of size ~60,
#: the random UNet's)
LATENT_TOL = 1e-4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_lcm_pipeline(tmp_path_factory.mktemp("lcm") / "lcm")


@pytest.fixture
def decoded(monkeypatch):
    """The latents each run decodes, in order."""
    return capture_decoded(monkeypatch, LatentConsistency)


def pipeline(folder, prompts, seed, *, output_type="np", **kwargs):
    """The pipeline's images (as our pixels: int16) or latents, sample i drawn (and re-noised)
    by its own generator seeded seed + i."""
    pipe = LatentConsistencyModelPipeline.from_pretrained(folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(len(prompts))]
    out = pipe(prompts, generator=generators, output_type=output_type, **kwargs)
    if output_type == "latent":
        return out.images
    return np.round(out.images * 255).astype(np.int16)


@pytest.mark.parametrize(
    "args, kwargs",
    [
        ([], {}),  # the default command: lcm on the lcm schedule, 4 steps, guidance 8.5
        (["--sampler", "diffusers"], {}),  # the folder's own LCMScheduler
        (["--steps", 7, "--model-option", "guidance=3"],
         {"num_inference_steps": 7, "guidance_scale": 3.0}),
        (["--sampler", "diffusers", "--steps", 2], {"num_inference_steps": 2}),
    ],
    ids=["default", "diffusers", "7-steps-guidance-3", "diffusers-2-steps"],
)  # fmt: skip
def test_generate_equals_the_pipeline(folder, tmp_path, decoded, args, kwargs):
    out = tmp_path / "out"
    result = dtk("generate", "--model", folder, "--prompts-file", prompts_file(tmp_path, CAT, DOG),
                 "--seed", 3, *args, "--out", out, "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    [ours] = decoded
    theirs = pipeline(folder, [CAT, DOG], 3, output_type="latent", **kwargs)
    assert float((ours - theirs).abs().max()) <= LATENT_TOL
    reference = pipeline(folder, [CAT, DOG], 3, **kwargs)
    assert max_pixel_difference(pixels(out), reference) <= 1
    run = json.loads((out / "run.json").read_text())
    assert run["model_info"]["family"] == LCM
    assert run["guidance"] == {"name": "none", "options": {}}
    assert run["model_options"] == {"guidance": kwargs.get("guidance_scale", 8.5)}
    sampler = "diffusers" if "diffusers" in args else "lcm"
    steps = kwargs.get("num_inference_steps", 4)
    assert (run["sampler"]["name"], run["schedule"]["name"], run["steps"]) == (sampler, "lcm",
                                                                               steps)  # fmt: skip


def test_the_guidance_scale_is_the_unets_input_and_matters(folder, tmp_path, decoded):
    """The embedding is the pipeline's get_guidance_scale_embedding(w - 1); another scale
    samples elsewhere (and resuming with it is another run)."""
    pipe = LatentConsistencyModelPipeline.from_pretrained(folder, safety_checker=None)
    for scale in (8.5, 1.0, 3.25):
        theirs = pipe.get_guidance_scale_embedding(torch.tensor([scale - 1]), GUIDANCE_DIM)
        assert torch.equal(guidance_embedding(scale, GUIDANCE_DIM), theirs)
    for scale in (8.5, 2.0):
        result = dtk("generate", "--model", folder, "--prompt", CAT, "-n", 1, "--steps", 2,
                     "--model-option", f"guidance={scale}", "--out", tmp_path / f"{scale}",
                     "-q")  # fmt: skip
        assert result.exit_code == 0, result.output
    assert float((decoded[0] - decoded[1]).abs().max()) > 0.05
    again = dtk("generate", "--model", folder, "--prompt", CAT, "-n", 1, "--steps", 2,
                "--out", tmp_path / "2.0", "-q")  # fmt: skip
    assert again.exit_code == 2 and "differing in model_options" in again.stderr


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 13])
@pytest.mark.parametrize("original", [50, 20])
def test_the_lcm_schedule_is_the_schedulers_timesteps(steps, original):
    scheduler = LCMScheduler(original_inference_steps=original)
    scheduler.set_timesteps(steps)
    levels = toolkit.NoiseLevels.from_scheduler_config(scheduler.config)
    a = scheduler.alphas_cumprod[scheduler.timesteps].double()
    expected = torch.cat([((1 - a) / a).sqrt(), a.new_zeros(1)])
    # the model's own original_inference_steps (its noise levels carry it), or the option
    carried = ConsistencyLevels(levels.sigma_min, levels.sigma_max, levels.sigmas, original)
    torch.testing.assert_close(toolkit.schedule("lcm")(steps, carried), expected)
    named = toolkit.schedule("lcm", original_inference_steps=original)(steps, levels)
    torch.testing.assert_close(named, expected)


def test_the_lcm_sampler_needs_a_discrete_vp_model():
    sampler = toolkit.sampler("lcm")
    sigmas = torch.tensor([10.0, 1.0, 0.0])
    with pytest.raises(DtkError, match="needs a discrete-time VP model"):
        sampler(lambda x, sigma: x, torch.zeros(1, 4), sigmas, noise=lambda s, t: None)


def test_detection(folder, tmp_path):
    """An LCM pipeline folder, an SD folder whose UNet takes a guidance embedding, and one
    whose scheduler is LCM's, are all LCMs; only the first two take a guidance scale."""
    embedded = save_sd_with_lcm_unet(tmp_path / "embedded")
    fused = save_sd_with_lcm_scheduler(tmp_path / "fused")
    assert detect_family(folder) == detect_family(embedded) == detect_family(fused) == LCM
    model = open_model(folder)
    assert model.default_sampling() == ("lcm", "lcm", 4)
    assert model.default_guidance(True) == ("none", {})
    assert model.check_model_options({}) == {"guidance": 8.5}
    assert open_model(embedded).check_model_options({"guidance": 2}) == {"guidance": 2.0}
    assert open_model(fused).check_model_options({}) == {}
    with pytest.raises(DtkError, match="takes no guidance scale"):
        open_model(fused).check_model_options({"guidance": 2})


# StableDiffusionPipeline asks LCMScheduler's default config for steps_offset=1 (not ours)
@pytest.mark.filterwarnings("ignore:The configuration file of this scheduler:FutureWarning")
def test_an_lcm_without_a_guidance_embedding_is_sd_with_lcm_scheduler(tmp_path, decoded):
    """An SD folder with an LCMScheduler (an LCM-LoRA fused into SD, say: its UNet takes no
    timestep_cond) runs the lcm sampler, as StableDiffusionPipeline steps that scheduler
    without CFG (guidance_scale 1)."""
    from diffusers import StableDiffusionPipeline

    folder = save_sd_with_lcm_scheduler(tmp_path / "fused")
    out = tmp_path / "out"
    result = dtk("generate", "--model", folder, "--prompts-file", prompts_file(tmp_path, CAT, DOG),
                 "--seed", 2, "--out", out, "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    run = json.loads((out / "run.json").read_text())
    assert "model_options" not in run and run["sampler"]["name"] == "lcm"
    [ours] = decoded
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                   scheduler=LCMScheduler())  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator("cpu").manual_seed(2 + i) for i in range(2)]
    theirs = pipe([CAT, DOG], num_inference_steps=4, guidance_scale=1.0, generator=generators,
                  output_type="latent").images  # fmt: skip
    assert float((ours - theirs).abs().max()) <= LATENT_TOL


@pytest.mark.parametrize(
    "args, message",
    [
        (["--guidance", "cfg"], "needs an unconditional branch, and a latent consistency model"),
        (["--negative-prompt", "blurry"], "takes no negative prompt"),
        (["--model-option", "guidance=x"], "bad value 'x' for option 'guidance' of model 'lcm'"),
        (["--steps", 51], "schedule 'lcm' takes at most original_inference_steps = 50 steps"),
    ],
)  # fmt: skip
def test_what_an_lcm_cannot_do_is_one_line(folder, tmp_path, args, message):
    result = dtk("generate", "--model", folder, "--prompt", CAT, "-n", 1, *args,
                 "--out", tmp_path / "out", "-q")  # fmt: skip
    assert result.exit_code == 2, result.output
    [line] = result.stderr.splitlines()
    assert message in line, line
    assert not (tmp_path / "out").exists()
