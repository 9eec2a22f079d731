"""Samplers whose reference is k-diffusion's ``DPMSolver`` (``dpm_fast``, ``dpm_adaptive``,
as ComfyUI's ``comfy/samplers.py`` calls them) or ComfyUI's ``comfy/k_diffusion/sampling.py``
(``er_sde``, ``seeds_2``, ``seeds_3``, ``exp_heun_2_x0``, ``exp_heun_2_x0_sde``).

The references restate the loops as their authors write them (torch arithmetic, k-diffusion's
``eps_cache`` and PID controller, ComfyUI's 200-point float32 Riemann sums), without the
progress bar, callback or ``extra_args``. ComfyUI's model-sampling helpers are written out
for a k-diffusion (EPS, non-flow) model: ``lambda = -log sigma``, ``alpha = 1``, no offset of
the first sigma. They run on the exact denoiser of Gaussian data plus a small nonlinearity,
in float64, with the same stream of fresh noise as ours (changes marked "adapted").
"""

from __future__ import annotations

import itertools
import math
from functools import partial

import pytest
import torch
from sampling_helpers import (
    SAMPLE_SHAPE,
    NoiseStream,
    gaussian_denoiser,
    gaussian_ode_solution,
    rel_err,
)

import toolkit
from plugins.samplers.dpm_solver import DPMAdaptive, DPMFast
from plugins.samplers.er_sde import ERSDE
from plugins.samplers.seeds import ExpHeun2X0, ExpHeun2X0SDE, Seeds2, Seeds3

TOL = 1e-4
NOISE_SEED = 7
DATA_STD = 0.5


# -- k-diffusion's DPMSolver, transcribed ------------------------------------------------------


def get_ancestral_step(sigma_from, sigma_to, eta=1.0):
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(
        sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    )
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


class PIDStepSizeController:
    """A PID controller for ODE adaptive step size control."""

    def __init__(self, h, pcoeff, icoeff, dcoeff, order=1, accept_safety=0.81, eps=1e-8):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.eps = eps
        self.errs = []

    def limiter(self, x):
        return 1 + math.atan(x - 1)

    def propose_step(self, error):
        inv_error = 1 / (float(error) + self.eps)
        if not self.errs:
            self.errs = [inv_error, inv_error, inv_error]
        self.errs[0] = inv_error
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = self.limiter(factor)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2] = self.errs[1]
            self.errs[1] = self.errs[0]
        self.h *= factor
        return accept


