"""`ddim` and `ddpm` clip or threshold the predicted x0 as diffusers' ``DDIMScheduler`` and
``DDPMScheduler`` do, when the model's scheduler config says so (or when told to).

The shipped generator's config says ``clip_sample: true`` (DDPMScheduler's default), so our
``ddim`` must equal ``DDIMPipeline`` on it, and ``ddpm`` ``DDPMPipeline``; on a tiny random
UNet every clipping option is compared with the scheduler, step by step.
"""

from __future__ import annotations

import math
from typing import Any

import diffusers
import pytest
import torch
from sampling_helpers import (
    SAMPLE_SHAPE,
    SCHEDULER_CONFIG,
    EpsDenoiser,
    NoiseStream,
    gaussian_denoiser,
    rel_err,
    run_diffusers,
    sample_requests,
    tiny_unet,
)

import toolkit
from plugins.samplers.ddim import X0Clipping, config_value
from toolkit.errors import OptionError
from toolkit.generation.generate import default_model
from toolkit.models import load_model
from toolkit.sampling.engine import sample_images

TOL = 1e-4
SEEDS = [10, 11, 12, 13]
REQUESTS = [("3", "light"), ("7", "dark"), ("0", "dark"), ("5", "light")]


# -- the shipped model against diffusers' pipelines -----------------------------------------


class Labelled(torch.nn.Module):
    """The shipped class-conditional UNet as an unconditional pipeline's ``unet``: diffusers'
    DDIM/DDPM pipelines call ``unet(x, t)``; this adds the batch's class labels."""

    def __init__(self, unet: Any, labels: torch.Tensor) -> None:
        super().__init__()
        self.unet, self.labels, self.config = unet, labels, unet.config

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def forward(self, x: torch.Tensor, t: Any) -> Any:
        return self.unet(x, t, class_labels=self.labels)


@pytest.fixture(scope="module")
def shipped() -> Any:
    model = load_model(default_model())
    labels = torch.tensor([model.labels.label({"digit": d, "group": g}) for d, g in REQUESTS])
    return model, labels


def ours(shipped: Any, sampler: Any, steps: int) -> torch.Tensor:
    model, _ = shipped
    sigmas = toolkit.schedule("leading")(steps, model.noise_levels)
    conditions = [{"digit": d, "group": g} for d, g in REQUESTS]
    images = sample_images(model, sampler, toolkit.guidance("none"), sigmas,
                           sample_requests(SEEDS, conditions))  # fmt: skip
    return images.permute(0, 2, 3, 1) * 255


def pipeline(shipped: Any, kind: str, steps: int, **scheduler_options: Any) -> torch.Tensor:
    """diffusers' DDIMPipeline / DDPMPipeline with a scheduler made from the shipped folder's
    scheduler config, each sample from its own generator (as ours)."""
    model, labels = shipped
    scheduler_class = {"ddim": diffusers.DDIMScheduler, "ddpm": diffusers.DDPMScheduler}[kind]
    pipeline_class = {"ddim": diffusers.DDIMPipeline, "ddpm": diffusers.DDPMPipeline}[kind]
    scheduler = scheduler_class.from_config(model.scheduler_config, **scheduler_options)
    pipe = pipeline_class(unet=Labelled(model.unet, labels), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator("cpu").manual_seed(s) for s in SEEDS]
    images = pipe(batch_size=len(SEEDS), generator=generators, num_inference_steps=steps,
                  output_type="np").images  # fmt: skip
    return torch.from_numpy(images) * 255


def test_the_shipped_config_clips(shipped):
    model, _ = shipped
    assert model.scheduler_config["clip_sample"] is True


def test_ddim_equals_ddim_pipeline_on_the_shipped_model(shipped):
    theirs = pipeline(shipped, "ddim", 10)
    mine = ours(shipped, toolkit.sampler("ddim"), 10)
    # measured 2.4e-4 of a pixel level
    assert (mine - theirs).abs().max() <= 1
    # the comparison has teeth: without the clipping the pipeline is 27 levels away
    unclipped = pipeline(shipped, "ddim", 10, clip_sample=False)
    assert (theirs - unclipped).abs().max() > 10
    assert (
        ours(shipped, toolkit.sampler("ddim", clip_sample=False), 10) - unclipped
    ).abs().max() <= 1


