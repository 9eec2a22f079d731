"""Learned-variance (iDDPM-style) label-UNet folders: the UNet outputs the mean's channels,
then the variance's, and the scheduler's ``variance_type`` (``learned``, ``learned_range``)
says how to read them. The denoiser uses the mean; ``ddpm`` samples with the variance as
diffusers' ``DDPMScheduler`` does, so it equals ``DDPMPipeline``; other samplers ignore it."""

from __future__ import annotations

import json
from typing import Any

import diffusers
import pytest
import torch
from folders import pixels
from invoke import dtk
from sampling_helpers import sample_requests
from tiny_models import save_learned_variance_pipeline, save_pipeline

import toolkit
from toolkit import DtkError
from toolkit.models import load_model, open_model
from toolkit.models.detect import UNET, detect_family
from toolkit.sampling.denoiser import GuidedDenoiser
from toolkit.sampling.engine import sample_images

SEEDS = [10, 11, 12, 13]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("learned")
    fixed_large = save_pipeline(root / "fixed_large")
    config_file = fixed_large / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "variance_type": "fixed_large"}))
    return {
        "learned_range": save_learned_variance_pipeline(root / "learned_range"),
        # diffusers' `learned` takes the square root of the network's output itself
        "learned": save_learned_variance_pipeline(
            root / "learned", variance_type="learned", constant_variance=0.02
        ),
        "cond": save_learned_variance_pipeline(root / "cond", conditional=True),
        "fixed_large": fixed_large,
    }


def ours(folder: Any, sampler: Any, steps: int, schedule: str = "leading") -> torch.Tensor:
    model = load_model(folder)
    sigmas = toolkit.schedule(schedule)(steps, model.noise_levels)
    images = sample_images(model, sampler, toolkit.guidance("none"), sigmas,
                           sample_requests(SEEDS))  # fmt: skip
    return images.permute(0, 2, 3, 1) * 255


def ddpm_pipeline(folder: Any, steps: int) -> torch.Tensor:
    """diffusers' DDPMPipeline as loaded from the folder, each sample from its generator."""
    pipe = diffusers.DDPMPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator("cpu").manual_seed(s) for s in SEEDS]
    images = pipe(batch_size=len(SEEDS), generator=generators, num_inference_steps=steps,
                  output_type="np").images  # fmt: skip
    return torch.from_numpy(images) * 255


def test_learned_variance_folders_are_label_unets(folders):
    for kind in ("learned_range", "learned", "cond"):
        assert detect_family(folders[kind]) == UNET
        folder = open_model(folders[kind])
        assert folder.learned_variance and folder.sample_shape == (3, 8, 8)
        assert folder.describe()["variance_type"] == folder.scheduler_config["variance_type"]
    assert not open_model(folders["fixed_large"]).learned_variance


@pytest.mark.parametrize("kind", ["learned_range", "learned"])
@pytest.mark.parametrize("steps", [10, 25])
def test_ddpm_equals_ddpm_pipeline(folders, kind, steps):
    theirs = ddpm_pipeline(folders[kind], steps)
    mine = ours(folders[kind], toolkit.sampler("ddpm"), steps)
    assert torch.isfinite(theirs).all()
    # measured: 2.1e-4 (learned_range) and 1.4e-3 (learned) of a pixel level at most
    assert (mine - theirs).abs().max() <= 1
    # the comparison has teeth: the fixed small variance (DDPM's default) is far off
    fixed_small = ours(folders[kind], toolkit.sampler("ddim", eta=1.0), steps)
    assert (fixed_small - theirs).abs().max() > 10


def test_ddpm_follows_a_fixed_large_variance(folders):
    """google/ddpm-* folders say ``variance_type: fixed_large``: the noise is ``beta``'s."""
    theirs = ddpm_pipeline(folders["fixed_large"], 10)
    assert (ours(folders["fixed_large"], toolkit.sampler("ddpm"), 10) - theirs).abs().max() <= 1
    fixed_small = ours(folders["fixed_large"], toolkit.sampler("ddim", eta=1.0), 10)
    assert (fixed_small - theirs).abs().max() > 2


def test_the_denoiser_uses_the_mean_channels(folders):
    model = load_model(folders["learned_range"])
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 3
    sigma = 3.0
    t = model.noise_levels.sigma_to_t(torch.tensor([sigma, sigma]))
    out = model.unet(x / (sigma**2 + 1) ** 0.5, t).sample
    assert out.shape[1] == 6
    torch.testing.assert_close(model.denoise(x, sigma), x - sigma * out[:, :3])
    torch.testing.assert_close(model.variance, out[:, 3:])


@pytest.mark.parametrize(("sampler", "schedule"), [("ddim", "leading"), ("euler", "karras"),
                                                   ("dpmpp_2m", "karras")])  # fmt: skip
