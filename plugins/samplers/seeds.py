"""SEEDS, the stochastic explicit exponential derivative-free solvers (Gonzalez et al.,
"SEEDS: Exponential SDE Solvers for Fast High-Quality Sampling from Diffusion Models",
NeurIPS 2023, arXiv:2305.14267), in data prediction, as ComfyUI writes them
(``sample_seeds_2``, ``sample_seeds_3`` in ``comfy/k_diffusion/sampling.py``), and ComfyUI's
exponential Heun samplers ``exp_heun_2_x0`` and ``exp_heun_2_x0_sde``, which are
``sample_seeds_2`` with ``r = 1`` and ``solver_type = phi_2``.

Time is ``lambda = -log sigma``. A step of size ``h`` in lambda with noise ``eta`` decays
``x`` by ``(sigma' / sigma) exp(-eta h)`` and weighs the clean-image estimates with
``h_eta phi_k(-h_eta)``, ``h_eta = (1 + eta) h``; with ``eta > 0`` each stage adds fresh
noise so that the step's total is the exact Ornstein-Uhlenbeck increment
``sigma' sqrt(1 - exp(-2 eta h))``, the stages' noises correlated as the process's are.
ComfyUI computes lambda through its model's sampling object (``sigma_to_half_log_snr``,
``half_log_snr_to_sigma``, ``alpha_t = sigma_t exp(lambda_t)``); for a k-diffusion
(EPS/VE-style) model that is ``lambda = -log sigma`` and ``alpha = 1``, what is written
here. On a flow model ComfyUI runs in its own parameterization (``x = (1 - t) x0 + t eps``,
``lambda = log((1 - t) / t)``, ``alpha = 1 - t``) and we in sigma space (``sigma = t / (1 -
t)``, ``x / (1 - t)``); its lambda is then ``-log sigma`` and its alphas cancel, so the
steps are the same. Only the start differs: ComfyUI moves a first sigma of 1 to
``percent_to_sigma(1e-4)``, the engine takes its exact first step from pure noise.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

from plugins.samplers.updates import check_noise_options, lam, report, sigma_list
from toolkit import OptionError

if TYPE_CHECKING:
    import torch

    from toolkit import Denoiser, NoiseSource, StepCallback


def h_phi_1(h: float) -> float:
    """``h phi_1(h) = exp(h) - 1`` (ComfyUI's ``ei_h_phi_1``)."""
    return math.expm1(h)


def h_phi_2(h: float) -> float:
    """``h phi_2(h) = (exp(h) - 1 - h) / h`` (ComfyUI's ``ei_h_phi_2``)."""
    return (math.expm1(h) - h) / h


def _lerp(a: float, b: float, w: float) -> float:
    # torch.lerp's two-sided form: exact at w = 0 and w = 1
    return a + w * (b - a) if w < 0.5 else b - (b - a) * (1 - w)


class _StageNoise:
    """The noise of one SEEDS step, stage by stage: at each stage the noise so far decays
    by ``exp(segment)`` (``segment = -eta`` times the stage's length in lambda) and fresh
    noise of variance ``1 - exp(2 segment)`` joins it; none is drawn for a stage of length
    0 (ComfyUI draws one and multiplies it by 0)."""

    def __init__(self, noise: NoiseSource) -> None:
        self.noise = noise
        self.value: torch.Tensor | None = None

    def advance(self, segment: float, sigma: float, sigma_next: float) -> torch.Tensor:
        if self.value is not None:
            self.value = self.value * math.exp(segment)
        if segment < 0:
            fresh = self.noise(sigma, sigma_next) * math.sqrt(-math.expm1(2 * segment))
            self.value = fresh if self.value is None else self.value + fresh
        assert self.value is not None, "the first stage has positive length"
        return self.value


class Seeds2:
    """SEEDS-2: a first-order stage to ``lambda + r h``, then the step from the two
    estimates, by ``solver_type``: ``phi_1`` (the estimates blended ``1 - 1/(2r) : 1/(2r)``,
    as DPM-Solver++(2S)) or ``phi_2`` (weights ``h phi_1 - h phi_2 / r`` and
    ``h phi_2 / r``). Two model calls per step, one on the last (to sigma 0: the
    estimate)."""

    name = "seeds_2"

    def __init__(
        self,
        eta: float = 1.0,
        s_noise: float = 1.0,
        r: float = 0.5,
        solver_type: Literal["phi_1", "phi_2"] = "phi_1",
    ) -> None:
        check_noise_options(self.name, eta, s_noise)
        if not 0 < r <= 1:
            raise OptionError(f"{self.name}: r must be in (0, 1]")
        if solver_type not in ("phi_1", "phi_2"):
            raise OptionError(f"{self.name}: solver_type must be phi_1 or phi_2")
        self.eta, self.s_noise, self.r, self.solver_type = eta, s_noise, r, solver_type

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
        eta, r, s_noise = self.eta, self.r, self.s_noise
        inject = eta > 0 and s_noise > 0
        for i in range(len(sigmas) - 1):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            denoised = denoise(x, sigma)
            if sigma_next == 0:
                x = denoised
            else:
                lam_s, lam_t = lam(sigma), lam(sigma_next)
                h = lam_t - lam_s
                h_eta = h * (eta + 1)
                sigma_1 = math.exp(-_lerp(lam_s, lam_t, r))
                stage = _StageNoise(noise)
                x_2 = (sigma_1 / sigma * math.exp(-r * h * eta) * x
                       - h_phi_1(-r * h_eta) * denoised)  # fmt: skip
                if inject:
                    x_2 = x_2 + stage.advance(-r * h * eta, sigma, sigma_1) * (sigma_1 * s_noise)
                denoised_2 = denoise(x_2, sigma_1)
                decay = sigma_next / sigma * math.exp(-h * eta)
                if self.solver_type == "phi_1":
                    fac = 1 / (2 * r)
                    x = decay * x - h_phi_1(-h_eta) * (denoised + fac * (denoised_2 - denoised))
                else:
                    b2 = h_phi_2(-h_eta) / r
                    b1 = h_phi_1(-h_eta) - b2
                    x = decay * x - (b1 * denoised + b2 * denoised_2)
                if inject:
                    segment = (r - 1) * h * eta
                    x = x + stage.advance(segment, sigma_1, sigma_next) * (sigma_next * s_noise)
            report(callback, i, x, sigma, sigma, denoised)
        return x


class ExpHeun2X0(Seeds2):
    """ComfyUI's ``exp_heun_2_x0``: deterministic exponential Heun in data prediction and
    lambda, ``seeds_2`` with ``eta = 0``, ``r = 1`` and (by default) ``solver_type =
    phi_2``: a DDIM step to the next sigma, then the step again with the two estimates
    weighted ``h phi_1 - h phi_2`` and ``h phi_2``."""

    name = "exp_heun_2_x0"

    def __init__(self, solver_type: Literal["phi_1", "phi_2"] = "phi_2") -> None:
        super().__init__(eta=0.0, s_noise=0.0, r=1.0, solver_type=solver_type)


class ExpHeun2X0SDE(Seeds2):
    """ComfyUI's ``exp_heun_2_x0_sde``: ``exp_heun_2_x0`` with noise, ``seeds_2`` with
    ``r = 1`` (the first stage's noise is the whole step's)."""

    name = "exp_heun_2_x0_sde"

    def __init__(
        self,
        eta: float = 1.0,
        s_noise: float = 1.0,
        solver_type: Literal["phi_1", "phi_2"] = "phi_2",
    ) -> None:
        super().__init__(eta=eta, s_noise=s_noise, r=1.0, solver_type=solver_type)


class Seeds3:
    """SEEDS-3: first-order stage to ``lambda + r_1 h``, a second-order stage to
    ``lambda + r_2 h`` and the step from the first and third estimates. Three model calls
    per step, one on the last (to sigma 0: the estimate)."""

    name = "seeds_3"

    def __init__(
        self, eta: float = 1.0, s_noise: float = 1.0, r_1: float = 1 / 3, r_2: float = 2 / 3
    ) -> None:
        check_noise_options(self.name, eta, s_noise)
        if not 0 < r_1 < r_2 <= 1:
            raise OptionError(f"{self.name}: r_1 and r_2 must satisfy 0 < r_1 < r_2 <= 1")
        self.eta, self.s_noise, self.r_1, self.r_2 = eta, s_noise, r_1, r_2

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
        eta, r_1, r_2, s_noise = self.eta, self.r_1, self.r_2, self.s_noise
        inject = eta > 0 and s_noise > 0
        for i in range(len(sigmas) - 1):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            denoised = denoise(x, sigma)
            if sigma_next == 0:
                x = denoised
            else:
                lam_s, lam_t = lam(sigma), lam(sigma_next)
                h = lam_t - lam_s
                h_eta = h * (eta + 1)
                sigma_1 = math.exp(-_lerp(lam_s, lam_t, r_1))
                sigma_2 = math.exp(-_lerp(lam_s, lam_t, r_2))
                stage = _StageNoise(noise)
                x_2 = (sigma_1 / sigma * math.exp(-r_1 * h * eta) * x
                       - h_phi_1(-r_1 * h_eta) * denoised)  # fmt: skip
                if inject:
                    x_2 = x_2 + stage.advance(-r_1 * h * eta, sigma, sigma_1) * (sigma_1 * s_noise)
                denoised_2 = denoise(x_2, sigma_1)
                a3_2 = r_2 / r_1 * h_phi_2(-r_2 * h_eta)
                a3_1 = h_phi_1(-r_2 * h_eta) - a3_2
                x_3 = (sigma_2 / sigma * math.exp(-r_2 * h * eta) * x
                       - (a3_1 * denoised + a3_2 * denoised_2))  # fmt: skip
                if inject:
                    segment = (r_1 - r_2) * h * eta
                    x_3 = x_3 + stage.advance(segment, sigma_1, sigma_2) * (sigma_2 * s_noise)
                denoised_3 = denoise(x_3, sigma_2)
                b3 = h_phi_2(-h_eta) / r_2
                b1 = h_phi_1(-h_eta) - b3
                x = sigma_next / sigma * math.exp(-h * eta) * x - (b1 * denoised + b3 * denoised_3)
                if inject:
                    segment = (r_2 - 1) * h * eta
                    x = x + stage.advance(segment, sigma_2, sigma_next) * (sigma_next * s_noise)
            report(callback, i, x, sigma, sigma, denoised)
        return x
