"""VE score-SDE folders (``ScoreSdeVePipeline``: an NCSN++-style ``UNet2DModel`` and a
``ScoreSdeVeScheduler``): the family reads the network as diffusers' pipeline calls it,
``unet(x, sigma)`` = the score, so ``D(x, sigma) = x + sigma^2 * score``; our k-diffusion
samplers then integrate the probability-flow ODE ``dx/dsigma = -sigma * score``."""

from __future__ import annotations

import inspect
import itertools
import json
from typing import Any

import diffusers
import pytest
import torch
from folders import pixels
from invoke import dtk
from sampling_helpers import rel_err, sample_requests
from tiny_models import save_ve_pipeline, tiny_ve_unet

import toolkit
from toolkit import DtkError
from toolkit.models import load_model, open_model
from toolkit.models.detect import VE, detect_family
from toolkit.models.ve import SIGMA_MAX, SIGMA_MIN
from toolkit.sampling.denoiser import GuidedDenoiser
from toolkit.sampling.engine import sample_images

SEEDS = [10, 11, 12, 13]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("ve")
    bare = root / "bare"
    tiny_ve_unet().save_pretrained(bare)
    diffusers.ScoreSdeVeScheduler(sigma_max=50.0).save_config(bare)
    return {
        "ve": save_ve_pipeline(root / "ve"),
        "cond": save_ve_pipeline(root / "cond", conditional=True, sigma_min=0.02, sigma_max=80.0),
        "bare": bare,
    }


def eps_of(seeds: list[int]) -> torch.Tensor:
    """Each sample's starting noise, as the engine draws it (docs/contracts.md)."""
    return torch.stack([torch.randn((3, 8, 8), generator=torch.Generator("cpu").manual_seed(s))
                        for s in seeds])  # fmt: skip


def probability_flow_euler(unet: Any, x: torch.Tensor, sigmas: list[float]) -> torch.Tensor:
    """Euler's method on the VE probability-flow ODE, ``dx/dsigma = -sigma * score``, with
    the score as ``ScoreSdeVePipeline`` gets it: ``unet(sample, sigma_t).sample``."""
    for sigma, sigma_next in itertools.pairwise(sigmas):
        score = unet(x, sigma * torch.ones(x.shape[0])).sample
        x = x + (sigma_next - sigma) * (-sigma * score)
    return x


def test_ve_folders_are_detected(folders):
    for kind in ("ve", "cond", "bare"):
        assert detect_family(folders[kind]) == VE
    folder = open_model(folders["cond"])
    assert folder.family == "ve" and folder.labels.names == ["digit", "group"]
    described = folder.describe()
    assert described["prediction_type"] == "score"
    assert (described["sigma_min"], described["sigma_max"]) == (0.02, 80.0)


def test_noise_levels_are_the_schedulers_range(folders):
    model = load_model(folders["ve"])
    assert not model.noise_levels.is_discrete
    assert (model.noise_levels.sigma_min, model.noise_levels.sigma_max) == (0.01, 1348.0)
    defaults = inspect.signature(diffusers.ScoreSdeVeScheduler.__init__).parameters
    assert (defaults["sigma_min"].default, defaults["sigma_max"].default) == (SIGMA_MIN, SIGMA_MAX)
    # the prior at sigma_max: ScoreSdeVePipeline's randn * init_noise_sigma
    eps = eps_of([0])
    scheduler = diffusers.ScoreSdeVeScheduler.from_pretrained(folders["ve"], subfolder="scheduler")
    torch.testing.assert_close(model.prior(eps, model.noise_levels.sigma_max),
                               eps * scheduler.init_noise_sigma)  # fmt: skip


@pytest.mark.parametrize("sigma", [0.01, 0.7, 30.0, 1348.0])
def test_the_denoiser_is_tweedie_on_the_pipelines_score(folders, sigma):
    model = load_model(folders["ve"])
    pipe = diffusers.ScoreSdeVePipeline.from_pretrained(folders["ve"])
    x = eps_of([1, 2]) * sigma + 0.5
    score = pipe.unet(x, sigma * torch.ones(2)).sample  # the pipeline's call
    torch.testing.assert_close(model.denoise(x, sigma), x + sigma**2 * score)


