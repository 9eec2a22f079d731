"""DPM-Solver (Lu et al. 2022, "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic
Model Sampling in Around 10 Steps", arXiv:2206.00927) as k-diffusion's ``DPMSolver``
computes it (crowsonkb/k-diffusion ``k_diffusion/sampling.py``; ComfyUI ships the same
class): ``dpm_fast`` (``sample_dpm_fast``, fixed steps, orders 3, 3, ..., then 2 and 1 or
the remainder) and ``dpm_adaptive`` (``sample_dpm_adaptive``, DPM-Solver-12/23 with a PID
step-size controller).

Time is ``t = lambda = -log sigma`` and the model is used as a noise predictor,
``eps = (x - D(x, sigma)) / sigma`` (k-diffusion's ``DPMSolver.eps``). k-diffusion takes a
range ``(sigma_min, sigma_max)`` rather than a schedule; these samplers read it from the
schedule as ComfyUI's ``comfy/samplers.py`` does: ``sigma_max = sigmas[0]``, ``sigma_min``
the last non-zero sigma. Like ComfyUI's, they end at ``sigma_min``, with no final step to
sigma 0: the result keeps ``sigma_min``'s noise (0.03 on a Stable-Diffusion-like VP
schedule, 0.002 on EDM's). On a flow model ComfyUI runs these formulas on its own
parameterization (its sigma is the flow time ``t``); we run them in sigma space, where they
are DPM-Solver's.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from plugins.samplers.updates import ancestral_step, check_noise_options, lam, report, sigma_list
from toolkit import OptionError

if TYPE_CHECKING:
    import torch

    from toolkit import Denoiser, NoiseSource, StepCallback


def _sigma(t: float) -> float:
    return math.exp(-t)


def sigma_range(sigmas: Any) -> tuple[list[float], float, float]:
    """The checked schedule and the ``(sigma_min, sigma_max)`` that ComfyUI hands
    k-diffusion: the last non-zero sigma and the first."""
    values = sigma_list(sigmas)
    return values, values[-2], values[0]


class _Step:
    """One DPM-Solver step from ``(x, t)`` to ``t_next``, in noise prediction, with the
    model's evaluations cached (k-diffusion's ``eps_cache``): DPM-Solver-12/23 takes a lower-
    and a higher-order solution of the same step from the same evaluations."""

    def __init__(self, denoise: Denoiser, x: torch.Tensor, t: float, t_next: float) -> None:
        self.denoise, self.x, self.t, self.t_next = denoise, x, t, t_next
        self.h = t_next - t
        sigma = _sigma(t)
        self.denoised = denoise(x, sigma)
        self.eps = (x - self.denoised) / sigma
        self._eps_r1: tuple[float, torch.Tensor] | None = None

    def _model_eps(self, x: torch.Tensor, t: float) -> torch.Tensor:
        sigma = _sigma(t)
        return (x - self.denoise(x, sigma)) / sigma

    def eps_r1(self, r1: float) -> torch.Tensor:
        """The model's eps after a first-order step to ``t + r1 h``."""
        if self._eps_r1 is None or self._eps_r1[0] != r1:
            s1 = self.t + r1 * self.h
            u1 = self.x - _sigma(s1) * math.expm1(r1 * self.h) * self.eps
            self._eps_r1 = (r1, self._model_eps(u1, s1))
        return self._eps_r1[1]

    def first(self) -> torch.Tensor:
        """DPM-Solver-1 (the DDIM step)."""
        return self.x - _sigma(self.t_next) * math.expm1(self.h) * self.eps

    def second(self, r1: float = 1 / 2) -> torch.Tensor:
        """DPM-Solver-2 with its intermediate point at ``t + r1 h``."""
        scale = _sigma(self.t_next) * math.expm1(self.h)
        return self.first() - scale / (2 * r1) * (self.eps_r1(r1) - self.eps)

    def third(self, r1: float = 1 / 3, r2: float = 2 / 3) -> torch.Tensor:
        """DPM-Solver-3 with intermediate points at ``t + r1 h`` and ``t + r2 h``."""
        h, eps = self.h, self.eps
        s2 = self.t + r2 * h
        sigma_s2 = _sigma(s2)
        u2 = (self.x - sigma_s2 * math.expm1(r2 * h) * eps
              - sigma_s2 * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1)
              * (self.eps_r1(r1) - eps))  # fmt: skip
        eps_r2 = self._model_eps(u2, s2)
        return self.first() - _sigma(self.t_next) / r2 * (math.expm1(h) / h - 1) * (eps_r2 - eps)


