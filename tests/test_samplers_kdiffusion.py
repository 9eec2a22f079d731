"""Each built-in sampler computes its k-diffusion namesake's update rule.

The references below are a straight transcription of Katherine Crowson's
``k_diffusion/sampling.py`` (crowsonkb/k-diffusion, master; ``sample_dpmpp_2m_sde`` and
``sample_dpmpp_3m_sde`` arrived in 2023): torch tensor arithmetic as k-diffusion writes it,
sigmas as a tensor, ``model(x, sigmas[i] * s_in)``. Only what cannot carry over is
changed: no progress bar, callback or ``extra_args``, and (marked "adapted") the
``noise_sampler`` where k-diffusion draws ``torch.randn_like`` for Karras's churn.
`ddim` and `ddpm` are k-diffusion's ``sample_euler_ancestral`` with ``eta`` (see
`plugins.samplers.ddim`); `unipc` has no k-diffusion version (it is tested against
diffusers only).

They run on the exact denoiser of Gaussian data plus a small nonlinearity, on a Karras
schedule, in float64, with the same stream of fresh noise as ours.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from sampling_helpers import (
    SAMPLE_SHAPE,
    NoiseStream,
    append_dims,
    gaussian_denoiser,
    gaussian_ode_solution,
    rel_err,
)
from scipy import integrate

import toolkit

TOL = 1e-4
NOISE_SEED = 7
DATA_STD = 0.5


# -- k-diffusion's samplers, transcribed -------------------------------------------------------


def to_d(x, sigma, denoised):
    """Converts a denoiser output to a Karras ODE derivative."""
    return (x - denoised) / append_dims(sigma, x.ndim)


def get_ancestral_step(sigma_from, sigma_to, eta=1.0):
    """Calculates the noise level (sigma_down) to step down to and the amount
    of noise to add (sigma_up) when doing an ancestral sampling step."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(
        sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    )
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def _churn(x, sigmas, i, s_churn, s_tmin, s_tmax, s_noise, noise_sampler):
    gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.0
    sigma_hat = sigmas[i] * (gamma + 1)
    if gamma > 0:
        # adapted: k-diffusion draws eps = torch.randn_like(x) * s_noise on every step (and
        # discards it when gamma == 0); here it comes from the noise stream when it is used.
        eps = noise_sampler(sigmas[i], sigma_hat) * s_noise
        x = x + eps * (sigma_hat**2 - sigmas[i] ** 2) ** 0.5
    return x, sigma_hat


def sample_euler(model, x, sigmas, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"),
                 s_noise=1.0, noise_sampler=None):  # fmt: skip
    """Implements Algorithm 2 (Euler steps) from Karras et al. (2022)."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas, i, s_churn, s_tmin, s_tmax, s_noise, noise_sampler)
        denoised = model(x, sigma_hat * s_in)
        d = to_d(x, sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        # Euler method
        x = x + d * dt
    return x


def sample_euler_ancestral(model, x, sigmas, eta=1.0, s_noise=1.0, noise_sampler=None):
    """Ancestral sampling with Euler method steps."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        d = to_d(x, sigmas[i], denoised)
        # Euler method
        dt = sigma_down - sigmas[i]
        x = x + d * dt
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def sample_heun(model, x, sigmas, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"),
                s_noise=1.0, noise_sampler=None):  # fmt: skip
    """Implements Algorithm 2 (Heun steps) from Karras et al. (2022)."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas, i, s_churn, s_tmin, s_tmax, s_noise, noise_sampler)
        denoised = model(x, sigma_hat * s_in)
        d = to_d(x, sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            # Euler method
            x = x + d * dt
        else:
            # Heun's method
            x_2 = x + d * dt
            denoised_2 = model(x_2, sigmas[i + 1] * s_in)
            d_2 = to_d(x_2, sigmas[i + 1], denoised_2)
            d_prime = (d + d_2) / 2
            x = x + d_prime * dt
    return x


def sample_dpm_2(model, x, sigmas, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"),
                 s_noise=1.0, noise_sampler=None):  # fmt: skip
    """A sampler inspired by DPM-Solver-2 and Algorithm 2 from Karras et al. (2022)."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas, i, s_churn, s_tmin, s_tmax, s_noise, noise_sampler)
        denoised = model(x, sigma_hat * s_in)
        d = to_d(x, sigma_hat, denoised)
        if sigmas[i + 1] == 0:
            # Euler method
            dt = sigmas[i + 1] - sigma_hat
            x = x + d * dt
        else:
            # DPM-Solver-2
            sigma_mid = sigma_hat.log().lerp(sigmas[i + 1].log(), 0.5).exp()
            dt_1 = sigma_mid - sigma_hat
            dt_2 = sigmas[i + 1] - sigma_hat
            x_2 = x + d * dt_1
            denoised_2 = model(x_2, sigma_mid * s_in)
            d_2 = to_d(x_2, sigma_mid, denoised_2)
            x = x + d_2 * dt_2
    return x