class DPMSolver:
    """DPM-Solver. See https://arxiv.org/abs/2206.00927."""

    def __init__(self, model):
        self.model = model
        self.nfe = 0

    def t(self, sigma):
        return -sigma.log()

    def sigma(self, t):
        return t.neg().exp()

    def eps(self, eps_cache, key, x, t):
        if key in eps_cache:
            return eps_cache[key], eps_cache
        sigma = self.sigma(t) * x.new_ones([x.shape[0]])
        eps = (x - self.model(x, sigma)) / self.sigma(t)
        self.nfe += 1
        return eps, {key: eps, **eps_cache}

    def dpm_solver_1_step(self, x, t, t_next, eps_cache=None):
        eps_cache = {} if eps_cache is None else eps_cache
        h = t_next - t
        eps, eps_cache = self.eps(eps_cache, "eps", x, t)
        x_1 = x - self.sigma(t_next) * h.expm1() * eps
        return x_1, eps_cache

    def dpm_solver_2_step(self, x, t, t_next, r1=1 / 2, eps_cache=None):
        eps_cache = {} if eps_cache is None else eps_cache
        h = t_next - t
        eps, eps_cache = self.eps(eps_cache, "eps", x, t)
        s1 = t + r1 * h
        u1 = x - self.sigma(s1) * (r1 * h).expm1() * eps
        eps_r1, eps_cache = self.eps(eps_cache, "eps_r1", u1, s1)
        x_2 = (x - self.sigma(t_next) * h.expm1() * eps
               - self.sigma(t_next) / (2 * r1) * h.expm1() * (eps_r1 - eps))  # fmt: skip
        return x_2, eps_cache

    def dpm_solver_3_step(self, x, t, t_next, r1=1 / 3, r2=2 / 3, eps_cache=None):
        eps_cache = {} if eps_cache is None else eps_cache
        h = t_next - t
        eps, eps_cache = self.eps(eps_cache, "eps", x, t)
        s1 = t + r1 * h
        s2 = t + r2 * h
        u1 = x - self.sigma(s1) * (r1 * h).expm1() * eps
        eps_r1, eps_cache = self.eps(eps_cache, "eps_r1", u1, s1)
        u2 = (x - self.sigma(s2) * (r2 * h).expm1() * eps
              - self.sigma(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1)
              * (eps_r1 - eps))  # fmt: skip
        eps_r2, eps_cache = self.eps(eps_cache, "eps_r2", u2, s2)
        x_3 = (x - self.sigma(t_next) * h.expm1() * eps
               - self.sigma(t_next) / r2 * (h.expm1() / h - 1) * (eps_r2 - eps))  # fmt: skip
        return x_3, eps_cache

    def dpm_solver_fast(self, x, t_start, t_end, nfe, eta=0.0, s_noise=1.0, noise_sampler=None):
        if not t_end > t_start and eta:
            raise ValueError("eta must be 0 for reverse sampling")

        m = math.floor(nfe / 3) + 1
        # adapted: in the sigmas' dtype (torch's default, float32, rounds float64 lambdas,
        # and the last step's t_next below t_end makes its su a NaN)
        ts = torch.linspace(t_start, t_end, m + 1, device=x.device, dtype=t_start.dtype)

        orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]

        for i in range(len(orders)):
            eps_cache = {}
            t, t_next = ts[i], ts[i + 1]
            if eta:
                sd, su = get_ancestral_step(self.sigma(t), self.sigma(t_next), eta)
                t_next_ = torch.minimum(t_end, self.t(sd))
                su = (self.sigma(t_next) ** 2 - self.sigma(t_next_) ** 2) ** 0.5
            else:
                t_next_, su = t_next, 0.0

            # (k-diffusion reports x - sigma * eps to its callback)
            _eps, eps_cache = self.eps(eps_cache, "eps", x, t)

            if orders[i] == 1:
                x, eps_cache = self.dpm_solver_1_step(x, t, t_next_, eps_cache=eps_cache)
            elif orders[i] == 2:
                x, eps_cache = self.dpm_solver_2_step(x, t, t_next_, eps_cache=eps_cache)
            else:
                x, eps_cache = self.dpm_solver_3_step(x, t, t_next_, eps_cache=eps_cache)

            x = x + su * s_noise * noise_sampler(self.sigma(t), self.sigma(t_next))

        return x

    def dpm_solver_adaptive(self, x, t_start, t_end, order=3, rtol=0.05, atol=0.0078,
                            h_init=0.05, pcoeff=0.0, icoeff=1.0, dcoeff=0.0,
                            accept_safety=0.81, eta=0.0, s_noise=1.0,
                            noise_sampler=None):  # fmt: skip
        if order not in {2, 3}:
            raise ValueError("order should be 2 or 3")
        forward = t_end > t_start
        if not forward and eta:
            raise ValueError("eta must be 0 for reverse sampling")
        h_init = abs(h_init) * (1 if forward else -1)
        atol = torch.tensor(atol)
        rtol = torch.tensor(rtol)
        s = t_start
        x_prev = x
        accept = True
        pid = PIDStepSizeController(h_init, pcoeff, icoeff, dcoeff, 1.5 if eta else order,
                                    accept_safety)  # fmt: skip
        info = {"steps": 0, "nfe": 0, "n_accept": 0, "n_reject": 0}

        while s < t_end - 1e-5 if forward else s > t_end + 1e-5:
            eps_cache = {}
            t = torch.minimum(t_end, s + pid.h) if forward else torch.maximum(t_end, s + pid.h)
            if eta:
                sd, su = get_ancestral_step(self.sigma(s), self.sigma(t), eta)
                t_ = torch.minimum(t_end, self.t(sd))
                su = (self.sigma(t) ** 2 - self.sigma(t_) ** 2) ** 0.5
            else:
                t_, su = t, 0.0

            _eps, eps_cache = self.eps(eps_cache, "eps", x, s)

            if order == 2:
                x_low, eps_cache = self.dpm_solver_1_step(x, s, t_, eps_cache=eps_cache)
                x_high, eps_cache = self.dpm_solver_2_step(x, s, t_, eps_cache=eps_cache)
            else:
                x_low, eps_cache = self.dpm_solver_2_step(x, s, t_, r1=1 / 3, eps_cache=eps_cache)
                x_high, eps_cache = self.dpm_solver_3_step(x, s, t_, eps_cache=eps_cache)
            delta = torch.maximum(atol, rtol * torch.maximum(x_low.abs(), x_prev.abs()))
            error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
            accept = pid.propose_step(error)
            if accept:
                x_prev = x_low
                x = x_high + su * s_noise * noise_sampler(self.sigma(s), self.sigma(t))
                s = t
                info["n_accept"] += 1
            else:
                info["n_reject"] += 1
            info["nfe"] += order
            info["steps"] += 1

        return x, info


def sample_dpm_fast(model, x, sigma_min, sigma_max, n, eta=0.0, s_noise=1.0, noise_sampler=None):
    """DPM-Solver-Fast (fixed step size). See https://arxiv.org/abs/2206.00927."""
    if sigma_min <= 0 or sigma_max <= 0:
        raise ValueError("sigma_min and sigma_max must not be 0")
    dpm_solver = DPMSolver(model)
    return dpm_solver.dpm_solver_fast(x, dpm_solver.t(torch.as_tensor(sigma_max)),
                                      dpm_solver.t(torch.as_tensor(sigma_min)), n, eta, s_noise,
                                      noise_sampler)  # fmt: skip


