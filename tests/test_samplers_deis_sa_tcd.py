"""``deis``, ``sa_solver``, ``sa_solver_pece`` and ``tcd`` give their references' samples.

diffusers (``DEISMultistepScheduler``, ``SASolverScheduler``, ``TCDScheduler``): the
scheduler runs in its own standard loop on a tiny random UNet, ours on the same UNet as a
sigma-space denoiser from the same starting noise and with the scheduler's own generator
draws as its fresh noise, as in `test_samplers_diffusers`. These schedulers end one training
level short of 0 (sigma_min, about 0.03): their last step goes there, where ours go on to
sigma 0. So ours runs either on the scheduler's sigmas with sigma_min replaced by 0 (every
step but the last compared; the last is checked to be diffusers' first-order step to
sigma_min from our state, where ours lands on the estimate) or on them with a final 0
appended (every step compared; ours then takes one more step to 0).

ComfyUI (``deis`` in tab mode, ``sa_solver``, ``sa_solver_pece``): its loops and coefficient
code restated below as ComfyUI writes them (torch arithmetic), without the progress bar,
callback or ``extra_args``, on the exact denoiser of Gaussian data plus a small
nonlinearity in float64, as `test_samplers_comfyui` does.

Samples must agree to a relative error of 1e-4.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import diffusers
import numpy as np
import pytest
import torch
from sampling_helpers import (
    SAMPLE_SHAPE,
    SCHEDULER_CONFIG,
    EpsDenoiser,
    NoiseStream,
    draws_taken,
    gaussian_denoiser,
    rel_err,
    run_diffusers,
    tiny_unet,
)

import toolkit
from plugins.samplers.deis import DEIS, deis_coefficients
from plugins.samplers.sa_solver import SASolver, SASolverPECE
from plugins.samplers.tcd import TCD
from toolkit.models.noise import FlowLevels

# diffusers' DEIS calls numpy on torch tensors, as does ComfyUI's edm2t (numpy 2 deprecation)
pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning")

TOL = 1e-4
NOISE_SEED = 1
START_SEED = 1234
DATA_STD = 0.5


@pytest.fixture(scope="module")
def unet() -> Any:
    return tiny_unet()


@pytest.fixture(scope="module")
def noise0() -> torch.Tensor:
    return torch.randn(SAMPLE_SHAPE, generator=torch.Generator("cpu").manual_seed(START_SEED))


@pytest.fixture(scope="module")
def levels() -> Any:
    return toolkit.NoiseLevels.from_scheduler_config(SCHEDULER_CONFIG)


@dataclasses.dataclass
class OurRun:
    sample: torch.Tensor
    trajectory: list[torch.Tensor]  # x after each step
    draws: list[int]  # noise tensors drawn so far, after each step


def run_ours(sampler: Any, denoise: Any, noise0: torch.Tensor, sigmas: list[float],
             noise: Any = None) -> OurRun:  # fmt: skip
    """`sampler` from the model's prior at sigmas[0] (`noise0` in VP scale)."""
    noise = NoiseStream(NOISE_SEED) if noise is None else noise
    run = OurRun(noise0, [], [])

    def callback(info: dict[str, Any]) -> None:
        run.trajectory.append(info["x"])
        run.draws.append(len(noise.calls))

    x = noise0 * math.sqrt(sigmas[0] ** 2 + 1)
    run.sample = sampler(denoise, x, sigmas, noise=noise, callback=callback)
    return run