def sample_dpm_2_ancestral(model, x, sigmas, eta=1.0, s_noise=1.0, noise_sampler=None):
    """Ancestral sampling with DPM-Solver second-order steps."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            # Euler method
            dt = sigma_down - sigmas[i]
            x = x + d * dt
        else:
            # DPM-Solver-2
            sigma_mid = sigmas[i].log().lerp(sigma_down.log(), 0.5).exp()
            dt_1 = sigma_mid - sigmas[i]
            dt_2 = sigma_down - sigmas[i]
            x_2 = x + d * dt_1
            denoised_2 = model(x_2, sigma_mid * s_in)
            d_2 = to_d(x_2, sigma_mid, denoised_2)
            x = x + d_2 * dt_2
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def linear_multistep_coeff(order, t, i, j):
    if order - 1 > i:
        raise ValueError(f"Order {order} too high for step {i}")

    def fn(tau):
        prod = 1.0
        for k in range(order):
            if j == k:
                continue
            prod *= (tau - t[i - k]) / (t[i - j] - t[i - k])
        return prod

    return integrate.quad(fn, t[i], t[i + 1], epsrel=1e-4)[0]


def sample_lms(model, x, sigmas, order=4, noise_sampler=None):
    s_in = x.new_ones([x.shape[0]])
    sigmas_cpu = sigmas.detach().cpu().numpy()
    ds = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        d = to_d(x, sigmas[i], denoised)
        ds.append(d)
        if len(ds) > order:
            ds.pop(0)
        cur_order = min(i + 1, order)
        coeffs = [linear_multistep_coeff(cur_order, sigmas_cpu, i, j) for j in range(cur_order)]
        x = x + sum(coeff * d for coeff, d in zip(coeffs, reversed(ds)))
    return x


def sigma_fn(t):
    return t.neg().exp()


def t_fn(sigma):
    return sigma.log().neg()


def sample_dpmpp_2s_ancestral(model, x, sigmas, eta=1.0, s_noise=1.0, noise_sampler=None):
    """Ancestral sampling with DPM-Solver++(2S) second-order steps."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        if sigma_down == 0:
            # Euler method
            d = to_d(x, sigmas[i], denoised)
            dt = sigma_down - sigmas[i]
            x = x + d * dt
        else:
            # DPM-Solver++(2S)
            t, t_next = t_fn(sigmas[i]), t_fn(sigma_down)
            r = 1 / 2
            h = t_next - t
            s = t + r * h
            x_2 = (sigma_fn(s) / sigma_fn(t)) * x - (-h * r).expm1() * denoised
            denoised_2 = model(x_2, sigma_fn(s) * s_in)
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised_2
        # Noise addition
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def sample_dpmpp_sde(model, x, sigmas, eta=1.0, s_noise=1.0, noise_sampler=None, r=1 / 2):
    """DPM-Solver++ (stochastic)."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        if sigmas[i + 1] == 0:
            # Euler method
            d = to_d(x, sigmas[i], denoised)
            dt = sigmas[i + 1] - sigmas[i]
            x = x + d * dt
        else:
            # DPM-Solver++
            t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
            h = t_next - t
            s = t + h * r
            fac = 1 / (2 * r)

            # Step 1
            sd, su = get_ancestral_step(sigma_fn(t), sigma_fn(s), eta)
            s_ = t_fn(sd)
            x_2 = (sigma_fn(s_) / sigma_fn(t)) * x - (t - s_).expm1() * denoised
            x_2 = x_2 + noise_sampler(sigma_fn(t), sigma_fn(s)) * s_noise * su
            denoised_2 = model(x_2, sigma_fn(s) * s_in)

            # Step 2
            sd, su = get_ancestral_step(sigma_fn(t), sigma_fn(t_next), eta)
            t_next_ = t_fn(sd)
            denoised_d = (1 - fac) * denoised + fac * denoised_2
            x = (sigma_fn(t_next_) / sigma_fn(t)) * x - (t - t_next_).expm1() * denoised_d
            x = x + noise_sampler(sigma_fn(t), sigma_fn(t_next)) * s_noise * su
    return x


def sample_dpmpp_2m(model, x, sigmas, noise_sampler=None):
    """DPM-Solver++(2M)."""
    s_in = x.new_ones([x.shape[0]])
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised
        else:
            h_last = t - t_fn(sigmas[i - 1])
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


def sample_dpmpp_2m_sde(model, x, sigmas, eta=1.0, s_noise=1.0, noise_sampler=None,
                        solver_type="midpoint"):  # fmt: skip
    """DPM-Solver++(2M) SDE."""
    if solver_type not in {"heun", "midpoint"}:
        raise ValueError("solver_type must be 'heun' or 'midpoint'")
    s_in = x.new_ones([x.shape[0]])
    old_denoised = None
    h_last = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        if sigmas[i + 1] == 0:
            # Denoising step
            x = denoised
        else:
            # DPM-Solver++(2M) SDE
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            eta_h = eta * h

            x = (
                sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x
                + (-h - eta_h).expm1().neg() * denoised
            )

            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + ((-h - eta_h).expm1().neg() / (-h - eta_h) + 1) * (1 / r) * (
                        denoised - old_denoised
                    )
                elif solver_type == "midpoint":
                    x = x + 0.5 * (-h - eta_h).expm1().neg() * (1 / r) * (denoised - old_denoised)

            if eta:
                x = (
                    x
                    + noise_sampler(sigmas[i], sigmas[i + 1])
                    * sigmas[i + 1]
                    * (-2 * eta_h).expm1().neg().sqrt()
                    * s_noise
                )

        old_denoised = denoised
        h_last = h
    return x


def sample_dpmpp_3m_sde(model, x, sigmas, eta=1.0, s_noise=1.0, noise_sampler=None):
    """DPM-Solver++(3M) SDE."""
    s_in = x.new_ones([x.shape[0]])
    denoised_1, denoised_2 = None, None
    h, h_1, h_2 = None, None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        if sigmas[i + 1] == 0:
            # Denoising step
            x = denoised
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            h_eta = h * (eta + 1)

            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised

            if h_2 is not None:
                r0 = h_1 / h
                r1 = h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                r = h_1 / h
                d = (denoised - denoised_1) / r
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + phi_2 * d

            if eta:
                x = (
                    x
                    + noise_sampler(sigmas[i], sigmas[i + 1])
                    * sigmas[i + 1]
                    * (-2 * h * eta).expm1().neg().sqrt()
                    * s_noise
                )

        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


# -- the cases ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    sampler: str
    options: dict[str, Any]
    reference: Callable[..., Any]
    ref_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    # k-diffusion's euler_ancestral draws its noise even when eta = 0 makes sigma_up 0;
    # ours draws only noise it uses.
    ref_draws_unused_noise: bool = False


CHURN = {"s_churn": 1.0}
CHURN_BAND = {"s_churn": 2.0, "s_tmin": 0.5, "s_tmax": 10.0, "s_noise": 1.007}

CASES = [
    Case("ddim", "ddim", {}, sample_euler_ancestral, {"eta": 0.0}, ref_draws_unused_noise=True),
    Case("ddim-eta0.5", "ddim", {"eta": 0.5}, sample_euler_ancestral, {"eta": 0.5}),
    Case("ddpm", "ddpm", {}, sample_euler_ancestral, {"eta": 1.0}),
    Case("euler", "euler", {}, sample_euler),
    Case("euler-churn", "euler", CHURN, sample_euler, CHURN),
    Case("euler-churn-band", "euler", CHURN_BAND, sample_euler, CHURN_BAND),
    Case("euler_ancestral", "euler_ancestral", {}, sample_euler_ancestral),
    Case(
        "euler_ancestral-eta0.7",
        "euler_ancestral",
        {"eta": 0.7, "s_noise": 1.01},
        sample_euler_ancestral,
        {"eta": 0.7, "s_noise": 1.01},
    ),
    Case("heun", "heun", {}, sample_heun),
    Case("heun-churn-band", "heun", CHURN_BAND, sample_heun, CHURN_BAND),
    Case("dpm_2", "dpm_2", {}, sample_dpm_2),
    Case("dpm_2-churn", "dpm_2", CHURN, sample_dpm_2, CHURN),
    Case("dpm_2_ancestral", "dpm_2_ancestral", {}, sample_dpm_2_ancestral),
    Case("lms", "lms", {}, sample_lms),
    Case("lms-order2", "lms", {"order": 2}, sample_lms, {"order": 2}),
    Case("dpmpp_2s_ancestral", "dpmpp_2s_ancestral", {}, sample_dpmpp_2s_ancestral),
    Case(
        "dpmpp_2s_ancestral-eta0.5",
        "dpmpp_2s_ancestral",
        {"eta": 0.5},
        sample_dpmpp_2s_ancestral,
        {"eta": 0.5},
    ),
    Case("dpmpp_sde", "dpmpp_sde", {}, sample_dpmpp_sde),
    Case(
        "dpmpp_sde-r0.3-eta0.5",
        "dpmpp_sde",
        {"r": 0.3, "eta": 0.5},
        sample_dpmpp_sde,
        {"r": 0.3, "eta": 0.5},
    ),
    Case("dpmpp_2m", "dpmpp_2m", {}, sample_dpmpp_2m),
    Case("dpmpp_2m_sde-midpoint", "dpmpp_2m_sde", {}, sample_dpmpp_2m_sde),
    Case(
        "dpmpp_2m_sde-heun",
        "dpmpp_2m_sde",
        {"solver_type": "heun"},
        sample_dpmpp_2m_sde,
        {"solver_type": "heun"},
    ),
    Case(
        "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun", {}, sample_dpmpp_2m_sde, {"solver_type": "heun"}
    ),
    Case(
        "dpmpp_2m_sde-eta0.5",
        "dpmpp_2m_sde",
        {"eta": 0.5, "s_noise": 0.9},
        sample_dpmpp_2m_sde,
        {"eta": 0.5, "s_noise": 0.9},
    ),
    Case("dpmpp_3m_sde", "dpmpp_3m_sde", {}, sample_dpmpp_3m_sde),
    Case(
        "dpmpp_3m_sde-eta0.5",
        "dpmpp_3m_sde",
        {"eta": 0.5},
        sample_dpmpp_3m_sde,
        {"eta": 0.5},
    ),
]


def karras(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0) -> torch.Tensor:
    noise_levels = toolkit.NoiseLevels.continuous(sigma_min, sigma_max)
    return toolkit.schedule("karras", rho=7.0)(steps, noise_levels)


def seeded(seed: int, scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(SAMPLE_SHAPE, generator=generator, dtype=torch.float64) * scale


@pytest.fixture(scope="module")
def mu() -> torch.Tensor:
    return seeded(100, DATA_STD)


@pytest.fixture(scope="module")
def denoise(mu: torch.Tensor) -> Callable[..., torch.Tensor]:
    return gaussian_denoiser(mu, DATA_STD, wiggle=0.3)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_sampler_computes_kdiffusion_update(case: Case, denoise: Any) -> None:
    sigmas = karras(12)
    x = seeded(101) * sigmas[0]
    ref_noise, our_noise = (
        NoiseStream(NOISE_SEED, dtype=torch.float64),
        NoiseStream(NOISE_SEED, dtype=torch.float64),
    )
    ref = case.reference(denoise, x, sigmas, noise_sampler=ref_noise, **case.ref_kwargs)
    ours = toolkit.sampler(case.sampler, **case.options)(denoise, x, sigmas, noise=our_noise)
    assert ours.dtype == torch.float64
    err = rel_err(ours, ref)
    assert err <= TOL, f"{case.id}: relative error {err:.3g} to k-diffusion"
    # the same noise, asked for with the same (sigma, sigma_next): a Brownian-tree noise
    # source would give both the same increments
    if case.ref_draws_unused_noise:
        assert our_noise.calls == []
    else:
        assert len(our_noise.calls) == len(ref_noise.calls)
        flat = [s for call in our_noise.calls for s in call]
        assert flat == pytest.approx([s for call in ref_noise.calls for s in call], rel=1e-12)


def test_dpm_2_ancestral_with_eta_above_1_keeps_its_noise(denoise: Any) -> None:
    """Where ``eta > 1`` makes ``sigma_down`` 0, k-diffusion's ``sample_dpm_2_ancestral``
    takes the Euler branch and adds no noise (its noise is inside the DPM-Solver-2 branch),
    leaving a sample with no noise at ``sigma_next > 0``; its ``euler_ancestral`` and
    ``dpmpp_2s_ancestral`` add it. Ours adds it too: where every step has ``sigma_down == 0``
    it is ``euler_ancestral``, the step both take."""
    sigmas = karras(12)
    x = seeded(101) * sigmas[0]
    assert all(get_ancestral_step(sigmas[i], sigmas[i + 1], eta=2.0)[0] == 0 for i in range(12))
    noise = NoiseStream(NOISE_SEED, dtype=torch.float64)
    ours = toolkit.sampler("dpm_2_ancestral", eta=2.0)(denoise, x, sigmas, noise=noise)
    euler_a = sample_euler_ancestral(
        denoise, x, sigmas, eta=2.0, noise_sampler=NoiseStream(NOISE_SEED, dtype=torch.float64)
    )
    assert rel_err(ours, euler_a) <= TOL
    assert len(noise.calls) == 11
    kdiff_noise = NoiseStream(NOISE_SEED, dtype=torch.float64)
    sample_dpm_2_ancestral(denoise, x, sigmas, eta=2.0, noise_sampler=kdiff_noise)
    assert kdiff_noise.calls == []


#: samplers compared with diffusers' schedulers and other tools' loops in their own files
OTHER_REFERENCES = {
    "deis": "DEISMultistepScheduler and ComfyUI's tab mode: tests/test_samplers_deis_sa_tcd.py",
    "sa_solver": "ComfyUI and SASolverScheduler: tests/test_samplers_deis_sa_tcd.py",
    "sa_solver_pece": "ComfyUI: tests/test_samplers_deis_sa_tcd.py",
    "tcd": "TCDScheduler: tests/test_samplers_deis_sa_tcd.py",
    "restart": "AUTOMATIC1111's restart_sampler: tests/test_restart.py",
}


def test_every_builtin_sampler_has_a_reference() -> None:
    """A new built-in sampler needs a reference here, or in tests/test_samplers_comfyui.py
    (ComfyUI's ``heunpp2``, ``ipndm``, ``ipndm_v``, ``res_multistep`` and
    ``gradient_estimation``), tests/test_samplers_cfg_pp.py (ComfyUI's CFG++ samplers) or
    tests/test_samplers_comfyui_sde.py (``dpm_fast``, ``dpm_adaptive``, SEEDS, ER-SDE).
    ``unipc``, ``score_sde_ve`` and ``lcm`` have no k-diffusion version (``score_sde_ve`` is
    checked against ``ScoreSdeVePipeline`` in tests/test_ve.py, ``lcm`` against
    ``LCMScheduler`` in tests/test_samplers_diffusers.py) and ``diffusers`` runs a diffusers
    scheduler itself."""
    from test_samplers_cfg_pp import REFERENCES as CFG_PP
    from test_samplers_comfyui import REFERENCES as COMFYUI
    from test_samplers_comfyui_sde import CASES as SDE_CASES

    from plugins.samplers import SAMPLERS

    elsewhere = {"unipc", "diffusers", "score_sde_ve", "lcm", *OTHER_REFERENCES}
    builtin = {cls.name for cls in SAMPLERS} - elsewhere
    sde = {case[1].name for case in SDE_CASES}
    assert {case.sampler for case in CASES} | set(COMFYUI) | set(CFG_PP) | sde == builtin


# -- properties of every built-in sampler ----------------------------------------------------

#: (id, name, options, stochastic)
SAMPLERS = [
    ("ddim", "ddim", {}, False),
    ("ddim-eta0.5", "ddim", {"eta": 0.5}, True),
    ("ddpm", "ddpm", {}, True),
    ("euler", "euler", {}, False),
    ("euler-churn", "euler", CHURN, True),
    ("euler_ancestral", "euler_ancestral", {}, True),
    ("heun", "heun", {}, False),
    ("heun-churn-band", "heun", CHURN_BAND, True),
    ("dpm_2", "dpm_2", {}, False),
    ("dpm_2_ancestral", "dpm_2_ancestral", {}, True),
    ("lms", "lms", {}, False),
    ("dpmpp_2s_ancestral", "dpmpp_2s_ancestral", {}, True),
    ("dpmpp_sde", "dpmpp_sde", {}, True),
    ("dpmpp_2m", "dpmpp_2m", {}, False),
    ("dpmpp_2m_sde-midpoint", "dpmpp_2m_sde", {}, True),
    ("dpmpp_2m_sde-heun", "dpmpp_2m_sde", {"solver_type": "heun"}, True),
    ("dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun", {}, True),
    ("dpmpp_3m_sde", "dpmpp_3m_sde", {}, True),
    ("unipc", "unipc", {}, False),
    ("unipc-bh1-order3", "unipc", {"variant": "bh1", "order": 3}, False),
    ("ipndm", "ipndm", {}, False),
    ("ipndm_v", "ipndm_v", {}, False),
    ("res_multistep", "res_multistep", {}, False),
    ("res_multistep_ancestral", "res_multistep_ancestral", {}, True),
    ("gradient_estimation", "gradient_estimation", {}, False),
    ("heunpp2", "heunpp2", {}, False),
    ("heunpp2-churn", "heunpp2", {"s_churn": 1.0}, True),
    ("euler_cfg_pp", "euler_cfg_pp", {}, False),
    ("euler_ancestral_cfg_pp", "euler_ancestral_cfg_pp", {}, True),
    ("dpmpp_2s_ancestral_cfg_pp", "dpmpp_2s_ancestral_cfg_pp", {}, True),
    ("dpmpp_2m_cfg_pp", "dpmpp_2m_cfg_pp", {}, False),
    ("res_multistep_cfg_pp", "res_multistep_cfg_pp", {}, False),
    ("res_multistep_ancestral_cfg_pp", "res_multistep_ancestral_cfg_pp", {}, True),
    ("gradient_estimation_cfg_pp", "gradient_estimation_cfg_pp", {}, False),
    # dpm_fast and dpm_adaptive report their own steps (tests/test_samplers_comfyui_sde.py)
    ("seeds_2", "seeds_2", {}, True),
    ("seeds_3", "seeds_3", {}, True),
    ("exp_heun_2_x0", "exp_heun_2_x0", {}, False),
    ("exp_heun_2_x0_sde", "exp_heun_2_x0_sde", {}, True),
    ("er_sde", "er_sde", {}, True),
    ("deis", "deis", {}, False),
    ("deis-tab", "deis", {"mode": "tab"}, False),
    ("sa_solver", "sa_solver", {"sde_start_percent": 0.0, "sde_end_percent": 1.0}, True),
    ("sa_solver_pece", "sa_solver_pece", {"sde_start_percent": 0.0, "sde_end_percent": 1.0}, True),
    # below 20 steps: Heun; with restarts it reports its extra Heun steps too (and draws
    # only from the noise source: tests/test_restart.py compares its draws)
    ("restart", "restart", {}, False),
]
#: PECE reports the estimate at the corrected sample, not at the previous report's `x`
CORRECTED_ESTIMATE = {"sa_solver_pece"}
SAMPLER_PARAMS = [pytest.param(name, opts, sto, id=id_) for id_, name, opts, sto in SAMPLERS]


def no_noise(sigma: float, sigma_next: float) -> torch.Tensor:
    raise AssertionError("a deterministic sampler asked for noise")


#: (name, options, order): the global error shrinks like steps^-order
ODE_SOLVERS = [
    ("euler", {}, 1),
    ("ddim", {}, 1),
    ("heun", {}, 2),
    ("dpm_2", {}, 2),
    ("dpmpp_2m", {}, 2),
    ("lms", {}, 3),
    ("unipc", {}, 3),  # UniPC-2 with its corrector (Zhao et al. 2023)
    ("unipc", {"order": 3}, 4),
]


@pytest.mark.parametrize(
    "name, options, order",
    [pytest.param(*s, id=f"{s[0]}-{s[1].get('order', '')}".rstrip("-")) for s in ODE_SOLVERS],
)
def test_ode_sampler_converges_to_the_exact_solution(
    name: str, options: dict[str, Any], order: int, mu: torch.Tensor
) -> None:
    """On Gaussian data the probability-flow ODE has a closed-form solution; 20 and 40 steps
    land near it, and doubling the steps shrinks the error by about ``2**order``."""
    denoise = gaussian_denoiser(mu, DATA_STD)
    sampler = toolkit.sampler(name, **options)
    errors = {}
    for steps in (20, 40):
        sigmas = karras(steps)
        x = seeded(101) * sigmas[0]
        exact = gaussian_ode_solution(x, mu, DATA_STD, float(sigmas[0]))
        errors[steps] = rel_err(sampler(denoise, x, sigmas, noise=no_noise), exact)
    assert errors[40] < (0.06 if order == 1 else 0.01)
    ratio = errors[20] / errors[40]
    assert ratio > 0.85 * 2**order, f"{name}: error ratio {ratio:.3g} for doubled steps"
    if order == 1:
        assert ratio < 2.6


def test_second_order_samplers_beat_euler(mu: torch.Tensor) -> None:
    denoise = gaussian_denoiser(mu, DATA_STD)
    sigmas = karras(25)
    x = seeded(101) * sigmas[0]
    exact = gaussian_ode_solution(x, mu, DATA_STD, float(sigmas[0]))
    errors = {
        name: rel_err(toolkit.sampler(name)(denoise, x, sigmas, noise=no_noise), exact)
        for name in ("euler", "heun", "dpmpp_2m")
    }
    assert errors["heun"] < errors["euler"] / 3
    assert errors["dpmpp_2m"] < errors["euler"] / 3


@pytest.mark.parametrize("name, options, stochastic", SAMPLER_PARAMS)
def test_noise_is_the_only_source_of_randomness(
    name: str, options: dict[str, Any], stochastic: bool, denoise: Any
) -> None:
    sampler = toolkit.sampler(name, **options)
    sigmas = karras(10)
    x = seeded(101) * sigmas[0]

    def run(global_seed: int, noise_seed: int) -> tuple[torch.Tensor, NoiseStream]:
        torch.manual_seed(global_seed)
        torch.rand(global_seed + 1)  # and move the global generator on
        noise = NoiseStream(noise_seed, dtype=torch.float64)
        return sampler(denoise, x, sigmas, noise=noise), noise

    first, noise = run(0, NOISE_SEED)
    again, _ = run(1, NOISE_SEED)
    assert torch.equal(first, again)
    if stochastic:
        assert noise.calls
        other, _ = run(0, NOISE_SEED + 1)
        assert rel_err(other, first) > 1e-3
    else:
        assert noise.calls == []


@pytest.mark.parametrize("name, options, stochastic", SAMPLER_PARAMS)
def test_callback_reports_each_step(
    name: str, options: dict[str, Any], stochastic: bool, denoise: Any
) -> None:
    """Called after every step with ``i``, ``x`` (the sample at ``sigmas[i + 1]``),
    ``sigma``, ``sigma_hat`` (the churned level) and ``denoised`` (at ``sigma_hat``)."""
    steps = 8
    sigmas = karras(steps)
    x = seeded(101) * sigmas[0]
    records: list[dict[str, Any]] = []
    noise = NoiseStream(NOISE_SEED, dtype=torch.float64)
    out = toolkit.sampler(name, **options)(denoise, x, sigmas, noise=noise, callback=records.append)

    assert [r["i"] for r in records] == list(range(steps))
    assert all(set(r) == {"i", "x", "sigma", "sigma_hat", "denoised"} for r in records)
    assert [float(r["sigma"]) for r in records] == pytest.approx(sigmas[:-1].tolist(), rel=1e-12)
    assert torch.equal(records[-1]["x"], out)
    churn = options.get("s_churn", 0.0)
    for i, r in enumerate(records):
        sigma, sigma_hat = float(r["sigma"]), float(r["sigma_hat"])
        if churn and options.get("s_tmin", 0.0) <= sigma <= options.get("s_tmax", math.inf):
            assert sigma_hat == pytest.approx(sigma * (1 + min(churn / steps, 2**0.5 - 1)))
        else:
            assert sigma_hat == sigma
            # the model's estimate at this step's input, which the previous report holds
            previous = x if i == 0 else records[i - 1]["x"]
            if name not in CORRECTED_ESTIMATE or i == 0:
                assert torch.equal(r["denoised"], denoise(previous, sigma))