def sample_dpm_adaptive(model, x, sigma_min, sigma_max, order=3, rtol=0.05, atol=0.0078,
                        h_init=0.05, pcoeff=0.0, icoeff=1.0, dcoeff=0.0, accept_safety=0.81,
                        eta=0.0, s_noise=1.0, noise_sampler=None, return_info=False):  # fmt: skip
    """DPM-Solver-12 and 23 (adaptive step size). See https://arxiv.org/abs/2206.00927."""
    if sigma_min <= 0 or sigma_max <= 0:
        raise ValueError("sigma_min and sigma_max must not be 0")
    dpm_solver = DPMSolver(model)
    x, info = dpm_solver.dpm_solver_adaptive(x, dpm_solver.t(torch.as_tensor(sigma_max)),
                                             dpm_solver.t(torch.as_tensor(sigma_min)), order, rtol,
                                             atol, h_init, pcoeff, icoeff, dcoeff, accept_safety,
                                             eta, s_noise, noise_sampler)  # fmt: skip
    if return_info:
        return x, info
    return x


# ComfyUI's comfy/samplers.py: how it hands a schedule to them
def comfy_dpm_fast(model, noise, sigmas, **options):
    if len(sigmas) <= 1:
        return noise
    sigma_min = sigmas[-1]
    if sigma_min == 0:
        sigma_min = sigmas[-2]
    total_steps = len(sigmas) - 1
    return sample_dpm_fast(model, noise, sigma_min, sigmas[0], total_steps, **options)


def comfy_dpm_adaptive(model, noise, sigmas, **extra_options):
    if len(sigmas) <= 1:
        return noise
    sigma_min = sigmas[-1]
    if sigma_min == 0:
        sigma_min = sigmas[-2]
    return sample_dpm_adaptive(model, noise, sigma_min, sigmas[0], **extra_options)


# -- ComfyUI's samplers, transcribed (for an EPS model) ----------------------------------------


def sigma_to_half_log_snr(sigma, model_sampling=None):
    return sigma.log().neg()


def half_log_snr_to_sigma(half_log_snr, model_sampling=None):
    return half_log_snr.neg().exp()


def offset_first_sigma_for_snr(sigmas, model_sampling=None, percent_offset=1e-4):
    return sigmas


def ei_h_phi_1(h):
    return torch.expm1(h)


def ei_h_phi_2(h):
    return (torch.expm1(h) - h) / h


def sample_er_sde(model, x, sigmas, s_noise=1.0, noise_sampler=None, noise_scaler=None,
                  max_stage=3):  # fmt: skip
    """Extended Reverse-Time SDE solver (VP ER-SDE-Solver-3)."""
    s_in = x.new_ones([x.shape[0]])

    def default_er_sde_noise_scaler(x):
        return x * ((x**0.3).exp() + 10.0)

    noise_scaler = default_er_sde_noise_scaler if noise_scaler is None else noise_scaler
    num_integration_points = 200.0
    point_indice = torch.arange(0, num_integration_points, dtype=torch.float32, device=x.device)

    model_sampling = None
    sigmas = offset_first_sigma_for_snr(sigmas, model_sampling)
    half_log_snrs = sigma_to_half_log_snr(sigmas, model_sampling)
    er_lambdas = half_log_snrs.neg().exp()  # er_lambda_t = sigma_t / alpha_t

    old_denoised = None
    old_denoised_d = None

    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        stage_used = min(max_stage, i + 1)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            er_lambda_s, er_lambda_t = er_lambdas[i], er_lambdas[i + 1]
            alpha_s = sigmas[i] / er_lambda_s
            alpha_t = sigmas[i + 1] / er_lambda_t
            r_alpha = alpha_t / alpha_s
            r = noise_scaler(er_lambda_t) / noise_scaler(er_lambda_s)

            # Stage 1 Euler
            x = r_alpha * r * x + alpha_t * (1 - r) * denoised

            if stage_used >= 2:
                dt = er_lambda_t - er_lambda_s
                lambda_step_size = -dt / num_integration_points
                lambda_pos = er_lambda_t + point_indice * lambda_step_size
                scaled_pos = noise_scaler(lambda_pos)

                # Stage 2
                s = torch.sum(1 / scaled_pos) * lambda_step_size
                denoised_d = (denoised - old_denoised) / (er_lambda_s - er_lambdas[i - 1])
                x = x + alpha_t * (dt + s * noise_scaler(er_lambda_t)) * denoised_d

                if stage_used >= 3:
                    # Stage 3
                    s_u = torch.sum((lambda_pos - er_lambda_s) / scaled_pos) * lambda_step_size
                    denoised_u = (denoised_d - old_denoised_d) / (
                        (er_lambda_s - er_lambdas[i - 2]) / 2
                    )
                    x = x + alpha_t * ((dt**2) / 2 + s_u * noise_scaler(er_lambda_t)) * denoised_u
                old_denoised_d = denoised_d

            if s_noise > 0:
                x = x + alpha_t * noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * (
                    er_lambda_t**2 - er_lambda_s**2 * r**2
                ).sqrt().nan_to_num(nan=0.0)
        old_denoised = denoised
    return x