@pytest.mark.parametrize("schedule", ["karras", "exponential"])
@pytest.mark.parametrize("steps", [1, 5, 30])
@pytest.mark.parametrize("kind", ["ve", "bare"])
def test_euler_is_the_probability_flow_euler_step(folders, schedule, steps, kind):
    """Our engine (prior, denoiser, ``euler``) against the ODE transcribed on the network
    as diffusers' pipeline calls it."""
    model = load_model(folders[kind])
    pipe_unet = diffusers.UNet2DModel.from_pretrained(
        folders[kind], subfolder="unet" if kind == "ve" else None
    ).eval()
    sigmas = toolkit.schedule(schedule)(steps, model.noise_levels)
    batch = sample_requests(SEEDS)
    x = model.prior(eps_of(SEEDS), float(sigmas[0]))
    guided = GuidedDenoiser(model, toolkit.guidance("none"), model.conditioning(batch, {}))
    with torch.inference_mode():
        ours = toolkit.sampler("euler")(guided, x, sigmas, noise=None)
        theirs = probability_flow_euler(pipe_unet, eps_of(SEEDS) * float(sigmas[0]),
                                        [float(s) for s in sigmas])  # fmt: skip
    # measured: 2.1e-7 (float32 rounding of samples of size ~1e3: a random score network)
    assert rel_err(ours, theirs) <= 1e-5
    # the whole engine writes clamp(x0, 0, 1): score-SDE models' data are in [0, 1]
    images = sample_images(model, toolkit.sampler("euler"), toolkit.guidance("none"), sigmas,
                           batch)  # fmt: skip
    assert (images - theirs.clamp(0, 1)).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "sampler",
    ["heun", "euler_ancestral", "dpm_2", "lms", "dpmpp_2m", "dpmpp_sde", "unipc", "score_sde_ve"],
)
def test_samplers_run(folders, sampler):
    model = load_model(folders["cond"])
    requests = sample_requests(SEEDS[:2], [{"digit": "1"}, {"digit": "2", "group": "dark"}])
    for schedule in ("karras", "exponential"):
        sigmas = toolkit.schedule(schedule)(6, model.noise_levels)
        images = sample_images(model, toolkit.sampler(sampler),
                               toolkit.guidance("cfg", scale=2.0), sigmas, requests)  # fmt: skip
        assert images.shape == (2, 3, 8, 8) and torch.isfinite(images).all()


def test_dtk_generate_runs_with_the_defaults(folders, tmp_path):
    out = tmp_path / "out"
    result = dtk("generate", "--model", folders["ve"], "-n", 2, "--out", out)
    assert result.exit_code == 0, result.output
    assert len(pixels(out)) == 2
    run = json.loads((out / "run.json").read_text())
    assert run["model_info"]["family"] == "ve"
    assert run["sampler"]["name"] == "dpmpp_2m" and run["schedule"]["name"] == "karras"
    assert run["sigmas"][0] == pytest.approx(1348.0)


def test_dtk_generate_with_labels(folders, tmp_path):
    out = tmp_path / "out"
    result = dtk("generate", "--model", folders["cond"], "-n", 2, "--condition", "digit=1",
                 "--steps", 5, "--sampler", "euler", "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    run = json.loads((out / "run.json").read_text())
    assert run["guidance"]["name"] == "cfg"  # the label family's default, shared
    assert len(pixels(out)) == 2


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--sampler", "diffusers"], "ScoreSdeVeScheduler, which is for variance-exploding"),
        (["--schedule", "leading"], "continuous-time: use karras, exponential"),
        (["--prompt", "a cat"], "takes no --prompt"),
    ],
)
def test_what_a_ve_model_cannot_do_is_one_line(folders, tmp_path, options, message):
    result = dtk("generate", "--model", folders["ve"], "-n", 1, "--steps", 3, *options,
                 "--out", tmp_path / "out")  # fmt: skip
    assert result.exit_code == 2, result.output
    [line] = [line for line in result.stderr.splitlines() if "Error" in line]
    assert message in line
    assert not (tmp_path / "out").exists()


def test_a_score_sde_pipeline_with_another_scheduler_is_refused(tmp_path):
    folder = save_ve_pipeline(tmp_path / "m")
    config_file = folder / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps(dict(diffusers.DDPMScheduler().config,
                                           _class_name="DDPMScheduler")))  # fmt: skip
    with pytest.raises(DtkError, match="whose scheduler is not ScoreSdeVeScheduler"):
        detect_family(folder)


def test_a_bad_sigma_range_is_one_line(tmp_path):
    folder = save_ve_pipeline(tmp_path / "m")
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "sigma_min": 5.0, "sigma_max": 1.0}))
    with pytest.raises(DtkError, match="needs 0 < sigma_min < sigma_max"):
        open_model(folder)


# -- score_sde_ve: the predictor-corrector sampler of ScoreSdeVePipeline --------------------


