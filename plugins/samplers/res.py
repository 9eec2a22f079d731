"""ComfyUI's second-order multistep exponential integrator, ``res_multistep`` and
``res_multistep_ancestral`` (Zhang et al. 2023, "Improved order analysis and design of
exponential integrator for diffusion models sampling", the RES solver; ComfyUI's
``comfy/k_diffusion/sampling.py``), and its gradient-estimation sampler
``gradient_estimation`` (Permenter & Yuan 2024, "Interpreting and improving diffusion
models from an optimization perspective").
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from plugins.samplers.updates import ancestral_step, report, sigma_list, to_d
from toolkit import OptionError

if TYPE_CHECKING:
    import torch

    from toolkit import Denoiser, NoiseSource, StepCallback


def res_weights(h: float, c2: float) -> tuple[float, float]:
    """The RES step's weights of the current and the previous estimate, ``(b1, b2)``:
    ``phi_1(-h) - phi_2(-h) / c2`` and ``phi_2(-h) / c2`` (0 where ``c2`` is 0, as ComfyUI
    maps its NaNs to 0)."""
    phi1 = math.expm1(-h) / -h
    phi2 = (phi1 - 1.0) / -h
    if c2 == 0:
        return 0.0, 0.0
    return phi1 - phi2 / c2, phi2 / c2


class ResMultistep:
    """RES multistep: an Euler step first, then each step to the ancestral ``sigma_down``
    exponential in ``lambda = -log sigma`` with the current and previous clean-image
    estimates; with ``eta > 0`` fresh noise of ``sigma_up`` after each step."""

    name = "res_multistep"
    default_eta = 0.0

    def __init__(self, eta: float | None = None, s_noise: float = 1.0) -> None:
        self.eta = self.default_eta if eta is None else float(eta)
        if self.eta < 0:
            raise OptionError(f"{self.name}: eta must be >= 0")
        self.s_noise = s_noise

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
        old_denoised, old_down = None, 0.0
        for i in range(len(sigmas) - 1):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            denoised = denoise(x, sigma)
            down, up = ancestral_step(sigma, sigma_next, self.eta)
            if down == 0 or old_denoised is None:
                x = x + to_d(x, sigma, denoised) * (down - sigma)
            else:
                # in lambda = -log sigma: this step h, and the previous one's span from its
                # start to where it stepped down to
                h = math.log(sigma) - math.log(down)
                c2 = (math.log(old_down) - math.log(sigmas[i - 1])) / h
                b1, b2 = res_weights(h, c2)
                x = math.exp(-h) * x + h * (b1 * denoised + b2 * old_denoised)
            if up > 0:
                x = x + noise(sigma, sigma_next) * (self.s_noise * up)
            old_denoised, old_down = denoised, down
            report(callback, i, x, sigma, sigma, denoised)
        return x


class ResMultistepAncestral(ResMultistep):
    """RES multistep with fresh noise (``eta=1`` by default)."""

    name = "res_multistep_ancestral"
    default_eta = 1.0


class GradientEstimation:
    """Euler steps plus ``(gamma - 1)`` times the change of the ODE derivative since the
    last step (from the second step on; ``gamma = 2``: the paper's), the last step landing
    on the estimate."""

    name = "gradient_estimation"

    def __init__(self, gamma: float = 2.0) -> None:
        self.gamma = gamma

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
        old_d = None
        for i in range(len(sigmas) - 1):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            denoised = denoise(x, sigma)
            d = to_d(x, sigma, denoised)
            if sigma_next == 0:
                x = denoised
            else:
                dt = sigma_next - sigma
                x = x + d * dt
                if old_d is not None:
                    x = x + (self.gamma - 1) * (d - old_d) * dt
            old_d = d
            report(callback, i, x, sigma, sigma, denoised)
        return x
