"""Built-in schedules against diffusers' schedulers (EulerDiscrete; the multistep solvers for
``linspace variant=dpmsolver``) and k-diffusion's formulas."""

from __future__ import annotations

import math

import diffusers
import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler

import toolkit
from toolkit import DtkError, NoiseLevels

ALL = ["leading", "trailing", "linspace", "karras", "exponential", "polyexponential", "beta", "vp"]
CONFIGS = {
    "linear": {},
    "scaled_linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    "cosine-100": {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 100},
}


def diffusers_sigmas(config: dict, steps: int, **kwargs) -> torch.Tensor:
    scheduler = EulerDiscreteScheduler(**config, **kwargs)
    scheduler.set_timesteps(steps)
    return scheduler.sigmas.double()


@pytest.mark.parametrize("steps", [1, 7, 10, 50])
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_spacings_match_diffusers_euler(spacing, config, steps):
    levels = NoiseLevels.from_scheduler_config(EulerDiscreteScheduler(**config).config)
    ours = toolkit.schedule(spacing)(steps, levels)
    theirs = diffusers_sigmas(config, steps, timestep_spacing=spacing)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, theirs, rtol=2e-7, atol=0)


@pytest.mark.parametrize("steps", [1, 7, 10, 50])
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize(
    "scheduler",
    ["DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler"],
)
def test_linspace_dpmsolver_matches_the_multistep_solvers_default(scheduler, config, steps):
    """Their default spacing, ``linspace`` with ``final_sigmas_type="zero"``: ``steps + 1``
    rounded timesteps from T-1 to 0, t = 0 dropped, then sigma 0 (999, 899, ..., 100, then
    sigma 0 for 10 of 1000 steps)."""
    theirs = getattr(diffusers, scheduler)(**config)
    theirs.set_timesteps(steps)
    levels = NoiseLevels.from_scheduler_config(theirs.config)
    ours = toolkit.schedule("linspace", variant="dpmsolver")(steps, levels)
    torch.testing.assert_close(ours, theirs.sigmas.double(), rtol=2e-7, atol=0)
    if config is CONFIGS["linear"] and steps == 10:
        assert theirs.timesteps.tolist() == [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]
    # not Euler's linspace, which ends at t = 0 (the first training sigma) before sigma 0
    euler = toolkit.schedule("linspace")(steps, levels)
    assert steps == 1 or not torch.allclose(ours, euler)


def test_linspace_variant_is_checked():
    with pytest.raises(toolkit.OptionError, match="variant"):
        toolkit.schedule("linspace", variant="trapezoid")


def test_leading_offset_matches_steps_offset():
    config = CONFIGS["scaled_linear"]
    levels = NoiseLevels.from_scheduler_config(config)
    ours = toolkit.schedule("leading", offset=1)(50, levels)
    theirs = diffusers_sigmas(config, 50, timestep_spacing="leading", steps_offset=1)
    torch.testing.assert_close(ours, theirs, rtol=2e-7, atol=0)


@pytest.mark.parametrize("steps", [5, 20])
@pytest.mark.parametrize(
    "name, flag",
    [
        ("karras", "use_karras_sigmas"),
        ("exponential", "use_exponential_sigmas"),
        ("beta", "use_beta_sigmas"),
    ],
)
def test_sigma_families_match_diffusers(name, flag, steps):
    config = CONFIGS["scaled_linear"]
    levels = NoiseLevels.from_scheduler_config(config)
    ours = toolkit.schedule(name)(steps, levels)
    theirs = diffusers_sigmas(config, steps, **{flag: True})
    torch.testing.assert_close(ours, theirs, rtol=2e-6, atol=0)


def test_karras_rho_and_range_options():
    levels = NoiseLevels.continuous(0.002, 80.0)
    sigmas = toolkit.schedule("karras", rho=3.0, sigma_max=10.0)(4, levels).numpy()
    ramp = np.linspace(0, 1, 4)
    expected = (10.0 ** (1 / 3) + ramp * (0.002 ** (1 / 3) - 10.0 ** (1 / 3))) ** 3
    np.testing.assert_allclose(sigmas[:-1], expected, rtol=1e-12)


def test_polyexponential_follows_k_diffusion():
    levels = NoiseLevels.continuous(0.03, 14.6)
    sigmas = toolkit.schedule("polyexponential", rho=2.0)(9, levels).numpy()
    ramp = np.linspace(1, 0, 9) ** 2.0
    expected = np.exp(ramp * (math.log(14.6) - math.log(0.03)) + math.log(0.03))
    np.testing.assert_allclose(sigmas, np.append(expected, 0), rtol=1e-12)
    exponential = toolkit.schedule("exponential")(9, levels)
    torch.testing.assert_close(toolkit.schedule("polyexponential")(9, levels), exponential)


def test_vp_follows_k_diffusion():
    sigmas = toolkit.schedule("vp")(6, NoiseLevels.continuous(0.1, 10)).numpy()
    t = np.linspace(1, 1e-3, 6)
    expected = np.sqrt(np.exp(19.9 * t**2 / 2 + 0.1 * t) - 1)
    np.testing.assert_allclose(sigmas, np.append(expected, 0), rtol=1e-12)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("steps", [1, 2, 25])
def test_contract(name, steps):
    levels = NoiseLevels.from_scheduler_config({})
    sigmas = toolkit.schedule(name)(steps, levels)
    assert sigmas.shape == (steps + 1,)
    assert sigmas[-1] == 0
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    assert bool(torch.isfinite(sigmas).all())


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("steps", [0, -3, 2.5, True])
def test_bad_steps_are_user_errors(name, steps):
    with pytest.raises(DtkError, match="steps"):
        toolkit.schedule(name)(steps, NoiseLevels.from_scheduler_config({}))


@pytest.mark.parametrize("name", ["leading", "trailing", "linspace"])
def test_spacings_need_discrete_models(name):
    with pytest.raises(DtkError, match="continuous-time"):
        toolkit.schedule(name)(10, NoiseLevels.continuous(0.002, 80))


def test_more_steps_than_timesteps_is_a_clear_error():
    levels = NoiseLevels.from_scheduler_config({"num_train_timesteps": 10})
    with pytest.raises(DtkError, match=r"repeats a noise level|cannot take"):
        toolkit.schedule("trailing")(40, levels)
    with pytest.raises(DtkError, match="cannot take"):
        toolkit.schedule("leading")(40, levels)


def test_bad_options_are_rejected():
    with pytest.raises(toolkit.OptionError, match="accepted: rho"):
        toolkit.schedule("karras", sigma=1.0)
    with pytest.raises(DtkError, match="rho must be positive"):
        toolkit.schedule("karras", rho=0)