class GaussianScore(torch.nn.Module):
    """A score network whose samples land in [0, 1], so images compare unclamped: the
    exact score of data ``N(0.5, 0.25^2)`` per pixel, ``-(x - 0.5) / (sigma^2 + 0.25^2)``,
    plus a random NCSN++ UNet's output (a twentieth of it), so the network counts too."""

    def __init__(self, unet: Any) -> None:
        super().__init__()
        self.unet, self.config = unet, unet.config

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, return_dict: bool = True) -> Any:
        from diffusers.models.unets.unet_2d import UNet2DOutput

        s = sigma.view(-1, 1, 1, 1)
        out = -(x - 0.5) / (s**2 + 0.25**2) + 0.05 * self.unet(x, sigma).sample
        return UNet2DOutput(sample=out) if return_dict else (out,)


@pytest.fixture(scope="module")
def gaussian(tmp_path_factory):
    """{config name: (our model, diffusers' pipeline)} on one `GaussianScore` network."""
    root = tmp_path_factory.mktemp("gaussian")
    made = {}
    for name, config in {"defaults": {},
                         "two_corrections": {"sigma_max": 50.0, "snr": 0.16,
                                             "correct_steps": 2}}.items():  # fmt: skip
        folder = save_ve_pipeline(root / name, **config)
        model = load_model(folder)
        model.network = GaussianScore(model.unet)
        scheduler = diffusers.ScoreSdeVeScheduler.from_pretrained(folder, subfolder="scheduler")
        pipe = diffusers.ScoreSdeVePipeline(unet=model.network, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        made[name] = model, pipe
    return made


def score_sde_pipeline(pipe: Any, seeds: list[int], steps: int) -> torch.Tensor:
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    images = pipe(batch_size=len(seeds), generator=generators, num_inference_steps=steps,
                  output_type="np").images  # fmt: skip
    return torch.from_numpy(images).permute(0, 3, 1, 2)


@pytest.mark.parametrize("name", ["defaults", "two_corrections"])
@pytest.mark.parametrize("steps", [2, 10, 50])
def test_score_sde_ve_equals_the_pipeline_one_sample_at_a_time(gaussian, name, steps):
    model, pipe = gaussian[name]
    seeds = SEEDS[:3]
    sigmas = toolkit.schedule("exponential")(steps, model.noise_levels)
    ours = sample_images(model, toolkit.sampler("score_sde_ve"), toolkit.guidance("none"),
                         sigmas, sample_requests(seeds))  # fmt: skip
    alone = torch.cat([score_sde_pipeline(pipe, [s], steps) for s in seeds])
    if steps > 2:
        assert ((alone > 0) & (alone < 1)).float().mean() > 0.5  # mostly unclamped pixels
    # measured: at most 6.9e-4 (0.18 of a level); diffusers' network sees its continuous
    # sigma_min (sigma_max / sigma_min)^t, up to 1.2e-4 (relative) off the level it steps on
    assert (ours - alone).abs().max() <= 1 / 255


def test_score_sde_ve_keeps_each_sample_its_own_step_size(gaussian):
    """diffusers averages the corrector's norms over the batch, so its samples change with
    their batch; ours do not (docs/contracts.md, "Reproducibility")."""
    model, pipe = gaussian["two_corrections"]
    seeds, steps = SEEDS[:3], 10
    sigmas = toolkit.schedule("exponential")(steps, model.noise_levels)
    sampler, none = toolkit.sampler("score_sde_ve"), toolkit.guidance("none")
    together = sample_images(model, sampler, none, sigmas, sample_requests(seeds))
    for k, seed in enumerate(seeds):
        alone = sample_images(model, sampler, none, sigmas, sample_requests([seed]))
        torch.testing.assert_close(alone[0], together[k], atol=1e-5, rtol=0)
    batched = score_sde_pipeline(pipe, seeds, steps)
    alone = torch.cat([score_sde_pipeline(pipe, [s], steps) for s in seeds])
    assert (batched - alone).abs().max() > 5 / 255  # measured 3.6e-2


def test_score_sde_ve_reads_the_models_config(gaussian):
    from plugins.samplers.score_sde import ScoreSdeVe

    model, _ = gaussian["two_corrections"]
    assert ScoreSdeVe().options(model) == (0.16, 2)
    assert ScoreSdeVe(snr=0.1, correct_steps=0).options(model) == (0.1, 0)
    assert ScoreSdeVe().options(lambda x, sigma: x) == (0.15, 1)  # diffusers' defaults
    calls = []

    def denoise(x, sigma):
        calls.append(sigma)
        return x * 0

    denoise.scheduler_config = model.scheduler_config
    zeros = torch.zeros(1, 3, 2, 2)
    ScoreSdeVe()(denoise, torch.ones(1, 3, 2, 2), [3.0, 1.0, 0.0], noise=lambda a, b: zeros)
    assert calls == [3.0, 3.0, 3.0, 1.0, 1.0, 1.0]  # two corrections and the predictor
