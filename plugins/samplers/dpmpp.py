"""DPM-Solver++ samplers (Lu et al. 2022) as k-diffusion computes them.

Time is ``lambda = -log(sigma)`` and the model is used as a data (x0) predictor. The exact
solution of the linear part gives ``x' = (sigma'/sigma) x - expm1(-h) D`` for a step of
size ``h`` in lambda; the variants differ in how they estimate ``D`` and in the noise they
inject (the SDE variants).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

from plugins.samplers.updates import (
    ancestral_step,
    check_noise_options,
    lam,
    report,
    sigma_list,
    to_d,
)
from toolkit import OptionError

if TYPE_CHECKING:
    import torch

    from toolkit import Denoiser, NoiseSource, StepCallback


def _first_order(x: torch.Tensor, sigma: float, sigma_next: float, denoised: Any) -> Any:
    """The exact step of the linear ODE with the data prediction held constant (DDIM)."""
    if sigma_next == 0:
        return denoised  # the limit h -> inf
    h = lam(sigma_next) - lam(sigma)
    return (sigma_next / sigma) * x - math.expm1(-h) * denoised


class DPMPP2SAncestral:
    """DPM-Solver++(2S), single-step, with ancestral noise."""

    name = "dpmpp_2s_ancestral"

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0) -> None:
        check_noise_options(self.name, eta, s_noise)
        self.eta, self.s_noise = eta, s_noise

    def __call__(
        self,
        denoise: Denoiser,
        x: torch.Tensor,
        sigmas: Any,
        *,
        noise: NoiseSource,
        callback: StepCallback | None = None,
    ) -> torch.Tensor:
        sigmas = sigma_list(sigmas)
        for i in range(len(sigmas) - 1):
            sigma = sigmas[i]
            denoised = denoise(x, sigma)
            sigma_down, sigma_up = ancestral_step(sigma, sigmas[i + 1], self.eta)
            if sigma_down == 0:
                x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
            else:
                sigma_mid = math.exp(-(lam(sigma) + (lam(sigma_down) - lam(sigma)) / 2))
                x_2 = _first_order(x, sigma, sigma_mid, denoised)
                x = _first_order(x, sigma, sigma_down, denoise(x_2, sigma_mid))
            if sigmas[i + 1] > 0 and sigma_up > 0:
                x = x + noise(sigma, sigmas[i + 1]) * self.s_noise * sigma_up
            report(callback, i, x, sigma, sigma, denoised)
        return x


class DPMPPSDE:
    """DPM-Solver++ (stochastic), two model evaluations per step; `r` places the midpoint.

    k-diffusion draws this sampler's noise from a Brownian tree by default; here it comes
    from the run's per-sample noise source like every other sampler's.
    """

    name = "dpmpp_sde"

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5) -> None:
        check_noise_options(self.name, eta, s_noise)
        if not 0 < r < 1:
            raise OptionError("dpmpp_sde: r must be in (0, 1)")
        self.eta, self.s_noise, self.r = eta, s_noise, r

    def __call__(
        self,
        denoise: Denoiser,
        x: torch.Tensor,
        sigmas: Any,
        *,
        noise: NoiseSource,
        callback: StepCallback | None = None,
    ) -> torch.Tensor:
        sigmas = sigma_list(sigmas)
        fac = 1 / (2 * self.r)
        for i in range(len(sigmas) - 1):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            denoised = denoise(x, sigma)
            if sigma_next == 0:
                x = x + to_d(x, sigma, denoised) * (sigma_next - sigma)
            else:
                sigma_s = math.exp(-(lam(sigma) + (lam(sigma_next) - lam(sigma)) * self.r))
                # step 1: to the intermediate level, ancestrally
                sd, su = ancestral_step(sigma, sigma_s, self.eta)
                x_2 = _first_order(x, sigma, sd, denoised)
                if su > 0:
                    x_2 = x_2 + noise(sigma, sigma_s) * self.s_noise * su
                denoised_2 = denoise(x_2, sigma_s)
                # step 2: the full step with the blended estimate
                sd, su = ancestral_step(sigma, sigma_next, self.eta)
                denoised_d = (1 - fac) * denoised + fac * denoised_2
                x = _first_order(x, sigma, sd, denoised_d)
                if su > 0:
                    x = x + noise(sigma, sigma_next) * self.s_noise * su
            report(callback, i, x, sigma, sigma, denoised)
        return x


class DPMPP2M:
    """DPM-Solver++(2M): second order from the previous step's estimate, deterministic."""

    name = "dpmpp_2m"

    def __call__(
        self,
        denoise: Denoiser,
        x: torch.Tensor,
        sigmas: Any,
        *,
        noise: NoiseSource,
        callback: StepCallback | None = None,
    ) -> torch.Tensor:
        sigmas = sigma_list(sigmas)
        old_denoised = None
        for i in range(len(sigmas) - 1):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            denoised = denoise(x, sigma)
            if old_denoised is None or sigma_next == 0:
                x = _first_order(x, sigma, sigma_next, denoised)
            else:
                h = lam(sigma_next) - lam(sigma)
                r = (lam(sigma) - lam(sigmas[i - 1])) / h
                denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
                x = _first_order(x, sigma, sigma_next, denoised_d)
            old_denoised = denoised
            report(callback, i, x, sigma, sigma, denoised)
        return x


