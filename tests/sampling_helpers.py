"""Shared pieces of the sampler reference tests (`test_samplers_diffusers`,
`test_samplers_kdiffusion`): a tiny random UNet, sigma-space denoisers, recorded noise
streams, and a diffusers scheduler run in its own standard loop.

Conventions are the toolkit's (k-diffusion/EDM): ``x = x0 + sigma * eps`` and a denoiser
``D(x, sigma)`` returns the x0 estimate.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch

#: A Stable-Diffusion-like VP training schedule: sigma_max ~ 14.6, sigma_min ~ 0.03.
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
}

#: Batch 2, RGB, 8x8: small enough that a whole sampling run costs milliseconds.
SAMPLE_SHAPE = (2, 3, 8, 8)


def tiny_unet(seed: int = 0) -> Any:
    """A small random `diffusers.UNet2DModel` (eps prediction), eval mode, float32."""
    from tiny_models import tiny_unet as make

    return make(seed=seed).float().requires_grad_(False)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """``||ours - ref|| / ||ref||`` (Frobenius), computed in float64."""
    ours, ref = ours.double(), ref.double()
    return float((ours - ref).norm() / ref.norm())


def append_dims(v: Any, ndim: int) -> Any:
    """A ``[B]`` tensor viewed as ``[B, 1, ..., 1]``; floats and 0-d tensors pass through."""
    if isinstance(v, torch.Tensor) and v.ndim == 1:
        return v.reshape(-1, *([1] * (ndim - 1)))
    return v


class NoiseStream:
    """A sampler's ``noise(sigma, sigma_next)``: standard normal draws from ONE seeded CPU
    generator, in call order, exactly as diffusers' ``randn_tensor(shape, generator=g)``
    draws them. Records every call as ``(sigma, sigma_next)``."""

    def __init__(
        self, seed: int, shape: tuple[int, ...] = SAMPLE_SHAPE, dtype: torch.dtype = torch.float32
    ) -> None:
        self.generator = torch.Generator("cpu").manual_seed(seed)
        self.shape, self.dtype = shape, dtype
        self.calls: list[tuple[float, float]] = []

    def __call__(self, sigma: Any, sigma_next: Any) -> torch.Tensor:
        self.calls.append((float(sigma), float(sigma_next)))
        return torch.randn(self.shape, generator=self.generator, dtype=self.dtype)


def draws_taken(generator: torch.Generator, seed: int, shape: tuple[int, ...], limit: int) -> int:
    """How many ``torch.randn(shape)`` draws `generator` has made since it was seeded `seed`."""
    probe = torch.Generator("cpu").manual_seed(seed)
    state = generator.get_state()
    for k in range(limit + 1):
        if torch.equal(probe.get_state(), state):
            return k
        torch.randn(shape, generator=probe)
    raise AssertionError(f"generator made more than {limit} draws of shape {shape}")


class EpsDenoiser:
    """The sigma-space denoiser of an eps-prediction VP model, as k-diffusion's
    ``DiscreteEpsDDPMDenoiser``: ``c_in = 1 / sqrt(sigma^2 + 1)``, the timestep found by
    interpolating log sigma (`NoiseLevels.sigma_to_t`), ``D = x - sigma * eps``.

    `timestep` can replace ``sigma_to_t`` (e.g. to round it as some diffusers schedulers do).
    """

    def __init__(
        self,
        unet: Any,
        noise_levels: Any,
        timestep: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.unet, self.noise_levels = unet, noise_levels
        self.timestep = timestep

    def __call__(self, x: torch.Tensor, sigma: Any) -> torch.Tensor:
        sigma = float(sigma)
        t = self.noise_levels.sigma_to_t(torch.tensor(sigma, dtype=torch.float64))
        if self.timestep is not None:
            t = self.timestep(t)
        c_in = 1 / math.sqrt(sigma**2 + 1)
        with torch.no_grad():
            eps = self.unet(x * c_in, t.float()).sample
        return x - sigma * eps


@dataclasses.dataclass
class DiffusersRun:
    sample: torch.Tensor  # the final sample
    sigmas: list[float]  # the sigmas it stepped through, ending in 0
    trajectory: list[torch.Tensor]  # in sigma space, after each step
    draws: list[int]  # noise tensors drawn so far, after each step


def schedule_sigmas(scheduler: Any) -> list[float]:
    """The sigmas a scheduler (after ``set_timesteps``) steps through, ending in 0.

    Heun and KDPM2 interleave them (each sigma but the first and last twice): the repeats
    are dropped. DDIM and DDPM keep no sigmas: they are ``sqrt((1 - a) / a)`` at the
    scheduler's timesteps, computed in float32 as diffusers computes ``alphas_cumprod``,
    then 0 (``set_alpha_to_one`` / the last DDPM step).
    """
    if hasattr(scheduler, "sigmas"):
        sigmas = torch.unique_consecutive(torch.as_tensor(scheduler.sigmas).cpu())
    else:
        a = scheduler.alphas_cumprod[scheduler.timesteps.long()].float()
        sigmas = torch.cat([((1 - a) / a) ** 0.5, a.new_zeros(1)])
    return [float(s) for s in sigmas]


def run_diffusers(
    scheduler: Any,
    unet: Any,
    noise0: torch.Tensor,
    steps: int,
    seed: int,
    vp: bool,
    **step_kwargs: Any,
) -> DiffusersRun:
    """The scheduler in its own standard loop, fresh noise from one CPU generator.

    Returns the final sample and, after each completed step between two of the schedule's
    sigmas, the sample in sigma space (`vp`: diffusers holds ``x / sqrt(sigma^2 + 1)``) and
    the number of noise tensors drawn so far. A second-order scheduler that interleaves
    sub-steps completes a step when it is back in its first-order state, or at its end.
    """
    scheduler.set_timesteps(steps)
    generator = torch.Generator("cpu").manual_seed(seed)
    if "generator" in inspect.signature(scheduler.step).parameters:
        step_kwargs = {**step_kwargs, "generator": generator}
    x = noise0 * scheduler.init_noise_sigma
    trajectory: list[torch.Tensor] = []
    draws: list[int] = []
    timesteps = scheduler.timesteps
    with torch.no_grad():
        for j, t in enumerate(timesteps):
            model_in = scheduler.scale_model_input(x, t)
            eps = unet(model_in, t).sample
            x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
            if getattr(scheduler, "state_in_first_order", True) or j == len(timesteps) - 1:
                draws.append(draws_taken(generator, seed, tuple(x.shape), 3 * len(timesteps)))
                trajectory.append(x)
    sigmas = schedule_sigmas(scheduler)
    if vp:
        trajectory = [y * math.sqrt(s**2 + 1) for y, s in zip(trajectory, sigmas[1:])]
    return DiffusersRun(x, sigmas, trajectory, draws)


def gaussian_denoiser(mu: torch.Tensor, s: float, wiggle: float = 0.0) -> Callable[..., Any]:
    """The exact denoiser of data ~ N(mu, s^2 I): ``(s^2 x + sigma^2 mu) / (s^2 + sigma^2)``,
    plus, when `wiggle` is non-zero, a smooth bounded nonlinearity
    ``wiggle * sigma / (1 + sigma^2) * tanh(x)`` so that a test is not trivially linear.
    `sigma` may be a float, a 0-d tensor or a ``[B]`` tensor."""

    def denoise(x: torch.Tensor, sigma: Any) -> torch.Tensor:
        sigma = append_dims(sigma, x.ndim)
        out = (s**2 * x + sigma**2 * mu) / (s**2 + sigma**2)
        if wiggle:
            out = out + wiggle * sigma / (1 + sigma**2) * torch.tanh(x)
        return out

    return denoise


def gaussian_ode_solution(
    x: torch.Tensor, mu: torch.Tensor, s: float, sigma_from: float, sigma_to: float = 0.0
) -> torch.Tensor:
    """The probability-flow ODE's exact solution for data ~ N(mu, s^2 I): ``x - mu`` scales
    with ``sqrt(s^2 + sigma^2)``."""
    return mu + (x - mu) * math.sqrt((s**2 + sigma_to**2) / (s**2 + sigma_from**2))


def sample_requests(seeds: Any, conditions: list[dict[str, str]] | None = None) -> list[Any]:
    """One `SampleRequest` per seed (sample k conditioned on ``conditions[k]``, if given),
    for `toolkit.sampling.engine.sample_images`."""
    from toolkit import SampleRequest

    seeds = list(seeds)
    conditions = conditions or [{} for _ in seeds]
    return [SampleRequest(index=k, seed=s, conditions=c)
            for k, (s, c) in enumerate(zip(seeds, conditions))]  # fmt: skip