def sample_seeds_2(model, x, sigmas, eta=1.0, s_noise=1.0, noise_sampler=None, r=0.5,
                   solver_type="phi_1"):  # fmt: skip
    """SEEDS-2 - Stochastic Explicit Exponential Derivative-free Solvers (VP Data
    Prediction) stage 2."""
    if solver_type not in {"phi_1", "phi_2"}:
        raise ValueError("solver_type must be 'phi_1' or 'phi_2'")

    s_in = x.new_ones([x.shape[0]])

    model_sampling = None
    inject_noise = eta > 0 and s_noise > 0
    sigma_fn = partial(half_log_snr_to_sigma, model_sampling=model_sampling)
    lambda_fn = partial(sigma_to_half_log_snr, model_sampling=model_sampling)
    sigmas = offset_first_sigma_for_snr(sigmas, model_sampling)

    fac = 1 / (2 * r)

    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)

        if sigmas[i + 1] == 0:
            x = denoised
            continue

        lambda_s, lambda_t = lambda_fn(sigmas[i]), lambda_fn(sigmas[i + 1])
        h = lambda_t - lambda_s
        h_eta = h * (eta + 1)
        lambda_s_1 = torch.lerp(lambda_s, lambda_t, r)
        sigma_s_1 = sigma_fn(lambda_s_1)

        alpha_s_1 = sigma_s_1 * lambda_s_1.exp()
        alpha_t = sigmas[i + 1] * lambda_t.exp()

        # Step 1
        x_2 = (sigma_s_1 / sigmas[i] * (-r * h * eta).exp() * x
               - alpha_s_1 * ei_h_phi_1(-r * h_eta) * denoised)  # fmt: skip
        if inject_noise:
            sde_noise = (-2 * r * h * eta).expm1().neg().sqrt() * noise_sampler(
                sigmas[i], sigma_s_1
            )
            x_2 = x_2 + sde_noise * sigma_s_1 * s_noise
        denoised_2 = model(x_2, sigma_s_1 * s_in)

        # Step 2
        if solver_type == "phi_1":
            denoised_d = torch.lerp(denoised, denoised_2, fac)
            x = (sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x
                 - alpha_t * ei_h_phi_1(-h_eta) * denoised_d)  # fmt: skip
        elif solver_type == "phi_2":
            b2 = ei_h_phi_2(-h_eta) / r
            b1 = ei_h_phi_1(-h_eta) - b2
            x = (sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x
                 - alpha_t * (b1 * denoised + b2 * denoised_2))  # fmt: skip

        if inject_noise:
            segment_factor = (r - 1) * h * eta
            sde_noise = sde_noise * segment_factor.exp()
            sde_noise = sde_noise + segment_factor.mul(2).expm1().neg().sqrt() * noise_sampler(
                sigma_s_1, sigmas[i + 1]
            )
            x = x + sde_noise * sigmas[i + 1] * s_noise
    return x


def sample_exp_heun_2_x0(model, x, sigmas, solver_type="phi_2"):
    """Deterministic exponential Heun second order method in data prediction (x0) and
    logSNR time."""
    return sample_seeds_2(model, x, sigmas, eta=0.0, s_noise=0.0, noise_sampler=None, r=1.0,
                          solver_type=solver_type)  # fmt: skip


def sample_exp_heun_2_x0_sde(model, x, sigmas, eta=1.0, s_noise=1.0, noise_sampler=None,
                             solver_type="phi_2"):  # fmt: skip
    """Stochastic exponential Heun second order method in data prediction (x0) and logSNR
    time."""
    return sample_seeds_2(model, x, sigmas, eta=eta, s_noise=s_noise,
                          noise_sampler=noise_sampler, r=1.0, solver_type=solver_type)  # fmt: skip


def sample_seeds_3(model, x, sigmas, eta=1.0, s_noise=1.0, noise_sampler=None, r_1=1.0 / 3,
                   r_2=2.0 / 3):  # fmt: skip
    """SEEDS-3 - Stochastic Explicit Exponential Derivative-free Solvers (VP Data
    Prediction) stage 3."""
    s_in = x.new_ones([x.shape[0]])

    model_sampling = None
    inject_noise = eta > 0 and s_noise > 0
    sigma_fn = partial(half_log_snr_to_sigma, model_sampling=model_sampling)
    lambda_fn = partial(sigma_to_half_log_snr, model_sampling=model_sampling)
    sigmas = offset_first_sigma_for_snr(sigmas, model_sampling)

    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)

        if sigmas[i + 1] == 0:
            x = denoised
            continue

        lambda_s, lambda_t = lambda_fn(sigmas[i]), lambda_fn(sigmas[i + 1])
        h = lambda_t - lambda_s
        h_eta = h * (eta + 1)
        lambda_s_1 = torch.lerp(lambda_s, lambda_t, r_1)
        lambda_s_2 = torch.lerp(lambda_s, lambda_t, r_2)
        sigma_s_1, sigma_s_2 = sigma_fn(lambda_s_1), sigma_fn(lambda_s_2)

        alpha_s_1 = sigma_s_1 * lambda_s_1.exp()
        alpha_s_2 = sigma_s_2 * lambda_s_2.exp()
        alpha_t = sigmas[i + 1] * lambda_t.exp()

        # Step 1
        x_2 = (sigma_s_1 / sigmas[i] * (-r_1 * h * eta).exp() * x
               - alpha_s_1 * ei_h_phi_1(-r_1 * h_eta) * denoised)  # fmt: skip
        if inject_noise:
            sde_noise = (-2 * r_1 * h * eta).expm1().neg().sqrt() * noise_sampler(
                sigmas[i], sigma_s_1
            )
            x_2 = x_2 + sde_noise * sigma_s_1 * s_noise
        denoised_2 = model(x_2, sigma_s_1 * s_in)

        # Step 2
        a3_2 = r_2 / r_1 * ei_h_phi_2(-r_2 * h_eta)
        a3_1 = ei_h_phi_1(-r_2 * h_eta) - a3_2
        x_3 = (sigma_s_2 / sigmas[i] * (-r_2 * h * eta).exp() * x
               - alpha_s_2 * (a3_1 * denoised + a3_2 * denoised_2))  # fmt: skip
        if inject_noise:
            segment_factor = (r_1 - r_2) * h * eta
            sde_noise = sde_noise * segment_factor.exp()
            sde_noise = sde_noise + segment_factor.mul(2).expm1().neg().sqrt() * noise_sampler(
                sigma_s_1, sigma_s_2
            )
            x_3 = x_3 + sde_noise * sigma_s_2 * s_noise
        denoised_3 = model(x_3, sigma_s_2 * s_in)

        # Step 3
        b3 = ei_h_phi_2(-h_eta) / r_2
        b1 = ei_h_phi_1(-h_eta) - b3
        x = (sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x
             - alpha_t * (b1 * denoised + b3 * denoised_3))  # fmt: skip
        if inject_noise:
            segment_factor = (r_2 - 1) * h * eta
            sde_noise = sde_noise * segment_factor.exp()
            sde_noise = sde_noise + segment_factor.mul(2).expm1().neg().sqrt() * noise_sampler(
                sigma_s_2, sigmas[i + 1]
            )
            x = x + sde_noise * sigmas[i + 1] * s_noise
    return x