class DPMPP2MSDE:
    """DPM-Solver++(2M) SDE; `solver_type` picks the midpoint or Heun correction."""

    name = "dpmpp_2m_sde"

    def __init__(
        self,
        eta: float = 1.0,
        s_noise: float = 1.0,
        solver_type: Literal["midpoint", "heun"] = "midpoint",
    ) -> None:
        check_noise_options(self.name, eta, s_noise)
        self.eta, self.s_noise, self.solver_type = eta, s_noise, solver_type

    def __call__(
        self,
        denoise: Denoiser,
        x: torch.Tensor,
        sigmas: Any,
        *,
        noise: NoiseSource,
        callback: StepCallback | None = None,
    ) -> torch.Tensor:
        sigmas = sigma_list(sigmas)
        old_denoised, h_last = None, None
        for i in range(len(sigmas) - 1):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            denoised = denoise(x, sigma)
            h = None
            if sigma_next == 0:
                x = denoised
            else:
                h = lam(sigma_next) - lam(sigma)
                eta_h = self.eta * h
                decay = -math.expm1(-h - eta_h)
                x = (sigma_next / sigma) * math.exp(-eta_h) * x + decay * denoised
                if old_denoised is not None:
                    r = h_last / h
                    if self.solver_type == "heun":
                        coeff = (decay / (-h - eta_h) + 1) * (1 / r)
                    else:
                        coeff = 0.5 * decay * (1 / r)
                    x = x + coeff * (denoised - old_denoised)
                if self.eta:
                    scale = sigma_next * math.sqrt(-math.expm1(-2 * eta_h)) * self.s_noise
                    x = x + noise(sigma, sigma_next) * scale
            old_denoised, h_last = denoised, h
            report(callback, i, x, sigma, sigma, denoised)
        return x


class DPMPP2MSDEHeun(DPMPP2MSDE):
    """ComfyUI's ``dpmpp_2m_sde_heun``: ``dpmpp_2m_sde`` with ``solver_type=heun``."""

    name = "dpmpp_2m_sde_heun"

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0) -> None:
        super().__init__(eta, s_noise, solver_type="heun")


class DPMPP3MSDE:
    """DPM-Solver++(3M) SDE: third order from the two previous estimates."""

    name = "dpmpp_3m_sde"

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0) -> None:
        check_noise_options(self.name, eta, s_noise)
        self.eta, self.s_noise = eta, s_noise

    def __call__(
        self,
        denoise: Denoiser,
        x: torch.Tensor,
        sigmas: Any,
        *,
        noise: NoiseSource,
        callback: StepCallback | None = None,
    ) -> torch.Tensor:
        sigmas = sigma_list(sigmas)
        denoised_1 = denoised_2 = None
        h_1 = h_2 = None
        for i in range(len(sigmas) - 1):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            denoised = denoise(x, sigma)
            h = None
            if sigma_next == 0:
                x = denoised
            else:
                h = lam(sigma_next) - lam(sigma)
                h_eta = h * (self.eta + 1)
                x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
                phi_2 = math.expm1(-h_eta) / h_eta + 1
                if h_2 is not None:
                    r0, r1 = h_1 / h, h_2 / h
                    d1_0 = (denoised - denoised_1) / r0
                    d1_1 = (denoised_1 - denoised_2) / r1
                    d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                    d2 = (d1_0 - d1_1) / (r0 + r1)
                    phi_3 = phi_2 / h_eta - 0.5
                    x = x + phi_2 * d1 - phi_3 * d2
                elif h_1 is not None:
                    x = x + phi_2 * (denoised - denoised_1) / (h_1 / h)
                if self.eta:
                    scale = sigma_next * math.sqrt(-math.expm1(-2 * h * self.eta)) * self.s_noise
                    x = x + noise(sigma, sigma_next) * scale
            denoised_1, denoised_2 = denoised, denoised_1
            h_1, h_2 = h, h_1
            report(callback, i, x, sigma, sigma, denoised)
        return x