def test_other_samplers_run_on_the_mean(folders, tmp_path, sampler, schedule):
    out = tmp_path / "out"
    result = dtk("generate", "--model", folders["learned_range"], "-n", 2, "--steps", 6,
                 "--sampler", sampler, "--schedule", schedule, "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(pixels(out)) == 2


def test_ddpm_through_dtk_generate(folders, tmp_path):
    out = tmp_path / "out"
    result = dtk("generate", "--model", folders["learned_range"], "-n", 2, "--seed", 10,
                 "--steps", 10, "--sampler", "ddpm", "--schedule", "leading",
                 "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    theirs = ddpm_pipeline(folders["learned_range"], 10).round()
    written = pixels(out)
    for i in range(2):  # seeds 10 and 11
        assert (torch.from_numpy(written[i]).float() - theirs[i]).abs().max() <= 1


def test_under_guidance_the_variance_is_the_cond_branchs(folders):
    model = load_model(folders["cond"])
    batch = sample_requests([0, 1], [{"digit": "1", "group": "dark"}, {"digit": "2"}])
    conditioning = model.conditioning(batch, {})
    guided = GuidedDenoiser(model, toolkit.guidance("cfg", scale=3.0), conditioning)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 5
    guided(x, 5.0)
    assert guided.forwards == 1 and model.variance.shape[0] == 4  # both branches, one pass
    model.denoise(x, 5.0, **conditioning.inputs("cond", 2, model.device))
    torch.testing.assert_close(guided.variance, model.variance)
    model.denoise(x, 5.0, **conditioning.inputs("uncond", 2, model.device))
    assert not torch.allclose(guided.variance, model.variance)


def test_a_sample_does_not_depend_on_its_batch(folders):
    model = load_model(folders["cond"])
    sigmas = toolkit.schedule("leading")(8, model.noise_levels)
    conditions = [{"digit": "0"}, {"digit": "1", "group": "light"}, {}, {"group": "dark"}]
    requests = sample_requests(SEEDS, conditions)
    ddpm, cfg = toolkit.sampler("ddpm"), toolkit.guidance("cfg", scale=2.0)
    together = sample_images(model, ddpm, cfg, sigmas, requests)
    for k, request in enumerate(requests):
        alone = sample_images(model, ddpm, cfg, sigmas, [request])
        torch.testing.assert_close(alone[0], together[k], atol=1e-5, rtol=0)


def test_a_denoiser_without_variance_gets_the_fixed_small_one():
    from plugins.samplers.ddim import step_noise_scale
    from plugins.samplers.updates import ancestral_step

    x = torch.zeros(1)
    for variance_type in ("learned", "learned_range"):
        scale = step_noise_scale(variance_type, 3.0, 1.5, None, x)
        assert scale == pytest.approx(ancestral_step(3.0, 1.5, 1.0)[1])


@pytest.mark.parametrize("variance_type", ["learned", "learned_range"])
def test_the_noise_scale_is_the_schedulers_deviation(variance_type):
    """Per pixel, for a given variance output: ``DDPMScheduler``'s standard deviation in
    x_t space is ours times ``sqrt(a')``."""
    from plugins.samplers.ddim import step_noise_scale

    scheduler = diffusers.DDPMScheduler(variance_type=variance_type)
    scheduler.set_timesteps(10)  # 900, 800, ..., 0: the step from 500 goes to 400
    levels = toolkit.NoiseLevels.from_scheduler_config(scheduler.config)
    sigma, sigma_next = float(levels.sigmas[500]), float(levels.sigmas[400])
    predicted = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    predicted = predicted * 0.02 if variance_type == "learned" else predicted * 2 - 1
    scale = step_noise_scale(variance_type, sigma, sigma_next, predicted, predicted)
    variance = scheduler._get_variance(500, predicted_variance=predicted)
    std = variance.sqrt() if variance_type == "learned" else torch.exp(0.5 * variance)
    a_next = 1 / (1 + sigma_next**2)
    torch.testing.assert_close(scale * a_next**0.5, std, rtol=1e-5, atol=0)


def test_inconsistent_folders_are_one_line(tmp_path):
    six = save_learned_variance_pipeline(tmp_path / "six")
    config_file = six / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "variance_type": "fixed_small"}))
    with pytest.raises(DtkError, match="outputs 6 channels for 3 input channels"):
        detect_family(six)
    three = save_pipeline(tmp_path / "three")
    config_file = three / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "variance_type": "learned_range"}))
    result = dtk("generate", "--model", three, "-n", 1, "--out", tmp_path / "out")
    assert result.exit_code == 2
    [line] = result.stderr.splitlines()
    assert "variance_type is learned_range" in line and "predicts no variance" in line
    assert not (tmp_path / "out").exists()


def test_the_diffusers_sampler_refuses_a_learned_variance(folders, tmp_path):
    result = dtk("generate", "--model", folders["learned_range"], "-n", 1, "--steps", 4,
                 "--sampler", "diffusers", "--out", tmp_path / "out")  # fmt: skip
    assert result.exit_code == 2, result.output
    # refused when the sampler starts (after the progress bar), in one line
    [line] = [line for line in result.stderr.splitlines() if "Error" in line]
    assert "variance_type=learned_range" in line and "hands the scheduler epsilon only" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("variance_type", ["fixed_large_log", "nonsense"])
def test_ddpm_refuses_a_variance_it_cannot_follow(variance_type):
    from plugins.samplers.ddim import DDPM

    def denoise(x, sigma):
        return x * 0

    denoise.scheduler_config = {"_class_name": "DDPMScheduler", "variance_type": variance_type}
    with pytest.raises(toolkit.OptionError, match=f"variance_type '{variance_type}'"):
        DDPM()(denoise, torch.zeros(1, 3, 2, 2), [2.0, 1.0, 0.0], noise=None)