class SkipEmpty:
    """adapted: ComfyUI asks for noise over a stage of length 0 (``r = 1``: from the next
    sigma to itself) and multiplies it by 0; ours draws none, so the reference's stream
    hands out zeros there without drawing, to stay aligned with ours."""

    def __init__(self, stream: NoiseStream) -> None:
        self.stream = stream

    def __call__(self, sigma, sigma_next):
        if math.isclose(float(sigma), float(sigma_next), rel_tol=1e-12):
            return torch.zeros(self.stream.shape, dtype=self.stream.dtype)
        return self.stream(sigma, sigma_next)


# -- the cases ---------------------------------------------------------------------------------

#: (id, our class, its options, the reference, the reference's keyword arguments)
CASES = [
    ("dpm_fast", DPMFast, {}, comfy_dpm_fast, {}),
    ("dpm_fast-eta", DPMFast, {"eta": 0.7, "s_noise": 0.9}, comfy_dpm_fast,
     {"eta": 0.7, "s_noise": 0.9}),
    ("dpm_adaptive", DPMAdaptive, {}, comfy_dpm_adaptive, {}),
    ("dpm_adaptive-order2", DPMAdaptive, {"order": 2}, comfy_dpm_adaptive, {"order": 2}),
    ("dpm_adaptive-tight-pid", DPMAdaptive,
     {"rtol": 0.01, "atol": 0.002, "h_init": 0.2, "pcoeff": 0.2, "icoeff": 0.5, "dcoeff": 0.1,
      "accept_safety": 0.9},
     comfy_dpm_adaptive,
     {"rtol": 0.01, "atol": 0.002, "h_init": 0.2, "pcoeff": 0.2, "icoeff": 0.5, "dcoeff": 0.1,
      "accept_safety": 0.9}),
    ("dpm_adaptive-eta", DPMAdaptive, {"eta": 0.5, "s_noise": 0.9}, comfy_dpm_adaptive,
     {"eta": 0.5, "s_noise": 0.9}),
    ("er_sde", ERSDE, {}, sample_er_sde, {}),
    ("er_sde-stage2-s_noise", ERSDE, {"max_stage": 2, "s_noise": 0.7}, sample_er_sde,
     {"max_stage": 2, "s_noise": 0.7}),
    ("er_sde-stage1", ERSDE, {"max_stage": 1}, sample_er_sde, {"max_stage": 1}),
    ("er_sde-no-noise", ERSDE, {"s_noise": 0.0}, sample_er_sde, {"s_noise": 0.0}),
    ("seeds_2", Seeds2, {}, sample_seeds_2, {}),
    ("seeds_2-phi_2-r0.3", Seeds2, {"solver_type": "phi_2", "r": 0.3, "eta": 0.5},
     sample_seeds_2, {"solver_type": "phi_2", "r": 0.3, "eta": 0.5}),
    ("seeds_2-s_noise", Seeds2, {"s_noise": 0.8, "r": 0.7}, sample_seeds_2,
     {"s_noise": 0.8, "r": 0.7}),
    ("seeds_2-eta0", Seeds2, {"eta": 0.0}, sample_seeds_2, {"eta": 0.0}),
    ("seeds_3", Seeds3, {}, sample_seeds_3, {}),
    ("seeds_3-r", Seeds3, {"r_1": 0.25, "r_2": 0.75, "eta": 0.5, "s_noise": 0.9},
     sample_seeds_3, {"r_1": 0.25, "r_2": 0.75, "eta": 0.5, "s_noise": 0.9}),
    ("seeds_3-r2=1", Seeds3, {"r_2": 1.0}, sample_seeds_3, {"r_2": 1.0}),
    ("seeds_3-eta0", Seeds3, {"eta": 0.0}, sample_seeds_3, {"eta": 0.0}),
    ("exp_heun_2_x0", ExpHeun2X0, {}, sample_exp_heun_2_x0, {}),
    ("exp_heun_2_x0-phi_1", ExpHeun2X0, {"solver_type": "phi_1"}, sample_exp_heun_2_x0,
     {"solver_type": "phi_1"}),
    ("exp_heun_2_x0_sde", ExpHeun2X0SDE, {}, sample_exp_heun_2_x0_sde, {}),
    ("exp_heun_2_x0_sde-eta", ExpHeun2X0SDE,
     {"eta": 0.5, "s_noise": 0.9, "solver_type": "phi_1"}, sample_exp_heun_2_x0_sde,
     {"eta": 0.5, "s_noise": 0.9, "solver_type": "phi_1"}),
]  # fmt: skip
DETERMINISTIC_REFERENCES = {sample_exp_heun_2_x0}