def first_off(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> str | None:
    """The first step where the two trajectories differ by more than TOL, described."""
    assert len(ours) == len(ref)
    for i, (a, b) in enumerate(zip(ours, ref)):
        if not (err := rel_err(a, b)) <= TOL:
            return f"relative error {err:.3g} after step {i}"
    return None


# -- DEIS: diffusers' DEISMultistepScheduler (logrho) ----------------------------------------


@dataclasses.dataclass(frozen=True)
class DeisCase:
    id: str
    steps: int
    config: dict[str, Any]  # DEISMultistepScheduler's
    options: dict[str, Any]  # ours

    @property
    def last_step_first_order(self) -> bool:
        """diffusers lowers the last step's order to 1 below 15 steps (lower_order_final)."""
        order = self.config.get("solver_order", 2)
        lower = self.config.get("lower_order_final", True) and self.steps < 15
        return order == 1 or lower


DEIS_CASES = [
    DeisCase("defaults", 10, {}, {}),
    DeisCase("order1", 10, {"solver_order": 1}, {"order": 1}),
    DeisCase("order3", 10, {"solver_order": 3}, {"order": 3}),
    DeisCase("order3-6-steps", 6, {"solver_order": 3}, {"order": 3}),
    # 15 steps and more: no lower orders at the end, in diffusers nor here
    DeisCase("order3-15-steps", 15, {"solver_order": 3}, {"order": 3}),
    DeisCase("order2-20-steps", 20, {}, {}),
    DeisCase("no-lower-order-final", 10, {"solver_order": 3, "lower_order_final": False},
             {"order": 3, "lower_order_final": False}),
]  # fmt: skip


@pytest.mark.parametrize("case", DEIS_CASES, ids=lambda c: c.id)
def test_deis_matches_diffusers(case: DeisCase, unet: Any, noise0: torch.Tensor,
                                levels: Any) -> None:  # fmt: skip
    scheduler = diffusers.DEISMultistepScheduler(**SCHEDULER_CONFIG, **case.config)
    ref = run_diffusers(scheduler, unet, noise0, case.steps, NOISE_SEED, vp=True)
    n = case.steps
    assert len(ref.sigmas) == n + 1 and ref.sigmas[-1] == pytest.approx(float(levels.sigmas[0]))
    denoise = EpsDenoiser(unet, levels)
    sampler = DEIS(**case.options)
    if case.last_step_first_order:
        ours = run_ours(sampler, denoise, noise0, [*ref.sigmas[:-1], 0.0])
        assert (off := first_off(ours.trajectory[:-1], ref.trajectory[:-1])) is None, off
        # diffusers' last step is DDIM's, from our state to sigma_min; ours lands on the
        # estimate there, ``D``
        x, estimate = ours.trajectory[-2], ours.sample
        ddim = estimate + (x - estimate) * (ref.sigmas[-1] / ref.sigmas[-2])
        assert rel_err(ddim, ref.trajectory[-1]) <= TOL
    else:
        ours = run_ours(sampler, denoise, noise0, [*ref.sigmas, 0.0])
        assert (off := first_off(ours.trajectory[:n], ref.trajectory)) is None, off
    assert ours.draws[-1] == 0


def test_deis_matches_diffusers_on_karras_sigmas(unet: Any, noise0: torch.Tensor,
                                                 levels: Any) -> None:  # fmt: skip
    """On Karras sigmas diffusers rounds the timesteps; ours, given them rounded, match."""
    config = {"solver_order": 3, "use_karras_sigmas": True}
    scheduler = diffusers.DEISMultistepScheduler(**SCHEDULER_CONFIG, **config)
    ref = run_diffusers(scheduler, unet, noise0, 12, NOISE_SEED, vp=True)
    # diffusers' Karras sigmas end with sigma_min twice, its last step (from sigma_min to
    # itself) changing nothing: compared are the 11 steps down to sigma_min
    assert len(ref.sigmas) == 12 and len(ref.trajectory) == 11
    denoise = EpsDenoiser(unet, levels, timestep=torch.round)
    ours = run_ours(DEIS(order=3), denoise, noise0, [*ref.sigmas, 0.0])
    assert (off := first_off(ours.trajectory[:11], ref.trajectory)) is None, off


# -- DEIS tab: ComfyUI's sample_deis, restated -----------------------------------------------
# comfy/k_diffusion/deis.py (from zju-pi's diff-sampler, Apache 2.0) and sample_deis in
# comfy/k_diffusion/sampling.py


def edm2t(edm_steps, epsilon_s=1e-3, sigma_min=0.002, sigma_max=80):
    def vp_sigma_inv(beta_d, beta_min):
        return lambda sigma: ((beta_min**2 + 2 * beta_d * (sigma**2 + 1).log()).sqrt()
                              - beta_min) / beta_d  # fmt: skip

    log_max = np.log(torch.tensor(sigma_max).cpu() ** 2 + 1)
    vp_beta_d = 2 * (np.log(torch.tensor(sigma_min).cpu() ** 2 + 1) / epsilon_s
                     - log_max) / (epsilon_s - 1)  # fmt: skip
    vp_beta_min = log_max - 0.5 * vp_beta_d
    t_steps = vp_sigma_inv(vp_beta_d.clone().detach().cpu(), vp_beta_min.clone().detach().cpu())(
        edm_steps.clone().detach().cpu())  # fmt: skip
    return t_steps, vp_beta_min, vp_beta_d + vp_beta_min


def cal_poly(prev_t, j, taus):
    poly = 1
    for k in range(prev_t.shape[0]):
        if k == j:
            continue
        poly *= (taus - prev_t[k]) / (prev_t[j] - prev_t[k])
    return poly


def t2alpha_fn(beta_0, beta_1, t):
    return torch.exp(-0.5 * t**2 * (beta_1 - beta_0) - t * beta_0)


def cal_intergrand(beta_0, beta_1, taus):
    with torch.inference_mode(mode=False):
        taus = taus.clone()
        beta_0 = beta_0.clone()
        beta_1 = beta_1.clone()
        with torch.enable_grad():
            taus.requires_grad_(True)
            alpha = t2alpha_fn(beta_0, beta_1, taus)
            log_alpha = alpha.log()
            log_alpha.sum().backward()
            d_log_alpha_dtau = taus.grad
    integrand = -0.5 * d_log_alpha_dtau / torch.sqrt(alpha * (1 - alpha))
    return integrand


def get_deis_coeff_list(t_steps, max_order, N=10000, deis_mode="tab"):
    assert deis_mode == "tab"  # the default; 'rhoab' is not restated
    t_steps, beta_0, beta_1 = edm2t(t_steps)
    C = []
    for i, (t_cur, t_next) in enumerate(itertools.pairwise(t_steps)):
        order = min(i + 1, max_order)
        if order == 1:
            C.append([])
        else:
            taus = torch.linspace(t_cur, t_next, N)  # split the interval for integral appximation
            dtau = (t_next - t_cur) / N
            prev_t = t_steps[[i - k for k in range(order)]]
            coeff_temp = []
            integrand = cal_intergrand(beta_0, beta_1, taus)
            for j in range(order):
                poly = cal_poly(prev_t, j, taus)
                coeff_temp.append(torch.sum(integrand * poly) * dtau)
            C.append(coeff_temp)
    return C


@torch.no_grad()
def comfy_deis(model, x, sigmas, max_order=3, deis_mode="tab"):
    x_next = x
    t_steps = sigmas
    coeff_list = get_deis_coeff_list(t_steps, max_order, deis_mode=deis_mode)
    buffer_model = []
    for i in range(len(sigmas) - 1):
        t_cur = sigmas[i]
        t_next = sigmas[i + 1]
        x_cur = x_next
        denoised = model(x_cur, t_cur)
        d_cur = (x_cur - denoised) / t_cur
        order = min(max_order, i + 1)
        if t_next <= 0:
            order = 1
        if order == 1:  # First Euler step.
            x_next = x_cur + (t_next - t_cur) * d_cur
        elif order == 2:  # Use one history point.
            coeff_cur, coeff_prev1 = coeff_list[i]
            x_next = x_cur + coeff_cur * d_cur + coeff_prev1 * buffer_model[-1]
        elif order == 3:  # Use two history points.
            coeff_cur, coeff_prev1, coeff_prev2 = coeff_list[i]
            x_next = (x_cur + coeff_cur * d_cur + coeff_prev1 * buffer_model[-1]
                      + coeff_prev2 * buffer_model[-2])  # fmt: skip
        elif order == 4:  # Use three history points.
            coeff_cur, coeff_prev1, coeff_prev2, coeff_prev3 = coeff_list[i]
            x_next = (x_cur + coeff_cur * d_cur + coeff_prev1 * buffer_model[-1]
                      + coeff_prev2 * buffer_model[-2]
                      + coeff_prev3 * buffer_model[-3])  # fmt: skip
        if len(buffer_model) == max_order - 1:
            for k in range(max_order - 2):
                buffer_model[k] = buffer_model[k + 1]
            buffer_model[-1] = d_cur.detach()
        else:
            buffer_model.append(d_cur.detach())
    return x_next


def gaussian_problem(steps: int, levels: Any) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """The Gaussian denoiser (with `levels` as its noise levels), a float64 start at the
    first sigma of `steps` Karras steps on `levels`, and those sigmas."""
    g = torch.Generator().manual_seed(11)
    mu = torch.randn(SAMPLE_SHAPE, generator=g, dtype=torch.float64) * 0.3
    sigmas = toolkit.schedule("karras")(steps, levels)
    x = torch.randn(SAMPLE_SHAPE, generator=g, dtype=torch.float64) * float(sigmas[0])
    return WithLevels(gaussian_denoiser(mu, DATA_STD, wiggle=0.2), levels), x, sigmas


@dataclasses.dataclass
class WithLevels:
    """A denoiser function that exposes the model's noise levels, as ours do."""

    function: Any
    noise_levels: Any

    def __call__(self, x: torch.Tensor, sigma: Any) -> torch.Tensor:
        return self.function(x, sigma)


@pytest.mark.parametrize("max_order", [2, 3, 4])
@pytest.mark.parametrize("steps", [8, 20])
def test_deis_tab_matches_comfyui(max_order: int, steps: int, levels: Any) -> None:
    """Measured 1.4e-5 at 8 steps, 2e-6 at 20: ComfyUI's integrals are 10,000-point Riemann
    sums in float32, ours Gauss-Legendre in float64."""
    denoise, x, sigmas = gaussian_problem(steps, levels)
    ref = comfy_deis(denoise, x, sigmas, max_order=max_order)
    ours = DEIS(order=max_order, mode="tab")(denoise, x, sigmas, noise=None)
    assert rel_err(ours, ref) <= TOL


def test_deis_order_1_is_euler(levels: Any) -> None:
    """(ComfyUI's loop fails at ``max_order=1``: its history buffer is never filled.)"""
    denoise, x, sigmas = gaussian_problem(8, levels)
    euler = toolkit.sampler("euler")(denoise, x, sigmas, noise=None)
    for mode in ("logrho", "tab"):
        assert rel_err(DEIS(order=1, mode=mode)(denoise, x, sigmas, noise=None), euler) <= 1e-12


def test_deis_tab_defaults_are_comfyuis(levels: Any) -> None:
    """``mode=tab`` alone is ComfyUI's ``deis``: order 3, no lower orders at the end."""
    denoise, x, sigmas = gaussian_problem(10, levels)
    ref = comfy_deis(denoise, x, sigmas)
    assert rel_err(DEIS(mode="tab")(denoise, x, sigmas, noise=None), ref) <= TOL
    # the tab and logrho integrals are the same at first order, and differ beyond
    logrho = DEIS(order=3, lower_order_final=False)(denoise, x, sigmas, noise=None)
    assert rel_err(logrho, ref) > 10 * TOL


def test_deis_weights_integrate_the_derivative_exactly() -> None:
    """The weights of each mode sum to the step (a constant derivative is integrated
    exactly) and reproduce a polynomial in the mode's time exactly."""
    history, sigma_next = [3.0, 4.5, 7.0], 2.0
    for mode in ("logrho", "tab"):
        assert sum(deis_coefficients(mode, history, sigma_next)) == pytest.approx(-1.0, 1e-12)
    # eps = log(sigma) is linear in logrho's time: int_3^2 log s ds, exactly
    weights = deis_coefficients("logrho", history[:2], sigma_next)
    exact = (2 * math.log(2) - 2) - (3 * math.log(3) - 3)
    assert sum(w * math.log(h) for w, h in zip(weights, history)) == pytest.approx(exact, 1e-12)


# -- SA-Solver: diffusers' SASolverScheduler --------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SACase:
    id: str
    tau: float  # diffusers' tau_func, constant
    predictor_order: int
    corrector_order: int
    steps: int = 12


SA_CASES = [
    SACase("ode-p2-c2", 0.0, 2, 2),
    SACase("sde-p2-c2", 1.0, 2, 2),
    SACase("sde-p3-c2", 1.0, 3, 2),
    SACase("sde-p3-c1", 1.0, 3, 1),
    SACase("sde-tau0.6-p4-c2", 0.6, 4, 2, steps=15),
    SACase("ode-p1-c1", 0.0, 1, 1),
]


@pytest.mark.parametrize("case", SA_CASES, ids=lambda c: c.id)
def test_sa_solver_matches_diffusers(case: SACase, unet: Any, noise0: torch.Tensor,
                                     levels: Any) -> None:  # fmt: skip
    """diffusers' SA-Solver is ours with the order-2 weights always simple, ``tau`` the
    same at every step (diffusers takes it at the timestep a step starts from, ComfyUI at
    the sigma it goes to: a constant is both), and its schedule's end: ours on diffusers'
    sigmas plus a last step to 0 is diffusers' step for step, its corrector order up to 2
    (from 3 on diffusers corrects the last steps at one order more than ComfyUI: at
    ``corrector_order=4``, 4e-4 apart from the step before the last)."""
    scheduler = diffusers.SASolverScheduler(
        **SCHEDULER_CONFIG, predictor_order=case.predictor_order,
        corrector_order=case.corrector_order, tau_func=lambda t: case.tau,
    )  # fmt: skip
    ref = run_diffusers(scheduler, unet, noise0, case.steps, NOISE_SEED, vp=True)
    assert ref.draws == list(range(1, case.steps + 1))  # one per step, used or not
    sampler = SASolver(eta=case.tau, sde_start_percent=0.0, sde_end_percent=1.0,
                       predictor_order=case.predictor_order,
                       corrector_order=case.corrector_order, simple_order_2=True)  # fmt: skip
    ours = run_ours(sampler, EpsDenoiser(unet, levels), noise0, [*ref.sigmas, 0.0])
    n = case.steps
    assert (off := first_off(ours.trajectory[:n], ref.trajectory)) is None, off
    # ours draws the same noise, only where it is used: every step but the last to 0
    assert ours.draws == ([*range(1, n + 1), n] if case.tau else [0] * (n + 1))


# -- SA-Solver: ComfyUI's sample_sa_solver, restated -----------------------------------------
# comfy/k_diffusion/sa_solver.py and sample_sa_solver in comfy/k_diffusion/sampling.py, for a
# VP (EPS) model: sigma_to_half_log_snr is -log(sigma), offset_first_sigma_for_snr leaves the
# sigmas as they are; the model's percent_to_sigma is ModelSamplingDiscrete's.


def compute_exponential_coeffs(s, t, solver_order, tau_t):
    tau_mul = 1 + tau_t**2
    h = t - s
    p = torch.arange(solver_order, dtype=s.dtype, device=s.device)
    product_terms_factored = t**p - s**p * (-tau_mul * h).exp()
    recursive_depth_mat = p.unsqueeze(1) - p.unsqueeze(0)
    log_factorial = (p + 1).lgamma()
    recursive_coeff_mat = log_factorial.unsqueeze(1) - log_factorial.unsqueeze(0)
    if tau_t > 0:
        recursive_coeff_mat = recursive_coeff_mat - (recursive_depth_mat * math.log(tau_mul))
    signs = torch.where(recursive_depth_mat % 2 == 0, 1.0, -1.0)
    recursive_coeff_mat = (recursive_coeff_mat.exp() * signs).tril()
    return recursive_coeff_mat @ product_terms_factored


def compute_simple_stochastic_adams_b_coeffs(sigma_next, curr_lambdas, lambda_s, lambda_t,
                                             tau_t, is_corrector_step=False):  # fmt: skip
    tau_mul = 1 + tau_t**2
    h = lambda_t - lambda_s
    alpha_t = sigma_next * lambda_t.exp()
    if is_corrector_step:
        b_1 = alpha_t * (0.5 * tau_mul * h)
        b_2 = alpha_t * (-h * tau_mul).expm1().neg() - b_1
    else:
        b_2 = alpha_t * (0.5 * tau_mul * h**2) / (curr_lambdas[-2] - lambda_s)
        b_1 = alpha_t * (-h * tau_mul).expm1().neg() - b_2
    return torch.stack([b_2, b_1])


def compute_stochastic_adams_b_coeffs(sigma_next, curr_lambdas, lambda_s, lambda_t, tau_t,
                                      simple_order_2=False, is_corrector_step=False):  # fmt: skip
    num_timesteps = curr_lambdas.shape[0]
    if simple_order_2 and num_timesteps == 2:
        return compute_simple_stochastic_adams_b_coeffs(
            sigma_next, curr_lambdas, lambda_s, lambda_t, tau_t, is_corrector_step
        )
    exp_integral_coeffs = compute_exponential_coeffs(lambda_s, lambda_t, num_timesteps, tau_t)
    vandermonde_matrix_T = torch.vander(curr_lambdas, num_timesteps, increasing=True).T
    lagrange_integrals = torch.linalg.solve(vandermonde_matrix_T, exp_integral_coeffs)
    alpha_t = sigma_next * lambda_t.exp()
    return alpha_t * lagrange_integrals


def get_tau_interval_func(start_sigma, end_sigma, eta=1.0):
    def tau_func(sigma):
        if eta <= 0:
            return 0.0  # ODE
        if isinstance(sigma, torch.Tensor):
            sigma = sigma.item()
        return eta if start_sigma >= sigma >= end_sigma else 0.0

    return tau_func


def percent_to_sigma(levels, percent):
    """ComfyUI's ``ModelSamplingDiscrete.percent_to_sigma`` (its ``sigma(timestep)``
    interpolating the log training sigmas)."""
    if percent <= 0.0:
        return 999999999.9
    if percent >= 1.0:
        return 0.0
    percent = 1.0 - percent
    log_sigmas = levels.sigmas.log()
    t = torch.clamp(torch.tensor(percent * 999.0), min=0, max=(len(log_sigmas) - 1))
    low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
    return ((1 - w) * log_sigmas[low_idx] + w * log_sigmas[high_idx]).exp().item()


@torch.no_grad()
def comfy_sa_solver(model, x, sigmas, tau_func=None, s_noise=1.0, noise_sampler=None,
                    predictor_order=3, corrector_order=4, use_pece=False,
                    simple_order_2=False):  # fmt: skip
    if len(sigmas) <= 1:
        return x
    lambdas = sigmas.log().neg()  # sigma_to_half_log_snr of a VP model
    if tau_func is None:
        # Use default interval for stochastic sampling
        start_sigma = percent_to_sigma(model.noise_levels, 0.2)
        end_sigma = percent_to_sigma(model.noise_levels, 0.8)
        tau_func = get_tau_interval_func(start_sigma, end_sigma, eta=1.0)
    max_used_order = max(predictor_order, corrector_order)
    x_pred = x  # x: current state, x_pred: predicted next state
    h = 0.0
    tau_t = 0.0
    noise = 0.0
    pred_list = []
    # Lower order near the end to improve stability
    lower_order_to_end = sigmas[-1].item() == 0
    for i in range(len(sigmas) - 1):
        # Evaluation
        denoised = model(x_pred, sigmas[i])
        pred_list.append(denoised)
        pred_list = pred_list[-max_used_order:]
        predictor_order_used = min(predictor_order, len(pred_list))
        if i == 0 or (sigmas[i + 1] == 0 and not use_pece):
            corrector_order_used = 0
        else:
            corrector_order_used = min(corrector_order, len(pred_list))
        if lower_order_to_end:
            predictor_order_used = min(predictor_order_used, len(sigmas) - 2 - i)
            corrector_order_used = min(corrector_order_used, len(sigmas) - 1 - i)
        # Corrector
        if corrector_order_used == 0:
            # Update by the predicted state
            x = x_pred
        else:
            curr_lambdas = lambdas[i - corrector_order_used + 1 : i + 1]
            b_coeffs = compute_stochastic_adams_b_coeffs(
                sigmas[i], curr_lambdas, lambdas[i - 1], lambdas[i], tau_t, simple_order_2,
                is_corrector_step=True,
            )  # fmt: skip
            pred_mat = torch.stack(pred_list[-corrector_order_used:], dim=1)  # (B, K, ...)
            corr_res = torch.tensordot(pred_mat, b_coeffs, dims=([1], [0]))  # (B, ...)
            x = sigmas[i] / sigmas[i - 1] * (-(tau_t**2) * h).exp() * x + corr_res
            if tau_t > 0 and s_noise > 0:
                # The noise from the previous predictor step
                x = x + noise
            if use_pece:
                # Evaluate the corrected state
                denoised = model(x, sigmas[i])
                pred_list[-1] = denoised
        # Predictor
        if sigmas[i + 1] == 0:
            # Denoising step
            x_pred = denoised
        else:
            tau_t = tau_func(sigmas[i + 1])
            curr_lambdas = lambdas[i - predictor_order_used + 1 : i + 1]
            b_coeffs = compute_stochastic_adams_b_coeffs(
                sigmas[i + 1], curr_lambdas, lambdas[i], lambdas[i + 1], tau_t, simple_order_2,
                is_corrector_step=False,
            )  # fmt: skip
            pred_mat = torch.stack(pred_list[-predictor_order_used:], dim=1)  # (B, K, ...)
            pred_res = torch.tensordot(pred_mat, b_coeffs, dims=([1], [0]))  # (B, ...)
            h = lambdas[i + 1] - lambdas[i]
            x_pred = sigmas[i + 1] / sigmas[i] * (-(tau_t**2) * h).exp() * x + pred_res
            if tau_t > 0 and s_noise > 0:
                noise = (noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1]
                         * (-2 * tau_t**2 * h).expm1().neg().sqrt() * s_noise)  # fmt: skip
                x_pred = x_pred + noise
    return x_pred