def test_ddpm_equals_ddpm_pipeline_on_the_shipped_model(shipped):
    theirs = pipeline(shipped, "ddpm", 10)
    mine = ours(shipped, toolkit.sampler("ddpm"), 10)
    # measured 1.4e-4 of a pixel level
    assert (mine - theirs).abs().max() <= 1
    # without the clipping: 3 levels away (DDPM's fresh noise dominates the early steps,
    # where x0 is clipped hardest)
    assert (ours(shipped, toolkit.sampler("ddpm", clip_sample=False), 10) - theirs).abs().max() > 2


# -- every option against the schedulers, step by step (tiny random UNet) -------------------


class ConfiguredEps(EpsDenoiser):
    """`EpsDenoiser` carrying a scheduler config, as the toolkit's denoisers do."""

    def __init__(self, unet: Any, config: Any) -> None:
        super().__init__(unet, toolkit.NoiseLevels.from_scheduler_config(config))
        self.scheduler_config = dict(config)


CASES = {
    "ddim-clip": ("ddim", {"clip_sample": True}, {}),
    "ddim-clip-range-eta": ("ddim", {"clip_sample": True, "clip_sample_range": 0.5},
                            {"eta": 0.5}),
    "ddim-threshold": ("ddim", {"thresholding": True, "dynamic_thresholding_ratio": 0.9,
                                "sample_max_value": 3.0}, {}),
    "ddpm-clip": ("ddpm", {"clip_sample": True}, {}),
    "ddpm-clip-range": ("ddpm", {"clip_sample": True, "clip_sample_range": 2.0}, {}),
    "ddpm-threshold": ("ddpm", {"thresholding": True, "dynamic_thresholding_ratio": 0.9,
                                "sample_max_value": 3.0}, {}),
}  # fmt: skip
STEPS = 15


@pytest.fixture(scope="module")
def unet() -> Any:
    return tiny_unet()


def reference(unet: Any, kind: str, clipping: dict[str, Any], eta: dict[str, Any]) -> Any:
    """diffusers' DDIM/DDPM scheduler with `clipping` in its standard loop; its config, the
    run and the starting noise."""
    off = {"clip_sample": False, "thresholding": False}  # DDIM and DDPM default to clipping
    if kind == "ddim":
        scheduler = diffusers.DDIMScheduler(
            **SCHEDULER_CONFIG, set_alpha_to_one=True, **{**off, **clipping}
        )
    else:
        scheduler = diffusers.DDPMScheduler(
            **SCHEDULER_CONFIG, variance_type="fixed_small", **{**off, **clipping}
        )
    noise0 = torch.randn(SAMPLE_SHAPE, generator=torch.Generator("cpu").manual_seed(1234))
    return scheduler.config, run_diffusers(scheduler, unet, noise0, STEPS, 1, True, **eta), noise0


def run_ours(unet: Any, kind: str, config: Any, ref: Any, noise0: Any, **options: Any) -> Any:
    """Our sampler (`options`) on the reference's sigmas and noise; its denoiser carries
    the scheduler config `config`."""
    sampler = toolkit.sampler(kind, **options)
    x = noise0 * math.sqrt(ref.sigmas[0] ** 2 + 1)
    return sampler(ConfiguredEps(unet, config), x, ref.sigmas, noise=NoiseStream(1))


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_clipping_matches_the_scheduler(unet, case):
    kind, clipping, eta = case
    config, ref, noise0 = reference(unet, kind, clipping, eta)
    # the options as the model's scheduler config says
    assert rel_err(run_ours(unet, kind, config, ref, noise0, **eta), ref.sample) <= TOL
    # the same options given explicitly, over a config that says: no clipping
    plain = {**config, "clip_sample": False, "thresholding": False}
    explicit = run_ours(unet, kind, plain, ref, noise0, **eta, **clipping)
    assert rel_err(explicit, ref.sample) <= TOL
    # teeth: the clipping changes this run (measured 7.5 to 34: the random UNet's x0 is far
    # outside [-1, 1])
    assert rel_err(run_ours(unet, kind, plain, ref, noise0, **eta), ref.sample) > 1


