"""Restart sampling (Xu et al., "Restart Sampling for Improving Generative Processes",
NeurIPS 2023, arXiv:2306.14878), as the authors wrote it for AUTOMATIC1111's web UI, whose
"Restart" sampler it is (``restart_sampler`` in ``modules/sd_samplers_extra.py``; Forge and
reForge carry it too).

Heun steps (Euler on a step to 0) follow the schedule down; on reaching the level nearest
`restart_min`, the sample is sent back up to the level nearest `restart_max` by adding
fresh noise (``x += sqrt(sigma_max^2 - sigma_min^2) z``) and integrated down again in
`restart_steps` Heun steps on Karras et al.'s spacing between those two levels, `restart_times`
times over; then the schedule continues. The forward noise contracts the errors the ODE
steps accumulated, which is the paper's point.

With `restart_steps` and `restart_times` both None (the default), the web UI's automatic
choice: below 20 steps no restarts (plain ``heun``); from 20, 9 restart steps once; from 36,
a quarter of the steps twice, and the steps spent on restarts come off the main pass, which
is re-spaced on Karras et al.'s schedule (rho 7) between the schedule's first and last
nonzero sigmas, so that a run of `N` steps takes `N` Heun steps in all (whatever the
schedule's own spacing). Given either, restarts are added to the schedule as it is (the
other defaulting to 9 steps, once), as the web UI does with an explicit ``restart_list``.
"""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING, Any

from plugins.samplers.updates import report, sigma_list, to_d
from toolkit import OptionError

if TYPE_CHECKING:
    import torch

    from toolkit import Denoiser, NoiseSource, StepCallback


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> list[float]:
    """k-diffusion's ``get_sigmas_karras(n, sigma_min, sigma_max)`` without its final 0,
    its ends exactly `sigma_max` and `sigma_min` (rounding in ``(s^(1/rho))^rho`` would
    otherwise make a restart's end a hair off the level it returns to)."""
    low, high = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    inner = [(high + k / (n - 1) * (low - high)) ** rho for k in range(1, n - 1)]
    return [sigma_max, *inner, sigma_min] if n > 1 else [sigma_max]


def _nearest(sigmas: list[float], value: float) -> int:
    return min(range(len(sigmas)), key=lambda k: abs(sigmas[k] - value))


class Restart:
    """Restart sampling (see the module docstring)."""

    name = "restart"

    def __init__(
        self,
        restart_steps: int | None = None,
        restart_times: int | None = None,
        restart_min: float = 0.1,
        restart_max: float = 2.0,
        s_noise: float = 1.0,
    ) -> None:
        if restart_steps is not None and restart_steps < 1:
            raise OptionError("restart: restart_steps must be at least 1")
        if restart_times is not None and restart_times < 0:
            raise OptionError("restart: restart_times must be non-negative")
        if not 0 < restart_min < restart_max or s_noise < 0:
            raise OptionError("restart: need 0 < restart_min < restart_max and s_noise >= 0")
        self.restart_steps, self.restart_times = restart_steps, restart_times
        self.restart_min, self.restart_max, self.s_noise = restart_min, restart_max, s_noise

    def plan(self, sigmas: list[float]) -> list[tuple[float, float]]:
        """The ``(sigma, sigma_next)`` of every Heun step, restarts included."""
        steps, times = self.restart_steps, self.restart_times
        if steps is None and times is None:
            total = len(sigmas) - 1
            steps, times = (9, 1) if total < 36 else (total // 4, 2)
            if total < 20:
                times = 0
            else:
                sigmas = [*karras(total - steps * times, sigmas[-2], sigmas[0]), 0.0]
        steps = 9 if steps is None else steps
        times = 1 if times is None else times
        low, high = _nearest(sigmas, self.restart_min), _nearest(sigmas, self.restart_max)
        plan = []
        for i in range(len(sigmas) - 1):
            plan.append((sigmas[i], sigmas[i + 1]))
            if i + 1 == low and high < low:
                segment = karras(steps + 1, sigmas[low], sigmas[high])
                plan.extend(list(itertools.pairwise(segment)) * times)
        return plan

    def __call__(
        self,
        denoise: Denoiser,
        x: torch.Tensor,
        sigmas: Any,
        *,
        noise: NoiseSource,
        callback: StepCallback | None = None,
    ) -> torch.Tensor:
        last = None
        for i, (sigma, sigma_next) in enumerate(self.plan(sigma_list(sigmas))):
            if last is not None and last < sigma:  # a restart: forward noise back up
                x = x + noise(last, sigma) * self.s_noise * math.sqrt(sigma**2 - last**2)
            denoised = denoise(x, sigma)
            d = to_d(x, sigma, denoised)
            if sigma_next == 0:
                x = x + d * (sigma_next - sigma)
            else:
                x_2 = x + d * (sigma_next - sigma)
                d_2 = to_d(x_2, sigma_next, denoise(x_2, sigma_next))
                x = x + (d + d_2) / 2 * (sigma_next - sigma)
            report(callback, i, x, sigma, sigma, denoised)
            last = sigma_next
        return x