def comfy_sa_solver_pece(model, x, sigmas, **kwargs):
    return comfy_sa_solver(model, x, sigmas, use_pece=True, **kwargs)


COMFY_SA_CASES = [
    ("defaults", {}, {}),
    ("simple-order-2", {"predictor_order": 2, "corrector_order": 2, "simple_order_2": True},
     {"predictor_order": 2, "corrector_order": 2, "simple_order_2": True}),
    ("orders-6-0", {"predictor_order": 6, "corrector_order": 0},
     {"predictor_order": 6, "corrector_order": 0}),
    ("orders-1-6", {"predictor_order": 1, "corrector_order": 6},
     {"predictor_order": 1, "corrector_order": 6}),
    ("window-eta-s_noise", {"eta": 0.7, "sde_start_percent": 0.1, "sde_end_percent": 0.95,
                            "s_noise": 0.8}, "window"),
    ("ode", {"eta": 0.0}, "ode"),
]  # fmt: skip


@pytest.mark.parametrize("pece", [False, True], ids=["sa_solver", "sa_solver_pece"])
@pytest.mark.parametrize("case", COMFY_SA_CASES, ids=lambda c: c[0])
def test_sa_solver_matches_comfyui(case: tuple, pece: bool, levels: Any) -> None:
    _, options, comfy = case
    denoise, x, sigmas = gaussian_problem(14, levels)
    if comfy == "window":  # SamplerSASolver's node: its own window, eta and s_noise
        tau = get_tau_interval_func(percent_to_sigma(levels, 0.1),
                                    percent_to_sigma(levels, 0.95), eta=0.7)  # fmt: skip
        comfy = {"tau_func": tau, "s_noise": 0.8}
    elif comfy == "ode":
        comfy = {"tau_func": get_tau_interval_func(0, 0, eta=0.0)}
    theirs = NoiseStream(NOISE_SEED, dtype=torch.float64)
    reference = comfy_sa_solver_pece if pece else comfy_sa_solver
    ref = reference(denoise, x, sigmas, noise_sampler=theirs, **comfy)
    sampler = (SASolverPECE if pece else SASolver)(**options)
    noise = NoiseStream(NOISE_SEED, dtype=torch.float64)
    ours = sampler(denoise, x, sigmas, noise=noise)
    assert rel_err(ours, ref) <= TOL
    assert noise.calls == theirs.calls
    if comfy.get("tau_func") is None:  # the default window is stochastic on some steps only
        assert 0 < len(noise.calls) < len(sigmas) - 2