def schedule(grid: str, steps: int, sigma_max: float = 80.0, sigma_min: float = 0.002):
    levels = toolkit.NoiseLevels.continuous(sigma_min, sigma_max)
    return toolkit.schedule(grid)(steps, levels)


def seeded(seed: int, scale: float = 1.0, shape: tuple[int, ...] = SAMPLE_SHAPE) -> torch.Tensor:
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64) * scale


@pytest.fixture(scope="module")
def mu() -> torch.Tensor:
    return seeded(100, DATA_STD)


@pytest.fixture(scope="module")
def denoise(mu):
    return gaussian_denoiser(mu, DATA_STD, wiggle=0.3)


def no_noise(sigma, sigma_next):
    raise AssertionError("a deterministic sampler asked for noise")


@pytest.mark.parametrize(("case_id", "cls", "options", "reference", "ref_kwargs"), CASES,
                         ids=[c[0] for c in CASES])  # fmt: skip
@pytest.mark.parametrize(("grid", "steps"), [("karras", 12), ("exponential", 10),
                                             ("karras", 11)])  # fmt: skip
def test_equal_to_reference(denoise, case_id, cls, options, reference, ref_kwargs, grid, steps):
    """The same update as the reference, and the same noise, asked for with the same
    (sigma, sigma_next) (the references may also ask for noise they multiply by 0)."""
    sigmas = schedule(grid, steps)
    x = seeded(101) * sigmas[0]
    ref_noise = NoiseStream(NOISE_SEED, dtype=torch.float64)
    our_noise = NoiseStream(NOISE_SEED, dtype=torch.float64)
    extra = {} if reference in DETERMINISTIC_REFERENCES else {"noise_sampler": SkipEmpty(ref_noise)}
    theirs = reference(denoise, x, sigmas, **ref_kwargs, **extra)
    ours = cls(**options)(denoise, x, sigmas, noise=our_noise)
    assert ours.dtype == torch.float64
    err = rel_err(ours, theirs)
    assert err <= TOL, f"{case_id}: relative error {err:.3g}"
    flat = [s for call in our_noise.calls for s in call]
    # dpm_adaptive's step-size control feeds its rounding back (1e-16 grows to 2e-8 over
    # nine noisy steps): its steps match the reference's less closely
    rel = 1e-6 if cls is DPMAdaptive else 1e-12
    assert flat == pytest.approx([s for call in ref_noise.calls for s in call][: len(flat)],
                                 rel=rel)  # fmt: skip
    unused = len(ref_noise.calls) - len(our_noise.calls)
    # k-diffusion's DPMSolver draws noise on every step; with eta > 0 only the last one's is
    # multiplied by 0 (it ends at sigma_min); with eta = 0, all of them
    if cls in (DPMFast, DPMAdaptive) and options.get("eta"):
        assert unused == 1
    elif cls in (DPMFast, DPMAdaptive):
        assert our_noise.calls == []
    else:
        assert unused == 0
    stochastic = options.get("eta", 1.0) > 0 and options.get("s_noise", 1.0) > 0
    if cls in (DPMFast, DPMAdaptive):
        stochastic = bool(options.get("eta"))
    if cls is ExpHeun2X0:
        stochastic = False
    assert bool(our_noise.calls) == stochastic


def test_dpm_fast_spends_the_schedules_steps_as_model_evaluations(denoise):
    """ComfyUI hands k-diffusion ``len(sigmas) - 1`` as the NFE budget: 12 evaluations for
    a 12-step schedule, in ``floor(12 / 3) + 1 = 5`` solver steps (orders 3, 3, 3, 2, 1)."""
    sigmas = schedule("karras", 12)
    x = seeded(101) * sigmas[0]
    calls, reports = [], []

    def counting(x, sigma):
        calls.append(float(sigma))
        return denoise(x, sigma)

    DPMFast()(counting, x, sigmas, noise=no_noise, callback=reports.append)
    assert len(calls) == 12
    assert [r["i"] for r in reports] == list(range(5))
    assert reports[0]["sigma"] == pytest.approx(80.0, rel=1e-12)
    # equal steps in lambda from sigma_max to the last non-zero sigma
    t = [-math.log(r["sigma"]) for r in reports] + [-math.log(float(sigmas[-2]))]
    assert [b - a for a, b in itertools.pairwise(t)] == pytest.approx([(t[-1] - t[0]) / 5] * 5)