def _ancestral_target(t: float, t_next: float, t_end: float, eta: float) -> tuple[float, float]:
    """Where a step with ``eta > 0`` lands deterministically, and the noise it then adds to
    reach ``t_next`` (k-diffusion: the ancestral ``sigma_down``, not past ``t_end``)."""
    if not eta:
        return t_next, 0.0
    sigma_down, _ = ancestral_step(_sigma(t), _sigma(t_next), eta)
    target = t_end if sigma_down == 0 else min(t_end, lam(sigma_down))
    return target, math.sqrt(max(_sigma(t_next) ** 2 - _sigma(target) ** 2, 0.0))


class DPMFast:
    """DPM-Solver-fast: ``n = len(sigmas) - 1`` model evaluations (ComfyUI's step count,
    the step to sigma 0 included) spent on ``floor(n / 3) + 1`` equal steps in ``lambda``
    from ``sigma_max`` to ``sigma_min``, third order but the last (orders ``3, ..., 3, 2, 1``
    if ``3`` divides ``n``, else ``3, ..., 3, n % 3``); the schedule's other sigmas are not
    used. With ``eta > 0`` each step lands at its ancestral ``sigma_down`` and fresh noise
    takes it back to the step's end. Returns the sample at ``sigma_min`` (see the module).
    A one-step schedule has ``sigma_min = sigma_max``: its step is empty and the sample
    comes back unchanged, as in ComfyUI. The callback reports each of the solver's steps
    (fewer than the schedule's), at the sigma it started from."""

    name = "dpm_fast"

    def __init__(self, eta: float = 0.0, s_noise: float = 1.0) -> None:
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
        values, sigma_min, sigma_max = sigma_range(sigmas)
        nfe = len(values) - 1
        t_start, t_end = lam(sigma_max), lam(sigma_min)
        m = nfe // 3 + 1
        ts = [t_start + (t_end - t_start) * k / m for k in range(m)] + [t_end]
        orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
        for i, order in enumerate(orders):
            t, t_next = ts[i], ts[i + 1]
            target, sigma_up = _ancestral_target(t, t_next, t_end, self.eta)
            step = _Step(denoise, x, t, target)
            x = step.first() if order == 1 else step.second() if order == 2 else step.third()
            if sigma_up > 0:
                x = x + noise(_sigma(t), _sigma(t_next)) * (sigma_up * self.s_noise)
            report(callback, i, x, _sigma(t), _sigma(t), step.denoised)
        return x


class PIDStepSizeController:
    """k-diffusion's PID controller of the step size ``h`` (in ``lambda``) on the inverse
    error, each factor limited by ``1 + atan(f - 1)``; a step is accepted when the factor
    is at least `accept_safety`."""

    def __init__(
        self,
        h: float,
        pcoeff: float,
        icoeff: float,
        dcoeff: float,
        order: float,
        accept_safety: float,
        eps: float = 1e-8,
    ) -> None:
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety, self.eps = accept_safety, eps
        self.errs: list[float] = []

    def propose_step(self, error: float) -> bool:
        if not math.isfinite(error):
            # a sample went to NaN or inf: k-diffusion would reject forever; take the step
            # as proposed and let the result show it
            return True
        inv_error = 1 / (error + self.eps)
        if not self.errs:
            self.errs = [inv_error, inv_error, inv_error]
        self.errs[0] = inv_error
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2] = self.errs[1]
            self.errs[1] = self.errs[0]
        self.h *= factor
        return accept


