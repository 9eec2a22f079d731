"""First- and second-order ODE samplers and their ancestral variants (k-diffusion).

``euler``, ``heun`` and ``dpm_2`` take Karras et al.'s churn options; ``euler_ancestral``
and ``dpm_2_ancestral`` add fresh noise after each step. ``ddim`` and ``ddpm`` are the
ancestral Euler step with ``eta`` 0 and 1 (see `plugins.samplers.ddim`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from plugins.samplers.updates import (
    Churn,
    ancestral_step,
    check_noise_options,
    churn,
    log_midpoint,
    report,
    sigma_list,
    to_d,
)

if TYPE_CHECKING:
    import torch

    from toolkit import Denoiser, NoiseSource, StepCallback


class Euler(Churn):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, alg. 2 without
    the Heun correction)."""

    name = "euler"

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
        steps = len(sigmas) - 1
        for i in range(steps):
            x, sigma_hat = churn(x, sigmas[i], self.gamma(sigmas[i], steps), noise, self.s_noise)
            denoised = denoise(x, sigma_hat)
            x = x + to_d(x, sigma_hat, denoised) * (sigmas[i + 1] - sigma_hat)
            report(callback, i, x, sigmas[i], sigma_hat, denoised)
        return x


class Heun(Churn):
    """Heun's second-order method (Karras et al. 2022, alg. 2); Euler on the last step."""

    name = "heun"

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
        steps = len(sigmas) - 1
        for i in range(steps):
            x, sigma_hat = churn(x, sigmas[i], self.gamma(sigmas[i], steps), noise, self.s_noise)
            denoised = denoise(x, sigma_hat)
            d = to_d(x, sigma_hat, denoised)
            dt = sigmas[i + 1] - sigma_hat
            if sigmas[i + 1] == 0:
                x = x + d * dt
            else:
                x_2 = x + d * dt
                d_2 = to_d(x_2, sigmas[i + 1], denoise(x_2, sigmas[i + 1]))
                x = x + (d + d_2) / 2 * dt
            report(callback, i, x, sigmas[i], sigma_hat, denoised)
        return x


class HeunPP2(Churn):
    """ComfyUI's Heun++ (``heunpp2``, from Carzit's sd-webui-samplers-scheduler): a third
    evaluation one step further, the three derivatives blended with weights proportional to
    their sigmas over ``3 sigma_0`` (over ``2 sigma_0`` with two, on the step before the
    last); Euler on the last step. Churn options as ``heun``."""

    name = "heunpp2"

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
        steps = len(sigmas) - 1
        for i in range(steps):
            x, sigma_hat = churn(x, sigmas[i], self.gamma(sigmas[i], steps), noise, self.s_noise)
            denoised = denoise(x, sigma_hat)
            d = to_d(x, sigma_hat, denoised)
            dt = sigmas[i + 1] - sigma_hat
            if i + 1 == steps:
                x = x + d * dt
            else:
                x_2 = x + d * dt
                d_2 = to_d(x_2, sigmas[i + 1], denoise(x_2, sigmas[i + 1]))
                if i + 2 == steps:
                    w2 = sigmas[i + 1] / (2 * sigmas[0])
                    x = x + (d * (1 - w2) + d_2 * w2) * dt
                else:
                    x_3 = x_2 + d_2 * (sigmas[i + 2] - sigmas[i + 1])
                    d_3 = to_d(x_3, sigmas[i + 2], denoise(x_3, sigmas[i + 2]))
                    w2, w3 = (sigmas[i + 1] / (3 * sigmas[0]), sigmas[i + 2] / (3 * sigmas[0]))
                    x = x + ((1 - w2 - w3) * d + w2 * d_2 + w3 * d_3) * dt
            report(callback, i, x, sigmas[i], sigma_hat, denoised)
        return x


class DPM2(Churn):
    """DPM-Solver-2 as in k-diffusion: the derivative taken at the log-sigma midpoint."""

    name = "dpm_2"

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
        steps = len(sigmas) - 1
        for i in range(steps):
            x, sigma_hat = churn(x, sigmas[i], self.gamma(sigmas[i], steps), noise, self.s_noise)
            denoised = denoise(x, sigma_hat)
            d = to_d(x, sigma_hat, denoised)
            if sigmas[i + 1] == 0:
                x = x + d * (sigmas[i + 1] - sigma_hat)
            else:
                sigma_mid = log_midpoint(sigma_hat, sigmas[i + 1])
                x_2 = x + d * (sigma_mid - sigma_hat)
                d_2 = to_d(x_2, sigma_mid, denoise(x_2, sigma_mid))
                x = x + d_2 * (sigmas[i + 1] - sigma_hat)
            report(callback, i, x, sigmas[i], sigma_hat, denoised)
        return x


class _Ancestral:
    """Options of the ancestral samplers: `eta` scales the fresh noise (0 = deterministic)."""

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0) -> None:
        check_noise_options(self.name, eta, s_noise)
        self.eta, self.s_noise = eta, s_noise

    def add_noise(
        self, x: torch.Tensor, sigma: float, sigma_next: float, sigma_up: float, noise: NoiseSource
    ) -> torch.Tensor:
        if sigma_next > 0 and sigma_up > 0:
            x = x + noise(sigma, sigma_next) * self.s_noise * sigma_up
        return x


class EulerAncestral(_Ancestral):
    """Euler to ``sigma_down``, then fresh noise up to ``sigma_next`` (k-diffusion)."""

    name = "euler_ancestral"

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
            denoised = denoise(x, sigmas[i])
            sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], self.eta)
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
            x = self.add_noise(x, sigmas[i], sigmas[i + 1], sigma_up, noise)
            report(callback, i, x, sigmas[i], sigmas[i], denoised)
        return x


class DPM2Ancestral(_Ancestral):
    """DPM-Solver-2 to ``sigma_down``, then fresh noise up to ``sigma_next`` (k-diffusion)."""

    name = "dpm_2_ancestral"

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
            d = to_d(x, sigma, denoised)
            if sigma_down == 0:
                x = x + d * (sigma_down - sigma)
            else:
                sigma_mid = log_midpoint(sigma, sigma_down)
                x_2 = x + d * (sigma_mid - sigma)
                d_2 = to_d(x_2, sigma_mid, denoise(x_2, sigma_mid))
                x = x + d_2 * (sigma_down - sigma)
            x = self.add_noise(x, sigma, sigmas[i + 1], sigma_up, noise)
            report(callback, i, x, sigma, sigma, denoised)
        return x
