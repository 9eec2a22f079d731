"""The extended reverse-time SDE solver ``er_sde`` (Cui et al., "Elucidating the Solution
Space of Extended Reverse-Time SDE for Diffusion Models", WACV 2025, arXiv:2309.06169;
VP ER-SDE-Solver-3), as ComfyUI writes it (``sample_er_sde`` in
``comfy/k_diffusion/sampling.py``, after the authors' ``er_sde_solver.py``).

The solver's time is ``lambda_t = sigma_t / alpha_t`` (in sigma space: sigma itself). A
noise scaler ``f`` sets how much of the step is stochastic: the first-order step is
``x' = r x + (1 - r) D`` with ``r = f(sigma') / f(sigma)`` and fresh noise
``sqrt(sigma'^2 - sigma^2 r^2)``; the second and third stages add the divided differences
of the estimates times integrals of ``1 / f`` over the step (ComfyUI's 200-point Riemann
sums, here in double precision). ComfyUI computes ``lambda`` and ``alpha`` through its model's
sampling object; for a k-diffusion (EPS/VE-style) model they are ``sigma`` and 1, what is
written here. On a flow model ComfyUI runs in its own parameterization
(``x = (1 - t) x0 + t eps``, ``lambda = t / (1 - t)``, ``alpha = 1 - t``) and we in sigma
space (``sigma = t / (1 - t)``, ``x / (1 - t)``); its lambda is then our sigma and its
alphas cancel, so the steps are the same. Only the start differs: ComfyUI moves a first
sigma of 1 to ``percent_to_sigma(1e-4)``, the engine takes its exact first step from pure
noise.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from plugins.samplers.updates import report, sigma_list
from toolkit import OptionError

if TYPE_CHECKING:
    import torch

    from toolkit import Denoiser, NoiseSource, StepCallback

#: the points of ComfyUI's Riemann sums over a step
INTEGRATION_POINTS = 200


def default_noise_scaler(x: float) -> float:
    """ComfyUI's ``default_er_sde_noise_scaler``: ``x (exp(x^0.3) + 10)``."""
    return x * (math.exp(x**0.3) + 10.0)


def stage_integrals(lam_s: float, lam_t: float) -> tuple[float, float]:
    """``int 1/f`` and ``int (l - lam_s)/f`` from ``lam_t`` to ``lam_s``, ComfyUI's left
    Riemann sums on 200 points from ``lam_t`` (ascending)."""
    width = (lam_s - lam_t) / INTEGRATION_POINTS
    points = [lam_t + k * width for k in range(INTEGRATION_POINTS)]
    scaled = [default_noise_scaler(p) for p in points]
    s = math.fsum(1 / f for f in scaled) * width
    s_u = math.fsum((p - lam_s) / f for p, f in zip(points, scaled)) * width
    return s, s_u


class ERSDE:
    """ER-SDE-Solver-3 with ComfyUI's default noise scaler: the first step first order,
    the second second order, then third order (`max_stage`: at most this order, 1 to 3);
    `s_noise` scales the fresh noise (0: no noise, but still the SDE solver's drift, not
    an ODE solver's). One model call per step; the last step (to sigma 0) lands on the
    estimate."""

    name = "er_sde"

    def __init__(self, s_noise: float = 1.0, max_stage: int = 3) -> None:
        if s_noise < 0:
            raise OptionError(f"{self.name}: s_noise must be non-negative")
        if max_stage not in (1, 2, 3):
            raise OptionError(f"{self.name}: max_stage must be 1, 2 or 3")
        self.s_noise, self.max_stage = s_noise, max_stage

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
        f = default_noise_scaler
        old_denoised = old_denoised_d = None
        for i in range(len(sigmas) - 1):
            lam_s, lam_t = sigmas[i], sigmas[i + 1]
            denoised = denoise(x, lam_s)
            stage = min(self.max_stage, i + 1)
            if lam_t == 0:
                x = denoised
            else:
                r = f(lam_t) / f(lam_s)
                x = r * x + (1 - r) * denoised
                if stage >= 2:
                    dt = lam_t - lam_s
                    s, s_u = stage_integrals(lam_s, lam_t)
                    denoised_d = (denoised - old_denoised) / (lam_s - sigmas[i - 1])
                    x = x + (dt + s * f(lam_t)) * denoised_d
                    if stage >= 3:
                        # ComfyUI's (and the authors') second divided difference: over
                        # half the span of the last three sigmas
                        denoised_u = (denoised_d - old_denoised_d) / ((lam_s - sigmas[i - 2]) / 2)
                        x = x + (dt**2 / 2 + s_u * f(lam_t)) * denoised_u
                    old_denoised_d = denoised_d
                if self.s_noise > 0:
                    scale = math.sqrt(max(lam_t**2 - lam_s**2 * r**2, 0.0)) * self.s_noise
                    x = x + noise(lam_s, lam_t) * scale
            old_denoised = denoised
            report(callback, i, x, lam_s, lam_s, denoised)
        return x
