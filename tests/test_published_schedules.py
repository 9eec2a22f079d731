"""``laplace`` (k-diffusion's ``get_sigmas_laplace``) and ``align_your_steps`` (NVIDIA's
published tables) against their references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers.schedulers import AysSchedules

import toolkit
from toolkit.models.noise import FlowLevels


def sd_levels() -> toolkit.NoiseLevels:
    return toolkit.NoiseLevels.from_scheduler_config(
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012})  # fmt: skip


def kdiffusion_laplace(n, sigma_min, sigma_max, mu=0.0, beta=0.5):
    """k-diffusion's get_sigmas_laplace, as it computes it (float32 torch), then its 0."""
    x = torch.linspace(0, 1, n)
    lmb = mu - beta * torch.sign(0.5 - x) * torch.log(1 - 2 * torch.abs(0.5 - x) + 1e-5)
    return torch.cat([torch.exp(lmb).clamp(min=sigma_min, max=sigma_max), torch.zeros(1)])


@pytest.mark.parametrize("steps", [2, 5, 10, 30])
@pytest.mark.parametrize(("mu", "beta"), [(0.0, 0.5), (0.5, 0.8), (-0.5, 0.3)])
def test_laplace_equals_kdiffusion(steps, mu, beta):
    levels = sd_levels()
    ours = toolkit.schedule("laplace", mu=mu, beta=beta)(steps, levels)
    theirs = kdiffusion_laplace(steps, levels.sigma_min, levels.sigma_max, mu, beta)
    torch.testing.assert_close(ours.float(), theirs, rtol=1e-5, atol=0)


def test_laplace_concentrates_steps_around_e_to_the_mu():
    sigmas = toolkit.schedule("laplace", mu=0.0)(20, sd_levels())[:-1].numpy()
    gaps = np.abs(np.diff(np.log(sigmas)))
    near = int(np.argmin(np.abs(np.log(sigmas))))  # the level closest to sigma = e^0
    # the smallest step in log sigma is one of the two next to it, and the steps grow away
    assert int(np.argmin(gaps)) in (near - 1, near)
    assert gaps[1] > 2 * gaps.min() and gaps[-2] > 2 * gaps.min()


@pytest.mark.parametrize(
    ("model", "reference"),
    [("sd1", "StableDiffusionSigmas"), ("sdxl", "StableDiffusionXLSigmas"),
     ("svd", "StableDiffusionVideoSigmas")],
)  # fmt: skip
def test_align_your_steps_at_ten_steps_is_the_published_table(model, reference):
    ours = toolkit.schedule("align_your_steps", model=model)(10, sd_levels()).numpy()
    np.testing.assert_allclose(ours, AysSchedules[reference], rtol=1e-12, atol=0)


def test_align_your_steps_interpolates_in_log_sigma():
    """20 steps keep the 10-step levels at even positions; between two of them the level is
    their geometric mean (linear in log sigma over an even grid)."""
    ten = toolkit.schedule("align_your_steps")(10, sd_levels()).numpy()
    twenty = toolkit.schedule("align_your_steps")(20, sd_levels()).numpy()
    np.testing.assert_allclose(twenty[0:-1:2], ten[:-1], rtol=1e-12)
    np.testing.assert_allclose(twenty[1], math.sqrt(ten[0] * ten[1]), rtol=1e-12)
    assert twenty[-1] == 0 and len(twenty) == 21


def test_align_your_steps_refuses_a_flow_model_and_an_unknown_table():
    with pytest.raises(toolkit.DtkError, match="this is a rectified-flow model"):
        toolkit.schedule("align_your_steps")(10, FlowLevels(shift=3.0))
    with pytest.raises(toolkit.DtkError, match="expected one of 'sd1', 'sdxl', 'svd'"):
        toolkit.schedule("align_your_steps", model="flux")


@pytest.mark.parametrize("name", ["laplace", "align_your_steps"])
def test_each_samples_the_shipped_model(name, tmp_path):
    written = toolkit.generate(out=tmp_path / "out", conditions={"digit": "3"}, n=2, steps=4,
                               schedule=name, progress=False)  # fmt: skip
    assert len(written) == 2 and set(written["schedule"]) == {name}