def test_dpm_samplers_end_at_sigma_min_as_comfyui(mu):
    """Neither takes a step to sigma 0: on Gaussian data (no nonlinearity) the result is the
    probability-flow ODE's solution at the last non-zero sigma, not at 0."""
    denoise = gaussian_denoiser(mu, DATA_STD)
    sigmas = schedule("karras", 90, sigma_max=10.0, sigma_min=0.1)
    x = seeded(101) * sigmas[0]
    sigma_min = float(sigmas[-2])
    at_min = gaussian_ode_solution(x, mu, DATA_STD, float(sigmas[0]), sigma_min)
    at_zero = gaussian_ode_solution(x, mu, DATA_STD, float(sigmas[0]))
    for sampler in (DPMFast(), DPMAdaptive(rtol=1e-5, atol=1e-6)):
        out = sampler(denoise, x, sigmas, noise=no_noise)
        # dpm_fast: 3.2e-4 (its last step is first order), dpm_adaptive: 3e-6
        assert rel_err(out, at_min) < 1e-3
        assert rel_err(out, at_zero) > 20 * rel_err(out, at_min)


def test_one_step_schedule_returns_the_sample_unchanged(denoise):
    """ComfyUI's behaviour: a one-step schedule gives ``sigma_min = sigma_max``."""
    sigmas = schedule("karras", 1)
    x = seeded(101) * sigmas[0]
    for sampler in (DPMFast(), DPMFast(eta=1.0), DPMAdaptive()):
        noise = NoiseStream(NOISE_SEED, dtype=torch.float64)
        assert torch.equal(sampler(denoise, x, sigmas, noise=noise), x)
        assert noise.calls == []


def test_dpm_adaptive_survives_a_nan(denoise):
    """k-diffusion rejects a NaN error estimate forever; ours takes the step."""

    def broken(x, sigma):
        out = denoise(x, sigma)
        out[0, 0, 0, 0] = math.nan
        return out

    sigmas = schedule("karras", 10)
    out = DPMAdaptive()(broken, seeded(101) * sigmas[0], sigmas, noise=no_noise)
    assert out.isnan().any()


# -- properties: convergence, range of sigma_max, callbacks, options ---------------------------

#: deterministic forms: (class, options, reaches sigma 0)
ODE_FORMS = [
    (DPMFast, {}, False),
    (ExpHeun2X0, {}, True),
    (ExpHeun2X0, {"solver_type": "phi_1"}, True),
    (ExpHeun2X0SDE, {"eta": 0.0}, True),
    (Seeds2, {"eta": 0.0}, True),
    (Seeds2, {"eta": 0.0, "solver_type": "phi_2"}, True),
    (Seeds3, {"eta": 0.0}, True),
]


@pytest.mark.parametrize(("cls", "options", "to_zero"), ODE_FORMS,
                         ids=[f"{c.name}-{o}" for c, o, _ in ODE_FORMS])  # fmt: skip
@pytest.mark.parametrize("sigma_max", [80.0, 1.0])
def test_deterministic_forms_converge_to_the_ode_solution(mu, cls, options, to_zero, sigma_max):
    """At least second order: doubling the steps divides the error by about 4 (measured from
    20 to 40 steps at sigma_max 80: 6.92e-3 to 5.97e-4 for dpm_fast, 2.22e-2 to 5.72e-3 for
    exp_heun_2_x0, 1.41e-2 to 3.59e-3 for seeds_2 (eta 0), 1.69e-4 to 2.16e-5 for seeds_3)."""
    denoise = gaussian_denoiser(mu, DATA_STD)
    errors = {}
    for steps in (20, 40):
        sigmas = schedule("karras", steps, sigma_max=sigma_max)
        x = seeded(101) * sigmas[0]
        end = 0.0 if to_zero else float(sigmas[-2])
        exact = gaussian_ode_solution(x, mu, DATA_STD, sigma_max, end)
        out = cls(**options)(denoise, x, sigmas, noise=no_noise)
        assert out.isfinite().all()
        errors[steps] = rel_err(out, exact)
    assert errors[40] < 1e-2, errors
    assert errors[40] < errors[20] / 3.4, errors


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("sigma_max", [80.0, 1.0])
def test_dpm_adaptive_error_follows_its_tolerance(mu, order, sigma_max):
    """Whatever the schedule's step count, the error at sigma_min shrinks with rtol (about
    rtol on this problem: 1.2e-3 and 1.7e-3 at rtol 1e-3, 1.3e-5 and 1.2e-5 at 1e-5, from
    sigma_max 80 at orders 2 and 3)."""
    denoise = gaussian_denoiser(mu, DATA_STD)
    errors = {}
    for steps, rtol in ((10, 1e-3), (40, 1e-3), (10, 1e-5)):
        sigmas = schedule("karras", steps, sigma_max=sigma_max)
        x = seeded(101) * sigmas[0]
        exact = gaussian_ode_solution(x, mu, DATA_STD, sigma_max, float(sigmas[-2]))
        sampler = DPMAdaptive(order=order, rtol=rtol, atol=rtol / 10)
        out = sampler(denoise, x, sigmas, noise=no_noise)
        assert out.isfinite().all()
        errors[steps, rtol] = rel_err(out, exact)
    assert errors[10, 1e-3] < 3e-3, errors
    assert errors[10, 1e-5] < 3e-5, errors
    assert errors[40, 1e-3] == errors[10, 1e-3]  # the same sigma range


