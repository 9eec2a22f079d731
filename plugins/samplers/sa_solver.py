"""SA-Solver, the stochastic Adams solver (Xue et al., "SA-Solver: Stochastic Adams Solver
for Fast Sampling of Diffusion Models", NeurIPS 2023, arXiv:2309.05019), data prediction,
as ComfyUI runs it (``sample_sa_solver`` and ``sample_sa_solver_pece`` in
``comfy/k_diffusion/sampling.py``, coefficients in ``comfy/k_diffusion/sa_solver.py``, after
the authors' code).

Time is ``lambda = -log sigma``; ``tau(sigma)`` sets how stochastic the SDE solved is (0:
the probability-flow ODE). A step from ``s`` to ``t`` (``h = lambda_t - lambda_s``) is

    ``x_t = (sigma_t / sigma_s) exp(-tau^2 h) x_s + sum_j b_j D_j
    + sigma_t sqrt(1 - exp(-2 tau^2 h)) z``,

``b_j = c int_s^t exp(c (lambda - lambda_t)) L_j(lambda) dlambda`` with ``c = 1 + tau^2``
and ``L_j`` the Lagrange basis through the lambdas of the estimates ``D_j`` used. Each step
evaluates the model at the predicted sample, then corrects that sample (SA-Corrector,
Adams-Moulton: the same integral over the step just taken, the new estimate included, the
predictor's noise reused), then predicts the next (SA-Predictor, Adams-Bashforth). The
orders ramp up as estimates accumulate and down at the end (predictor at most the steps
left before the last, corrector at most the steps left); the last step lands on the
estimate, uncorrected. ``sa_solver_pece`` evaluates the model again at each corrected
sample (a second model call per step from the second on) and uses that estimate instead.
``simple_order_2`` replaces the order-2 weights by the paper's simpler ones (appendix D).

``tau`` is `eta` while sigma lies between the levels ``percent_to_sigma(sde_start_percent)``
and ``percent_to_sigma(sde_end_percent)`` of the model's training noise (ComfyUI's
``SamplerSASolver``; its plain ``sa_solver`` has 0.2, 0.8 and eta 1), else 0, taken at the
sigma a step goes to. ``percent_to_sigma`` is ComfyUI's: a discrete VP model's level at
timestep ``(1 - p) (T - 1)`` (interpolated in log sigma), a continuous one's log-linear
between its ``sigma_min`` and ``sigma_max``, a flow model's shifted time ``1 - p`` (as
sigma), and for a denoiser without noise levels log-linear over the schedule's range.

diffusers' ``SASolverScheduler`` is the same algorithm with other defaults and conventions
(``predictor_order=2``, ``corrector_order=2``, the simple weights at order 2 always, ``tau``
a function of the timestep a step starts from, one training level short of 0 at the end);
``tests/test_samplers_deis_sa_tcd.py`` checks ours against both. On a flow model ComfyUI's
``lambda = log((1 - t) / t)`` is our ``-log sigma`` and its ``alpha_t`` cancels, so the steps
are the same.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from plugins.samplers.updates import lagrange_integrals, lam, quadrature, report, sigma_list
from toolkit import OptionError

if TYPE_CHECKING:
    import torch

    from toolkit import Denoiser, NoiseSource, StepCallback

#: ComfyUI's ``SamplerSASolver`` bounds
MAX_ORDER = 6
MAX_ETA = 10.0


def adams_coefficients(lambdas: list[float], lambda_s: float, lambda_t: float, tau: float,
                       simple_order_2: bool, corrector: bool) -> list[float]:  # fmt: skip
    """The weights ``b_j`` of the estimates at `lambdas` (oldest first) for the step from
    `lambda_s` to `lambda_t` (ComfyUI's ``compute_stochastic_adams_b_coeffs``, ``alpha_t``
    being 1 in sigma space)."""
    import numpy as np

    c = 1 + tau**2
    h = lambda_t - lambda_s
    if simple_order_2 and len(lambdas) == 2:
        if corrector:
            newest = 0.5 * c * h
            return [-math.expm1(-c * h) - newest, newest]
        older = 0.5 * c * h**2 / (lambdas[0] - lambda_s)
        return [older, -math.expm1(-c * h) - older]
    at, weights = quadrature(lambda_s, lambda_t)
    return lagrange_integrals(lambdas, at, weights * c * np.exp(c * (at - lambda_t)))


def percent_to_sigma(levels: Any, percent: float, sigmas: list[float]) -> float:
    """ComfyUI's ``model_sampling.percent_to_sigma`` for our noise levels (see the module
    docstring): inf at 0 (pure noise), 0 at 1."""
    if percent <= 0:
        return math.inf
    if percent >= 1:
        return 0.0
    if getattr(levels, "is_flow", False):
        t = float(levels.shifted(1 - percent))
        return t / (1 - t)
    if levels is not None and levels.is_discrete:
        return float(levels.t_to_sigma((1 - percent) * (levels.num_timesteps - 1)))
    if levels is None:  # no model: the schedule's range
        low, high = sigmas[-2], sigmas[0]
    else:
        low, high = levels.sigma_min, levels.sigma_max
    return math.exp(math.log(low) + (1 - percent) * (math.log(high) - math.log(low)))


class SASolver:
    """SA-Solver, predictor-corrector (see the module docstring)."""

    name = "sa_solver"
    #: whether the model is evaluated again at each corrected sample
    use_pece = False

    def __init__(
        self,
        eta: float = 1.0,
        sde_start_percent: float = 0.2,
        sde_end_percent: float = 0.8,
        s_noise: float = 1.0,
        predictor_order: int = 3,
        corrector_order: int = 4,
        simple_order_2: bool = False,
    ) -> None:
        if not 0 <= eta <= MAX_ETA or s_noise < 0:
            raise OptionError(f"{self.name}: eta must be in [0, {MAX_ETA:g}], s_noise >= 0")
        if not (0 <= sde_start_percent <= 1 and 0 <= sde_end_percent <= 1):
            raise OptionError(f"{self.name}: sde_start_percent and sde_end_percent must be in "
                              "[0, 1]")  # fmt: skip
        if not 1 <= predictor_order <= MAX_ORDER or not 0 <= corrector_order <= MAX_ORDER:
            raise OptionError(f"{self.name}: predictor_order must be 1 to {MAX_ORDER}, "
                              f"corrector_order 0 to {MAX_ORDER}")  # fmt: skip
        self.eta, self.s_noise = eta, s_noise
        self.sde_start_percent, self.sde_end_percent = sde_start_percent, sde_end_percent
        self.predictor_order, self.corrector_order = predictor_order, corrector_order
        self.simple_order_2 = simple_order_2

    def tau(self, denoise: Any, sigmas: list[float]) -> Any:
        """``tau(sigma)``: `eta` inside the stochastic window, else 0."""
        levels = getattr(denoise, "noise_levels", None)
        start = percent_to_sigma(levels, self.sde_start_percent, sigmas)
        end = percent_to_sigma(levels, self.sde_end_percent, sigmas)
        return lambda sigma: self.eta if self.eta > 0 and start >= sigma >= end else 0.0

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
        tau_of = self.tau(denoise, sigmas)
        lambdas = [lam(s) if s > 0 else math.inf for s in sigmas]
        keep = max(self.predictor_order, self.corrector_order)
        estimates: list[torch.Tensor] = []  # the oldest first
        x_pred, h, tau, step_noise = x, 0.0, 0.0, None
        for i in range(steps):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            denoised = denoise(x_pred, sigma)
            estimates = [*estimates, denoised][-keep:]
            predictor = min(self.predictor_order, len(estimates), steps - 1 - i)
            corrector = 0
            if i > 0 and (sigma_next > 0 or self.use_pece):
                corrector = min(self.corrector_order, len(estimates), steps - i)
            if corrector == 0:
                x = x_pred
            else:  # redo the step just taken with the new estimate included
                nodes = lambdas[i - corrector + 1 : i + 1]
                b = adams_coefficients(nodes, lambdas[i - 1], lambdas[i], tau,
                                       self.simple_order_2, corrector=True)  # fmt: skip
                x = sigma / sigmas[i - 1] * math.exp(-(tau**2) * h) * x + sum(
                    c * d for c, d in zip(b, estimates[-corrector:]))  # fmt: skip
                if step_noise is not None:
                    x = x + step_noise  # the predictor's noise, as the SDE path is the same
                if self.use_pece:
                    denoised = denoise(x, sigma)
                    estimates[-1] = denoised
            if sigma_next == 0:
                x_pred = denoised
            else:
                tau = tau_of(sigma_next)
                h = lambdas[i + 1] - lambdas[i]
                nodes = lambdas[i - predictor + 1 : i + 1]
                b = adams_coefficients(nodes, lambdas[i], lambdas[i + 1], tau,
                                       self.simple_order_2, corrector=False)  # fmt: skip
                x_pred = sigma_next / sigma * math.exp(-(tau**2) * h) * x + sum(
                    c * d for c, d in zip(b, estimates[-predictor:]))  # fmt: skip
                step_noise = None
                if tau > 0 and self.s_noise > 0:
                    scale = sigma_next * math.sqrt(-math.expm1(-2 * tau**2 * h)) * self.s_noise
                    step_noise = noise(sigma, sigma_next) * scale
                    x_pred = x_pred + step_noise
            report(callback, i, x_pred, sigma, sigma, denoised)
        return x_pred


class SASolverPECE(SASolver):
    """SA-Solver in PECE mode: the model evaluated again at each corrected sample."""

    name = "sa_solver_pece"
    use_pece = True
