"""ComfyUI's second-order multistep exponential integrator, ``res_multistep`` and
``res_multistep_ancestral`` (Zhang et al. 2023, "Improved order analysis and design of
exponential integrator for diffusion models sampling", the RES solver; ComfyUI's
``comfy/k_diffusion/sampling.py``), and its gradient-estimation sampler
``gradient_estimation`` (Permenter & Yuan 2024, "Interpreting and improving diffusion
models from an optimization perspective"); each also in its CFG++ form (``_cfg_pp``: see
`plugins.samplers.cfg_pp`), as ComfyUI's ``cfg_pp`` flag computes it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from plugins.samplers.updates import ancestral_step, report, sigma_list, to_d
from toolkit import OptionError, with_unconditional

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


def estimates(denoise: Denoiser, x: torch.Tensor, sigma: float, cfg_pp: bool
              ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(guided, the estimate that sets the step's direction)``: the same tensor unless
    `cfg_pp`, where the direction comes from the unconditional estimate."""
    if cfg_pp:
        return with_unconditional(denoise, x, sigma)
    denoised = denoise(x, sigma)
    return denoised, denoised


class ResMultistep:
    """RES multistep: an Euler step first, then each step to the ancestral ``sigma_down``
    exponential in ``lambda = -log sigma`` with the current and previous clean-image
    estimates; with ``eta > 0`` fresh noise of ``sigma_up`` after each step."""

    name = "res_multistep"
    default_eta = 0.0
    #: CFG++: step from ``x + (guided - uncond)`` with the unconditional estimates in place
    #: of the guided ones (the first step: Euler along the unconditional direction)
    cfg_pp = False

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
            denoised, uncond = estimates(denoise, x, sigma, self.cfg_pp)
            down, up = ancestral_step(sigma, sigma_next, self.eta)
            if down == 0 or old_denoised is None:
                x = denoised + to_d(x, sigma, uncond) * down
            else:
                # in lambda = -log sigma: this step h, and the previous one's span from its
                # start to where it stepped down to
                h = math.log(sigma) - math.log(down)
                c2 = (math.log(old_down) - math.log(sigmas[i - 1])) / h
                b1, b2 = res_weights(h, c2)
                x = math.exp(-h) * (x + (denoised - uncond)) + h * (b1 * uncond + b2 * old_denoised)
            if up > 0:
                x = x + noise(sigma, sigma_next) * (self.s_noise * up)
            old_denoised, old_down = uncond, down
            report(callback, i, x, sigma, sigma, denoised)
        return x


class ResMultistepAncestral(ResMultistep):
    """RES multistep with fresh noise (``eta=1`` by default)."""

    name = "res_multistep_ancestral"
    default_eta = 1.0


class ResMultistepCFGPP(ResMultistep):
    """RES multistep with CFG++ (ComfyUI ``sample_res_multistep_cfg_pp``)."""

    name = "res_multistep_cfg_pp"
    cfg_pp = True


class ResMultistepAncestralCFGPP(ResMultistepAncestral):
    """RES multistep with fresh noise and CFG++ (ComfyUI
    ``sample_res_multistep_ancestral_cfg_pp``)."""

    name = "res_multistep_ancestral_cfg_pp"
    cfg_pp = True


class GradientEstimation:
    """Euler steps plus ``(gamma - 1)`` times the change of the ODE derivative since the
    last step (from the second step on; ``gamma = 2``: the paper's), the last step landing
    on the estimate."""

    name = "gradient_estimation"
    #: CFG++: the derivative from the unconditional estimate, stepping from the guided one
    cfg_pp = False

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
            denoised, uncond = estimates(denoise, x, sigma, self.cfg_pp)
            d = to_d(x, sigma, uncond)
            if sigma_next == 0:
                x = denoised
            else:
                dt = sigma_next - sigma
                x = denoised + d * sigma_next if self.cfg_pp else x + d * dt
                if old_d is not None:
                    x = x + (self.gamma - 1) * (d - old_d) * dt
            old_d = d
            report(callback, i, x, sigma, sigma, denoised)
        return x


class GradientEstimationCFGPP(GradientEstimation):
    """The gradient-estimation sampler with CFG++ (ComfyUI
    ``sample_gradient_estimation_cfg_pp``)."""

    name = "gradient_estimation_cfg_pp"
    cfg_pp = True
