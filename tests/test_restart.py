"""``restart`` gives the sample of AUTOMATIC1111's "Restart" sampler (``restart_sampler`` in
``modules/sd_samplers_extra.py``, written by the authors of Xu et al. 2023, "Restart
Sampling for Improving Generative Processes"; Forge and reForge carry the same code).

The reference below restates it as the web UI writes it (torch arithmetic, its step list,
k-diffusion's ``get_sigmas_karras`` and ``to_d``), without the progress bar, callback or
``extra_args``. Adapted (marked): its restart noise ``torch.randn_like(x)`` comes from the
noise stream, called ``noise_sampler(sigma_from, sigma_to)`` as ours is. It runs on the exact
denoiser of Gaussian data plus a small nonlinearity, in float64, on Karras sigmas, as
`test_samplers_kdiffusion` does.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch
from sampling_helpers import SAMPLE_SHAPE, NoiseStream, gaussian_denoiser, rel_err

import toolkit
from plugins.samplers.restart import Restart

TOL = 1e-4
NOISE_SEED = 5
DATA_STD = 0.5


# -- the web UI's restart_sampler, restated ----------------------------------------------------


def append_zero(x):
    return torch.cat([x, x.new_zeros([1])])


def get_sigmas_karras(n, sigma_min, sigma_max, rho=7.0, device="cpu"):
    """Constructs the noise schedule of Karras et al. (2022)."""
    ramp = torch.linspace(0, 1, n, device=device, dtype=torch.float64)  # adapted: float64
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return append_zero(sigmas).to(device)


def to_d(x, sigma, denoised):
    return (x - denoised) / sigma


@torch.no_grad()
def restart_sampler(model, x, sigmas, s_noise=1.0, restart_list=None, noise_sampler=None):
    """Implements restart sampling in Restart Sampling for Improving Generative Processes (2023)
    Restart_list format: {min_sigma: [ restart_steps, restart_times, max_sigma]}
    If restart_list is None: will choose restart_list automatically, otherwise will use the given restart_list
    """  # noqa: E501
    step_id = 0

    def heun_step(x, old_sigma, new_sigma, second_order=True):
        nonlocal step_id
        denoised = model(x, old_sigma)
        d = to_d(x, old_sigma, denoised)
        dt = new_sigma - old_sigma
        if new_sigma == 0 or not second_order:
            # Euler method
            x = x + d * dt
        else:
            # Heun's method
            x_2 = x + d * dt
            denoised_2 = model(x_2, new_sigma)
            d_2 = to_d(x_2, new_sigma, denoised_2)
            d_prime = (d + d_2) / 2
            x = x + d_prime * dt
        step_id += 1
        return x

    steps = sigmas.shape[0] - 1
    if restart_list is None:
        if steps >= 20:
            restart_steps = 9
            restart_times = 1
            if steps >= 36:
                restart_steps = steps // 4
                restart_times = 2
            sigmas = get_sigmas_karras(steps - restart_steps * restart_times, sigmas[-2].item(),
                                       sigmas[0].item(), device=sigmas.device)  # fmt: skip
            restart_list = {0.1: [restart_steps + 1, restart_times, 2]}
        else:
            restart_list = {}

    restart_list = {int(torch.argmin(abs(sigmas - key), dim=0)): value
                    for key, value in restart_list.items()}  # fmt: skip

    step_list = []
    for i in range(len(sigmas) - 1):
        step_list.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in restart_list:
            restart_steps, restart_times, restart_max = restart_list[i + 1]
            min_idx = i + 1
            max_idx = int(torch.argmin(abs(sigmas - restart_max), dim=0))
            if max_idx < min_idx:
                sigma_restart = get_sigmas_karras(restart_steps, sigmas[min_idx].item(),
                                                  sigmas[max_idx].item(),
                                                  device=sigmas.device)[:-1]  # fmt: skip
                while restart_times > 0:
                    restart_times -= 1
                    step_list.extend(itertools.pairwise(sigma_restart))

    last_sigma = None
    for old_sigma, new_sigma in step_list:
        if last_sigma is None:
            last_sigma = old_sigma
        elif last_sigma < old_sigma:
            # adapted: torch.randn_like(x)
            eps = noise_sampler(last_sigma, old_sigma)
            x = x + eps * s_noise * (old_sigma**2 - last_sigma**2) ** 0.5
        x = heun_step(x, old_sigma, new_sigma)
        last_sigma = new_sigma

    return x


# -- the comparisons ---------------------------------------------------------------------------


def problem(steps: int) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """The Gaussian denoiser, a start at the first sigma and `steps` Karras sigmas (SD's
    training range)."""
    g = torch.Generator().manual_seed(3)
    mu = torch.randn(SAMPLE_SHAPE, generator=g, dtype=torch.float64) * 0.3
    sigmas = get_sigmas_karras(steps, 0.0292, 14.6146)
    x = torch.randn(SAMPLE_SHAPE, generator=g, dtype=torch.float64) * float(sigmas[0])
    return gaussian_denoiser(mu, DATA_STD, wiggle=0.2), x, sigmas


class Counted:
    """A denoiser that counts its calls."""

    def __init__(self, denoise: Any) -> None:
        self.denoise, self.calls = denoise, 0

    def __call__(self, x: torch.Tensor, sigma: Any) -> torch.Tensor:
        self.calls += 1
        return self.denoise(x, sigma)


def compare(steps: int, options: dict[str, Any], restart_list: dict | None = None,
            s_noise: float = 1.0) -> tuple[NoiseStream, int]:  # fmt: skip
    """Ours with `options` against the web UI's with `restart_list` on `steps` Karras steps;
    returns our noise stream and model calls."""
    denoise, x, sigmas = problem(steps)
    theirs = NoiseStream(NOISE_SEED, dtype=torch.float64)
    ref = restart_sampler(denoise, x, sigmas, s_noise=s_noise, restart_list=restart_list,
                          noise_sampler=theirs)  # fmt: skip
    noise = NoiseStream(NOISE_SEED, dtype=torch.float64)
    counted = Counted(denoise)
    ours = Restart(s_noise=s_noise, **options)(counted, x, sigmas, noise=noise)
    assert rel_err(ours, ref) <= TOL
    assert len(noise.calls) == len(theirs.calls)
    assert all(a == pytest.approx(b, rel=1e-12) for a, b in zip(noise.calls, theirs.calls))
    return noise, counted.calls


@pytest.mark.parametrize("steps", [10, 19, 20, 25, 35, 36, 40])
def test_the_automatic_restarts_are_the_web_uis(steps: int) -> None:
    """Below 20 steps no restarts (Heun); from 20, 9 restart steps once; from 36, steps // 4
    twice; the main pass re-spaced so that the Heun steps total `steps`."""
    noise, calls = compare(steps, {})
    restarts = 0 if steps < 20 else 1 if steps < 36 else 2
    assert len(noise.calls) == restarts
    assert all(low < high for low, high in noise.calls)
    assert calls == 2 * steps - 1  # Heun: two calls a step, one on the last (to 0)


def test_below_20_steps_restart_is_heun() -> None:
    denoise, x, sigmas = problem(12)
    heun = toolkit.sampler("heun")(denoise, x, sigmas, noise=None)
    assert rel_err(Restart()(denoise, x, sigmas, noise=None), heun) <= 1e-12


@pytest.mark.parametrize(
    "options, restart_list",
    [
        ({"restart_steps": 4, "restart_times": 2, "restart_min": 0.5, "restart_max": 5.0},
         {0.5: [5, 2, 5.0]}),
        ({"restart_steps": 3}, {0.1: [4, 1, 2.0]}),  # restart_times defaults to once
        ({"restart_times": 3}, {0.1: [10, 3, 2.0]}),  # restart_steps defaults to 9
        ({"restart_times": 0}, {0.1: [10, 0, 2.0]}),  # no restarts
        # restart_max nearest the same level as restart_min: no restarts
        ({"restart_steps": 3, "restart_min": 0.45, "restart_max": 0.5}, {0.45: [4, 1, 0.5]}),
        # restart_min nearest the final 0: a restart from the finished sample
        ({"restart_steps": 3, "restart_min": 0.01, "restart_max": 1.0}, {0.01: [4, 1, 1.0]}),
    ],
)  # fmt: skip
def test_explicit_restarts_are_the_web_uis(options: dict[str, Any], restart_list: dict) -> None:
    """Given either option, restarts go on the schedule as it is (the web UI's explicit
    ``restart_list``: ``{restart_min: [restart_steps + 1, restart_times, restart_max]}``)."""
    compare(25, options, restart_list, s_noise=0.9)


def test_bad_options_are_one_line() -> None:
    for options, message in [
        ({"restart_steps": 0}, "restart: restart_steps must be at least 1"),
        ({"restart_times": -1}, "restart: restart_times must be non-negative"),
        ({"restart_min": 2.0, "restart_max": 1.0}, "need 0 < restart_min < restart_max"),
    ]:
        with pytest.raises(toolkit.OptionError) as info:
            Restart(**options)
        assert message in str(info.value) and "\n" not in str(info.value)


def test_restarts_bring_the_sample_closer_to_the_data() -> None:
    """The point of the method: on few main steps, restarts shrink the ODE's discretisation
    error (here against the exact solution for Gaussian data)."""
    from sampling_helpers import gaussian_ode_solution

    mu = torch.zeros(SAMPLE_SHAPE, dtype=torch.float64)
    denoise = gaussian_denoiser(mu, DATA_STD)
    sigmas = get_sigmas_karras(6, 0.0292, 14.6146)
    x = torch.randn(SAMPLE_SHAPE, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64) * float(sigmas[0])  # fmt: skip
    exact = gaussian_ode_solution(x, mu, DATA_STD, float(sigmas[0]))
    plain = Restart(restart_times=0)(denoise, x, sigmas, noise=None)
    # restarts lose the ODE's pairing of noise to image, not its distribution: compare norms
    noise = NoiseStream(NOISE_SEED, dtype=torch.float64)
    restarted = Restart(restart_steps=6, restart_max=5.0)(denoise, x, sigmas, noise=noise)
    target = float(exact.norm())
    assert abs(float(restarted.norm()) - target) < abs(float(plain.norm()) - target)
    assert math.isfinite(float(restarted.norm()))