def test_ddim_keeps_the_unclipped_epsilon_and_ddpm_does_not():
    """One step from sigma to sigma' (no fresh noise): DDIM moves the clipped x0 along the
    UNclipped epsilon, DDPM along the epsilon of the clipped x0 (its posterior mean is
    linear in x0 and x); to sigma 0 both return the clipped x0."""
    x = torch.linspace(-30, 30, 48).reshape(1, 3, 4, 4)
    sigma, sigma_next = 10.0, 4.0
    denoise = gaussian_denoiser(torch.zeros(1, 3, 4, 4), 2.0)
    x0 = denoise(x, sigma)
    x0c = x0.clamp(-1, 1)
    assert x0.abs().max() > 1  # so the clipping bites

    def first_step(name: str, sigmas: list[float]) -> torch.Tensor:
        steps: list[torch.Tensor] = []
        toolkit.sampler(name, clip_sample=True)(
            denoise, x, sigmas, noise=lambda a, b: torch.zeros_like(x),
            callback=lambda info: steps.append(info["x"]),
        )  # fmt: skip
        return steps[0]

    for name in ("ddim", "ddpm"):
        torch.testing.assert_close(first_step(name, [sigma, 0.0]), x0c)
    ddim = first_step("ddim", [sigma, sigma_next, 0.0])
    torch.testing.assert_close(ddim, x0c + sigma_next * (x - x0) / sigma)
    ddpm = first_step("ddpm", [sigma, sigma_next, 0.0])
    sigma_down = sigma_next**2 / sigma  # the deterministic part of DDPM's (eta = 1) step
    torch.testing.assert_close(ddpm, x0c + sigma_down * (x - x0c) / sigma)


# -- where the options come from -------------------------------------------------------------


@pytest.mark.parametrize(
    "config, expected",
    [
        (None, False),
        ({}, False),
        ({"clip_sample": True}, True),
        ({"_class_name": "DDPMScheduler", "clip_sample": False}, False),
        # a config without the key: the default of the class it names, as diffusers reads it
        ({"_class_name": "DDPMScheduler"}, True),
        ({"_class_name": "DDIMScheduler"}, True),
        ({"_class_name": "EulerDiscreteScheduler"}, False),
        ({"_class_name": "NoSuchScheduler"}, False),
    ],
)
def test_clip_sample_defaults_to_what_the_config_says(config, expected):
    assert config_value(config, "clip_sample") is expected


def test_explicit_options_override_the_config():
    class Configured:
        def __init__(self) -> None:
            self.scheduler_config = {"clip_sample": True, "clip_sample_range": 2.0}

    ddim = toolkit.sampler("ddim")
    assert ddim.clipping(Configured()) == X0Clipping(clip_sample=True, clip_sample_range=2.0)
    assert not toolkit.sampler("ddim", clip_sample=False).clipping(Configured()).active
    clipping = toolkit.sampler("ddpm", thresholding=True).clipping(Configured())
    assert clipping.thresholding and clipping.clip_sample_range == 2.0


def test_a_plain_function_denoiser_is_not_clipped():
    """No scheduler config, no clipping: ``ddim`` is the ancestral Euler step with eta 0."""
    denoise = gaussian_denoiser(torch.full((1, 3, 4, 4), 3.0), 0.5, wiggle=0.3)
    x = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 15
    sigmas = toolkit.schedule("karras")(8, toolkit.NoiseLevels.continuous(0.03, 14.6))
    no_noise = lambda a, b: torch.zeros_like(x)  # noqa: E731
    ddim = toolkit.sampler("ddim")(denoise, x, sigmas, noise=no_noise)
    euler = toolkit.sampler("euler_ancestral", eta=0.0)(denoise, x, sigmas, noise=no_noise)
    torch.testing.assert_close(ddim, euler, rtol=0, atol=0)
    assert ddim.abs().max() > 1.5  # would have been clipped


@pytest.mark.parametrize(
    "options, message",
    [
        ({"clip_sample_range": 0.0}, "clip_sample_range must be positive"),
        ({"dynamic_thresholding_ratio": 1.5}, "dynamic_thresholding_ratio must be in"),
        ({"sample_max_value": 0.5}, "sample_max_value must be at least 1"),
    ],
)
def test_bad_clipping_options_are_user_errors(options, message):
    for name in ("ddim", "ddpm"):
        with pytest.raises(OptionError, match=message):
            toolkit.sampler(name, **options)
