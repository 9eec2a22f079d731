"""CFG++ samplers (Chung et al. 2024, "CFG++: Manifold-constrained Classifier Free Guidance
for Diffusion Models"), as ComfyUI's ``comfy/k_diffusion/sampling.py`` computes them:
``euler_cfg_pp``, ``euler_ancestral_cfg_pp``, ``dpmpp_2s_ancestral_cfg_pp`` and
``dpmpp_2m_cfg_pp`` (``res_multistep_cfg_pp`` and ``gradient_estimation_cfg_pp`` are in
`plugins.samplers.res`).

Plain CFG lands each step on the guided estimate and also renoises along the guided
direction; CFG++ renoises along the *unconditional* direction ``(x - uncond) / sigma``, which
keeps the sample on the data manifold at small guidance scales (the paper uses a scale in
[0, 1]; ComfyUI leaves the scale to the user). The unconditional estimate comes from the
same network call, through `toolkit.with_unconditional`; without an ``uncond`` branch (no
guidance, or an interval guidance outside its interval) each sampler is its plain namesake.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

from plugins.samplers.euler import _Ancestral
from plugins.samplers.updates import ancestral_step, lam, report, sigma_list, to_d
from toolkit import with_unconditional

if TYPE_CHECKING:
    import torch

    from toolkit import Denoiser, NoiseSource, StepCallback


class EulerAncestralCFGPP(_Ancestral):
    """Euler to ``sigma_down`` from the guided estimate along the unconditional direction,
    then fresh noise of ``sigma_up`` (ComfyUI ``sample_euler_ancestral_cfg_pp``); the last
    step lands on the guided estimate."""

    name = "euler_ancestral_cfg_pp"

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
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            denoised, uncond = with_unconditional(denoise, x, sigma)
            if sigma_next == 0:
                x = denoised
            else:
                sigma_down, sigma_up = ancestral_step(sigma, sigma_next, self.eta)
                x = denoised + to_d(x, sigma, uncond) * sigma_down
                x = self.add_noise(x, sigma, sigma_next, sigma_up, noise)
            report(callback, i, x, sigma, sigma, denoised)
        return x


class EulerCFGPP(EulerAncestralCFGPP):
    """Euler steps with CFG++ renoising, no fresh noise (ComfyUI ``sample_euler_cfg_pp``:
    its ancestral form at ``eta = 0``)."""

    name = "euler_cfg_pp"

    def __init__(self) -> None:
        super().__init__(eta=0.0, s_noise=0.0)


class DPMPP2SAncestralCFGPP(_Ancestral):
    """DPM-Solver++(2S) with ancestral noise and CFG++ (ComfyUI
    ``sample_dpmpp_2s_ancestral_cfg_pp``): each exponential step starts from
    ``x + (guided - uncond)``, the sample moved by the guidance alone.

    As ComfyUI writes it, the second stage starts from ``x + (guided - uncond)`` with the
    unconditional estimate of the *midpoint* call (its ``temp[0]`` is overwritten by that
    call), not the step's first. That is the default (`stage2_uncond="midpoint"`), so the
    same settings give ComfyUI's images; but it leaves a term ``guided - guided_mid`` even
    without guidance, and the sampler then does not converge to the ODE's solution (0.15
    relative error at 300 steps on a Gaussian, where ``dpmpp_2s_ancestral`` is at 7e-5).
    ``stage2_uncond="first"`` uses the step's first estimate in both stages (as Forge
    does): it reduces to ``dpmpp_2s_ancestral`` without guidance.
    """

    name = "dpmpp_2s_ancestral_cfg_pp"

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0,
                 stage2_uncond: Literal["midpoint", "first"] = "midpoint") -> None:  # fmt: skip
        super().__init__(eta, s_noise)
        self.stage2_uncond = stage2_uncond

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
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            denoised, uncond = with_unconditional(denoise, x, sigma)
            sigma_down, sigma_up = ancestral_step(sigma, sigma_next, self.eta)
            if sigma_down == 0:
                x = denoised + to_d(x, sigma, uncond) * sigma_down
            else:
                h = lam(sigma_down) - lam(sigma)
                sigma_mid = math.exp(-(lam(sigma) + h / 2))
                guided_x = x + (denoised - uncond)
                x_2 = (sigma_mid / sigma) * guided_x - math.expm1(-h / 2) * denoised
                denoised_2, uncond_2 = with_unconditional(denoise, x_2, sigma_mid)
                if self.stage2_uncond == "midpoint":
                    guided_x = x + (denoised - uncond_2)
                x = (sigma_down / sigma) * guided_x - math.expm1(-h) * denoised_2
            x = self.add_noise(x, sigma, sigma_next, sigma_up, noise)
            report(callback, i, x, sigma, sigma, denoised)
        return x


class DPMPP2MCFGPP:
    """DPM-Solver++(2M) with CFG++ (ComfyUI ``sample_dpmpp_2m_cfg_pp``): the exponential
    step decays the unconditional estimate, and the second-order correction is the change
    from the previous step's unconditional estimate to this step's guided one."""

    name = "dpmpp_2m_cfg_pp"

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
        old_uncond = None
        for i in range(len(sigmas) - 1):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            denoised, uncond = with_unconditional(denoise, x, sigma)
            if sigma_next == 0:
                # the limit h -> inf of the update below: exp(-h) -> 0
                x = denoised
            else:
                h = lam(sigma_next) - lam(sigma)
                mix = -math.exp(-h) * uncond
                if old_uncond is not None:
                    r = (lam(sigma) - lam(sigmas[i - 1])) / h
                    mix = mix - math.expm1(-h) * (1 / (2 * r)) * (denoised - old_uncond)
                x = denoised + mix + math.exp(-h) * x
            old_uncond = uncond
            report(callback, i, x, sigma, sigma, denoised)
        return x