def test_the_stochastic_window_is_comfyuis(levels: Any) -> None:
    """ComfyUI's ``percent_to_sigma`` for a discrete VP model, a continuous one, a flow
    model and a denoiser without noise levels (then the schedule's range)."""
    from plugins.samplers.sa_solver import percent_to_sigma as ours

    sigmas = [10.0, 2.0, 0.5, 0.0]
    for p in (0.0, 0.2, 0.5, 0.8, 1.0):
        expected = percent_to_sigma(levels, p)
        expected = math.inf if p == 0 else expected
        assert ours(levels, p, sigmas) == pytest.approx(expected, rel=1e-6)  # float32 t
    continuous = toolkit.NoiseLevels.continuous(0.01, 50.0)
    assert ours(continuous, 0.25, sigmas) == pytest.approx(0.01 * 5000**0.75, rel=1e-12)
    assert ours(None, 0.5, sigmas) == pytest.approx(math.sqrt(0.5 * 10.0), rel=1e-12)
    flow = FlowLevels(shift=3.0)
    t = 3 * 0.7 / (1 + 2 * 0.7)  # ComfyUI's time_snr_shift(3, 1 - 0.3), as our sigma
    assert ours(flow, 0.3, sigmas) == pytest.approx(t / (1 - t), rel=1e-12)