#: every sampler with noise, at its defaults
SDE_FORMS = [
    (Seeds2, {}),
    (Seeds2, {"solver_type": "phi_2"}),
    (Seeds3, {}),
    (ExpHeun2X0SDE, {}),
    (ERSDE, {}),
    (DPMFast, {"eta": 1.0}),
    # at its default tolerances k-diffusion's ancestral dpm_adaptive accepts a step from
    # sigma 7.3 to 0.56 (deterministically to sigma_down 0.044) whose error estimate is
    # 1.19: from sigma_max 80 the spread comes out 0.735, as the reference's does
    (DPMAdaptive, {"eta": 1.0, "rtol": 0.01, "atol": 0.0017}),
]
BIG = (32, 3, 16, 16)


@pytest.mark.parametrize(("cls", "options"), SDE_FORMS,
                         ids=[f"{c.name}-{o}" for c, o in SDE_FORMS])  # fmt: skip
@pytest.mark.parametrize("sigma_max", [80.0, 1.0])
def test_stochastic_forms_sample_the_data_distribution(cls, options, sigma_max):
    """On data ~ N(mu, s^2 I) the samples' spread about mu is s (each element an independent
    draw: 24576 of them, so the estimate is good to about 0.5%); at 60 steps the worst is
    er_sde's 1.2% low from sigma_max 80."""
    mu = seeded(200, DATA_STD, BIG)
    denoise = gaussian_denoiser(mu, DATA_STD)
    sigmas = schedule("karras", 60, sigma_max=sigma_max)
    x = mu + seeded(201, 1.0, BIG) * math.sqrt(sigma_max**2 + DATA_STD**2)
    out = cls(**options)(denoise, x, sigmas, noise=NoiseStream(NOISE_SEED, BIG, torch.float64))
    assert out.isfinite().all()
    spread = float((out - mu).std())
    end = float(sigmas[-2]) if cls in (DPMFast, DPMAdaptive) else 0.0
    assert spread == pytest.approx(math.sqrt(DATA_STD**2 + end**2), rel=0.03)
    assert abs(float((out - mu).mean())) < 0.02


ALL = [(DPMFast, {}), (DPMAdaptive, {}), (ERSDE, {}), (Seeds2, {}), (Seeds3, {}),
       (ExpHeun2X0, {}), (ExpHeun2X0SDE, {})]  # fmt: skip


@pytest.mark.parametrize(("cls", "options"), ALL, ids=[c.name for c, _ in ALL])
def test_callback_reports_each_step(denoise, cls, options):
    """After each step: the sample, the sigma it started from and the estimate there (the
    dpm samplers: each of the solver's own steps)."""
    sigmas = schedule("karras", 8)
    x = seeded(101) * sigmas[0]
    records = []
    out = cls(**options)(denoise, x, sigmas, noise=NoiseStream(NOISE_SEED, dtype=torch.float64),
                         callback=records.append)  # fmt: skip
    assert [r["i"] for r in records] == list(range(len(records)))
    assert all(set(r) == {"i", "x", "sigma", "sigma_hat", "denoised"} for r in records)
    assert torch.equal(records[-1]["x"], out)
    if cls not in (DPMFast, DPMAdaptive):
        assert [r["sigma"] for r in records] == pytest.approx(sigmas[:-1].tolist(), rel=1e-12)
    previous = x
    for r in records:
        assert r["sigma_hat"] == r["sigma"]
        assert torch.equal(r["denoised"], denoise(previous, r["sigma"]))
        previous = r["x"]


@pytest.mark.parametrize(
    ("cls", "options", "message"),
    [
        (DPMFast, {"eta": -1.0}, "non-negative"),
        (DPMAdaptive, {"order": 1}, "order must be 2 or 3"),
        (DPMAdaptive, {"atol": 0.0}, "atol must be positive"),
        (DPMAdaptive, {"h_init": 0.0}, "h_init must be positive"),
        (DPMAdaptive, {"accept_safety": 2.0}, "accept_safety"),
        (ERSDE, {"max_stage": 4}, "max_stage must be 1, 2 or 3"),
        (ERSDE, {"s_noise": -1.0}, "non-negative"),
        (Seeds2, {"r": 0.0}, r"r must be in \(0, 1\]"),
        (Seeds2, {"solver_type": "phi_3"}, "solver_type"),
        (Seeds3, {"r_1": 0.7, "r_2": 0.5}, "0 < r_1 < r_2 <= 1"),
        (ExpHeun2X0SDE, {"s_noise": -0.5}, "non-negative"),
    ],
)
def test_options_are_checked(cls, options, message):
    with pytest.raises(toolkit.OptionError, match=message):
        cls(**options)