class DPMAdaptive:
    """DPM-Solver-12 (``order=2``) or -23 (``order=3``) with adaptive steps in ``lambda``
    from ``sigma_max`` to ``sigma_min`` (see the module): each attempt computes a step of
    order ``order - 1`` and one of order `order` from the same ``order`` model evaluations,
    measures their difference against ``max(atol, rtol * max(|x_low|, |x_prev|))`` (RMS over
    the whole batch, as k-diffusion does, so the step sizes are shared by the batch's
    samples and a sample's result depends on the batch it runs in), and a PID controller
    (`pcoeff`, `icoeff`, `dcoeff`; first step `h_init`) accepts it or retries smaller. With
    ``eta > 0`` accepted steps are ancestral, as in `DPMFast`. The schedule's step count is
    ignored (the number of model evaluations is whatever the tolerances take); a one-step
    schedule (``sigma_min = sigma_max``) returns the sample unchanged without evaluating the
    model, as in ComfyUI. The callback reports each accepted step, at the sigma it started
    from."""

    name = "dpm_adaptive"

    def __init__(
        self,
        order: int = 3,
        rtol: float = 0.05,
        atol: float = 0.0078,
        h_init: float = 0.05,
        pcoeff: float = 0.0,
        icoeff: float = 1.0,
        dcoeff: float = 0.0,
        accept_safety: float = 0.81,
        eta: float = 0.0,
        s_noise: float = 1.0,
    ) -> None:
        check_noise_options(self.name, eta, s_noise)
        if order not in (2, 3):
            raise OptionError(f"{self.name}: order must be 2 or 3")
        if not (atol > 0 and rtol >= 0):
            raise OptionError(f"{self.name}: atol must be positive and rtol non-negative")
        if not h_init > 0:
            raise OptionError(f"{self.name}: h_init must be positive")
        if not 0 < accept_safety <= 1:
            raise OptionError(f"{self.name}: accept_safety must be in (0, 1]")
        self.order, self.rtol, self.atol, self.h_init = order, rtol, atol, h_init
        self.pcoeff, self.icoeff, self.dcoeff = pcoeff, icoeff, dcoeff
        self.accept_safety, self.eta, self.s_noise = accept_safety, eta, s_noise

    def __call__(
        self,
        denoise: Denoiser,
        x: torch.Tensor,
        sigmas: Any,
        *,
        noise: NoiseSource,
        callback: StepCallback | None = None,
    ) -> torch.Tensor:
        _, sigma_min, sigma_max = sigma_range(sigmas)
        t_start, t_end = lam(sigma_max), lam(sigma_min)
        pid = PIDStepSizeController(
            self.h_init,
            self.pcoeff,
            self.icoeff,
            self.dcoeff,
            1.5 if self.eta else self.order,
            self.accept_safety,
        )
        s, x_prev, accepted = t_start, x, 0
        while s < t_end - 1e-5:
            t = min(t_end, s + pid.h)
            target, sigma_up = _ancestral_target(s, t, t_end, self.eta)
            step = _Step(denoise, x, s, target)
            if self.order == 2:
                x_low, x_high = step.first(), step.second()
            else:
                x_low, x_high = step.second(r1=1 / 3), step.third()
            delta = x_low.abs().maximum(x_prev.abs()).mul(self.rtol).clamp(min=self.atol)
            error = float(((x_low - x_high) / delta).norm()) / math.sqrt(x.numel())
            if pid.propose_step(error):
                x_prev = x_low
                x = x_high
                if sigma_up > 0:
                    x = x + noise(_sigma(s), _sigma(t)) * (sigma_up * self.s_noise)
                report(callback, accepted, x, _sigma(s), _sigma(s), step.denoised)
                s, accepted = t, accepted + 1
        return x