# -- TCD: diffusers' TCDScheduler -------------------------------------------------------------


def run_tcd(unet: Any, noise0: torch.Tensor, steps: int, gamma: float) -> tuple[Any, list, list]:
    """TCDScheduler in its loop: its timesteps, the samples after each step in sigma space
    (the last at timestep 0), and the noise tensors drawn so far after each step."""
    scheduler = diffusers.TCDScheduler(**SCHEDULER_CONFIG)
    scheduler.set_timesteps(steps)
    generator = torch.Generator("cpu").manual_seed(NOISE_SEED)
    a = scheduler.alphas_cumprod
    x, trajectory, draws = noise0, [], []
    timesteps = scheduler.timesteps.tolist()
    with torch.no_grad():
        for j, t in enumerate(timesteps):
            eps = unet(scheduler.scale_model_input(x, t), t).sample
            x = scheduler.step(eps, t, x, eta=gamma, generator=generator).prev_sample
            t_prev = timesteps[j + 1] if j + 1 < steps else 0
            trajectory.append(x / a[t_prev].sqrt())  # x_vp / sqrt(a) = x in sigma space
            draws.append(draws_taken(generator, NOISE_SEED, SAMPLE_SHAPE, steps))
    return timesteps, trajectory, draws


@pytest.mark.parametrize("steps, gamma", [(4, 0.3), (8, 0.3), (4, 0.0), (6, 1.0), (5, 0.75)])
def test_tcd_matches_diffusers(steps: int, gamma: float, unet: Any, noise0: torch.Tensor,
                               levels: Any) -> None:  # fmt: skip
    """On the ``lcm`` schedule (TCDScheduler's timesteps) plus a step to the first training
    level, where diffusers ends (then ours takes one more, to 0)."""
    timesteps, trajectory, draws = run_tcd(unet, noise0, steps, gamma)
    lcm = toolkit.schedule("lcm")(steps, levels)
    torch.testing.assert_close(lcm[:-1], levels.sigmas[timesteps])
    sigmas = [*lcm[:-1].tolist(), float(levels.sigmas[0]), 0.0]
    ours = run_ours(TCD(gamma=gamma), EpsDenoiser(unet, levels), noise0, sigmas)
    assert (off := first_off(ours.trajectory[:steps], trajectory)) is None, off
    assert ours.draws[:steps] == draws


def test_tcd_defaults_and_limits(unet: Any, noise0: torch.Tensor, levels: Any) -> None:
    """``gamma`` defaults to diffusers' 0.3; at 0 TCD is DDIM (on training timesteps)."""
    assert TCD().gamma == 0.3
    sigmas = toolkit.schedule("lcm")(4, levels).tolist()
    denoise = EpsDenoiser(unet, levels)
    deterministic = run_ours(TCD(gamma=0.0), denoise, noise0, sigmas)
    ddim = run_ours(toolkit.sampler("ddim", eta=0.0), denoise, noise0, sigmas)
    assert rel_err(deterministic.sample, ddim.sample) <= 1e-6
    assert deterministic.draws[-1] == 0


def test_tcd_needs_a_discrete_vp_model() -> None:
    sigmas = torch.tensor([10.0, 1.0, 0.0])
    continuous = WithLevels(lambda x, sigma: x, toolkit.NoiseLevels.continuous(0.01, 50.0))
    for denoise in (lambda x, sigma: x, continuous):
        with pytest.raises(toolkit.DtkError, match="needs a discrete-time VP model"):
            TCD()(denoise, torch.zeros(1, 4), sigmas, noise=lambda s, t: None)


# -- options ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: DEIS(order=4), "deis: order must be 1 to 3 with mode=logrho"),
        (lambda: DEIS(order=5, mode="tab"), "deis: order must be 1 to 4 with mode=tab"),
        (lambda: DEIS(mode="rhoab"), "deis: mode must be logrho or tab"),
        (lambda: SASolver(eta=-1), "sa_solver: eta must be in [0, 10]"),
        (lambda: SASolverPECE(predictor_order=7), "sa_solver_pece: predictor_order must be"),
        (lambda: SASolver(sde_end_percent=1.5), "sde_start_percent and sde_end_percent"),
        (lambda: TCD(gamma=1.5), "tcd: gamma must be in [0, 1]"),
    ],
)  # fmt: skip
def test_bad_options_are_one_line(make: Any, message: str) -> None:
    with pytest.raises(toolkit.OptionError) as info:
        make()
    assert message in str(info.value) and "\n" not in str(info.value)


def test_defaults() -> None:
    deis, tab = DEIS(), DEIS(mode="tab")
    assert (deis.mode, deis.order, deis.lower_order_final) == ("logrho", 2, True)
    assert (tab.order, tab.lower_order_final) == (3, False)
    sa = SASolver()
    assert (sa.eta, sa.sde_start_percent, sa.sde_end_percent, sa.s_noise) == (1.0, 0.2, 0.8, 1.0)
    assert (sa.predictor_order, sa.corrector_order, sa.simple_order_2) == (3, 4, False)
    assert (SASolver.use_pece, SASolverPECE.use_pece) == (False, True)
