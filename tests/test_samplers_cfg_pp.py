"""The CFG++ samplers (``*_cfg_pp``) against ComfyUI's ``comfy/k_diffusion/sampling.py``,
and the seam they use: a denoiser that also gives the unconditional estimate of the same
call (`toolkit.with_unconditional`).

The references restate ComfyUI's loops for a non-flow model (``alpha = 1``), each getting
the unconditional estimate as ComfyUI does, from a post-CFG hook that records it at every
model call (`Guided.last_uncond`). The two branches are exact Gaussian denoisers with
different means plus a small nonlinearity, combined by CFG at scale 1.7, in float64.
"""

from __future__ import annotations

import pytest
import torch
from sampling_helpers import SAMPLE_SHAPE, NoiseStream, gaussian_denoiser, rel_err

import toolkit

TOL = 1e-4
DATA_STD = 0.5
SCALE = 1.7


class Guided:
    """CFG over two Gaussian denoisers. Called plainly it returns the guided estimate and
    records the unconditional one (ComfyUI's ``post_cfg_function``); `with_unconditional`
    is the toolkit's seam."""

    def __init__(self, scale: float = SCALE) -> None:
        g = torch.Generator().manual_seed(100)
        mu_c = torch.randn(SAMPLE_SHAPE, generator=g, dtype=torch.float64) * DATA_STD
        mu_u = torch.randn(SAMPLE_SHAPE, generator=g, dtype=torch.float64) * DATA_STD
        self.cond = gaussian_denoiser(mu_c, DATA_STD, wiggle=0.3)
        self.uncond = gaussian_denoiser(mu_u, DATA_STD, wiggle=0.3)
        self.scale = scale
        self.last_uncond = None
        self.calls = 0

    def with_unconditional(self, x, sigma):
        self.calls += 1
        c, u = self.cond(x, sigma), self.uncond(x, sigma)
        self.last_uncond = u
        return u + self.scale * (c - u), u

    def __call__(self, x, sigma):
        return self.with_unconditional(x, sigma)[0]


# -- ComfyUI's CFG++ loops, restated (alpha_s = alpha_t = 1) ------------------------------------


def ancestral(sigma_from, sigma_to, eta):
    if not eta:
        return sigma_to, 0.0
    up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - up**2) ** 0.5, up


def comfy_euler_ancestral_cfg_pp(model, x, sigmas, eta=1.0, s_noise=1.0, noise_sampler=None):
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        uncond_denoised = model.last_uncond
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            d = (x - uncond_denoised) / sigmas[i]
            sigma_down, sigma_up = ancestral(sigmas[i], sigmas[i + 1], eta)
            x = denoised + sigma_down * d
            if eta > 0 and s_noise > 0:
                x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def comfy_euler_cfg_pp(model, x, sigmas):
    return comfy_euler_ancestral_cfg_pp(model, x, sigmas, eta=0.0, s_noise=0.0)


def comfy_dpmpp_2s_ancestral_cfg_pp(model, x, sigmas, eta=1.0, s_noise=1.0, noise_sampler=None):
    def sigma_fn(t):
        return t.neg().exp()

    def t_fn(sigma):
        return sigma.log().neg()

    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        sigma_down, sigma_up = ancestral(sigmas[i], sigmas[i + 1], eta)
        if sigma_down == 0:
            d = (x - model.last_uncond) / sigmas[i]
            x = denoised + d * sigma_down
        else:
            t, t_next = t_fn(sigmas[i]), t_fn(torch.as_tensor(sigma_down, dtype=torch.float64))
            r = 1 / 2
            h = t_next - t
            s = t + r * h
            x_2 = (sigma_fn(s) / sigma_fn(t)) * (x + (denoised - model.last_uncond)) - (
                -h * r
            ).expm1() * denoised
            denoised_2 = model(x_2, sigma_fn(s))
            # model.last_uncond is now the midpoint call's, as ComfyUI's temp[0]
            x = (sigma_fn(t_next) / sigma_fn(t)) * (x + (denoised - model.last_uncond)) - (
                -h
            ).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def comfy_dpmpp_2m_cfg_pp(model, x, sigmas):
    def t_fn(sigma):
        return sigma.log().neg()

    old_uncond_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        uncond_denoised = model.last_uncond
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if old_uncond_denoised is None or sigmas[i + 1] == 0:
            denoised_mix = -torch.exp(-h) * uncond_denoised
        else:
            h_last = t - t_fn(sigmas[i - 1])
            r = h_last / h
            denoised_mix = -torch.exp(-h) * uncond_denoised - torch.expm1(-h) * (1 / (2 * r)) * (
                denoised - old_uncond_denoised
            )
        x = denoised + denoised_mix + torch.exp(-h) * x
        old_uncond_denoised = uncond_denoised
    return x


def comfy_res_multistep_cfg_pp(model, x, sigmas, eta=0.0, s_noise=1.0, noise_sampler=None):
    def phi1(t):
        return torch.expm1(t) / t

    def phi2(t):
        return (phi1(t) - 1.0) / t

    def t_fn(sigma):
        return torch.as_tensor(sigma, dtype=torch.float64).log().neg()

    old_sigma_down = old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        uncond_denoised = model.last_uncond
        sigma_down, sigma_up = ancestral(sigmas[i], sigmas[i + 1], eta)
        if sigma_down == 0 or old_denoised is None:
            d = (x - uncond_denoised) / sigmas[i]
            x = denoised + d * sigma_down
        else:
            t, t_old = t_fn(sigmas[i]), t_fn(old_sigma_down)
            t_next, t_prev = t_fn(sigma_down), t_fn(sigmas[i - 1])
            h = t_next - t
            c2 = (t_prev - t_old) / h
            b1 = torch.nan_to_num(phi1(-h) - phi2(-h) / c2, nan=0.0)
            b2 = torch.nan_to_num(phi2(-h) / c2, nan=0.0)
            x = x + (denoised - uncond_denoised)
            x = (-h).exp() * x + h * (b1 * uncond_denoised + b2 * old_denoised)
        # ComfyUI also draws (and scales by 0) where sigma_up is 0: the same images
        if sigmas[i + 1] > 0 and sigma_up > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        old_denoised, old_sigma_down = uncond_denoised, sigma_down
    return x


def comfy_gradient_estimation_cfg_pp(model, x, sigmas, ge_gamma=2.0):
    old_d = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        d = (x - model.last_uncond) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            x = denoised + d * sigmas[i + 1]
            if i >= 1:
                x = x + (ge_gamma - 1) * (d - old_d) * dt
        old_d = d
    return x


REFERENCES = {
    "euler_cfg_pp": comfy_euler_cfg_pp,
    "euler_ancestral_cfg_pp": comfy_euler_ancestral_cfg_pp,
    "dpmpp_2s_ancestral_cfg_pp": comfy_dpmpp_2s_ancestral_cfg_pp,
    "dpmpp_2m_cfg_pp": comfy_dpmpp_2m_cfg_pp,
    "res_multistep_cfg_pp": comfy_res_multistep_cfg_pp,
    "res_multistep_ancestral_cfg_pp": comfy_res_multistep_cfg_pp,
    "gradient_estimation_cfg_pp": comfy_gradient_estimation_cfg_pp,
}
STOCHASTIC = {"euler_ancestral_cfg_pp", "dpmpp_2s_ancestral_cfg_pp",
              "res_multistep_ancestral_cfg_pp"}  # fmt: skip
#: the plain sampler each CFG++ sampler becomes when there is no unconditional branch
PLAIN = {name: name.removesuffix("_cfg_pp") for name in REFERENCES}

#: (our sampler, its options, the reference's keyword arguments)
CASES = [
    *[(name, {}, {}) for name in REFERENCES if name != "res_multistep_ancestral_cfg_pp"],
    ("res_multistep_ancestral_cfg_pp", {}, {"eta": 1.0}),
    ("euler_ancestral_cfg_pp", {"eta": 0.5, "s_noise": 0.9}, {"eta": 0.5, "s_noise": 0.9}),
    ("dpmpp_2s_ancestral_cfg_pp", {"eta": 0.6}, {"eta": 0.6}),
    ("res_multistep_ancestral_cfg_pp", {"eta": 0.5}, {"eta": 0.5}),
    ("gradient_estimation_cfg_pp", {"gamma": 1.5}, {"ge_gamma": 1.5}),
]


def schedule(name: str, steps: int) -> torch.Tensor:
    levels = toolkit.NoiseLevels.continuous(0.002, 80.0)
    return toolkit.schedule(name)(steps, levels).double()


def start(sigmas: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(101)
    return torch.randn(SAMPLE_SHAPE, generator=g, dtype=torch.float64) * sigmas[0]


@pytest.mark.parametrize(("name", "options", "reference"), CASES)
@pytest.mark.parametrize("grid", ["karras", "exponential"])
def test_equal_to_comfyui(name, options, reference, grid):
    """The same fresh noise on both sides, asked for with the same (sigma, sigma_next)."""
    sigmas = schedule(grid, 12)
    x = start(sigmas)
    theirs_noise = NoiseStream(7, dtype=torch.float64)
    ours_noise = NoiseStream(7, dtype=torch.float64)
    extra = {"noise_sampler": theirs_noise} if name in STOCHASTIC else {}
    theirs = REFERENCES[name](Guided(), x, sigmas, **reference, **extra)
    model = Guided()
    ours = toolkit.sampler(name, **options)(model, x, sigmas, noise=ours_noise)
    assert rel_err(ours, theirs) <= TOL
    if name in STOCHASTIC:
        ours_at = [s for call in ours_noise.calls for s in call]
        assert ours_at == pytest.approx([s for call in theirs_noise.calls for s in call])
    else:
        assert ours_noise.calls == []


@pytest.mark.parametrize("name", list(REFERENCES))
def test_cfg_pp_differs_from_the_plain_sampler_under_guidance(name):
    """The unconditional estimate is used: with guidance the paths part (by more than the
    tolerance the comparisons above hold to)."""
    sigmas = schedule("karras", 12)
    x = start(sigmas)
    options = {"eta": 0.0} if name in STOCHASTIC else {}
    cfg_pp = toolkit.sampler(name, **options)(Guided(), x, sigmas, noise=None)
    plain = toolkit.sampler(PLAIN[name], **options)(Guided(), x, sigmas, noise=None)
    assert rel_err(cfg_pp, plain) > 1e-3


@pytest.mark.parametrize("name", list(REFERENCES))
def test_without_an_unconditional_estimate_each_is_its_plain_namesake(name):
    """A plain denoise callable (no ``with_unconditional``) gives the guided estimate for
    both, and CFG++ then computes the plain sampler's update. dpmpp_2s_ancestral_cfg_pp
    does so with ``stage2_uncond="first"`` only (the next test)."""
    model = Guided()
    sigmas = schedule("karras", 12)
    x = start(sigmas)
    options = {"eta": 0.0} if name in STOCHASTIC else {}
    extra = {"stage2_uncond": "first"} if name == "dpmpp_2s_ancestral_cfg_pp" else {}
    cfg_pp = toolkit.sampler(name, **options, **extra)(model.cond, x, sigmas, noise=None)
    plain = toolkit.sampler(PLAIN[name], **options)(model.cond, x, sigmas, noise=None)
    assert rel_err(cfg_pp, plain) <= 1e-10


def test_with_unconditional_falls_back_to_the_estimate_for_plain_callables():
    x = torch.ones(1, 1, 2, 2)
    guided, uncond = toolkit.with_unconditional(lambda x, sigma: x * 0.5, x, 1.0)
    assert guided is uncond
    assert torch.equal(guided, x * 0.5)


def test_the_guided_denoiser_gives_the_uncond_branch_of_the_same_forward():
    """`GuidedDenoiser.with_unconditional`: one network call, the guidance's result and the
    ``uncond`` branch's estimate; with a guidance that runs no ``uncond`` branch, the
    guided estimate twice."""
    from toolkit.sampling.denoiser import GuidedDenoiser

    class Model:
        noise_levels, scheduler_config = None, {}

        def denoise(self, x, sigma, label):
            return x * 0 + label.view(-1, 1, 1, 1).to(x.dtype)

    class Conditioning:
        def inputs(self, branch, batch, device):
            return {"label": torch.full((batch,), 1.0 if branch == "cond" else 3.0)}

    x = torch.zeros(2, 1, 2, 2)
    guided = GuidedDenoiser(Model(), toolkit.guidance("cfg", scale=2.0), Conditioning())
    estimate, uncond = guided.with_unconditional(x, 1.0)
    assert guided.forwards == 1
    assert torch.equal(uncond, torch.full_like(x, 3.0))
    assert torch.equal(estimate, torch.full_like(x, 3.0 + 2.0 * (1.0 - 3.0)))
    assert torch.equal(guided(x, 1.0), estimate)

    plain = GuidedDenoiser(Model(), toolkit.guidance("none"), Conditioning())
    estimate, uncond = plain.with_unconditional(x, 1.0)
    assert estimate is uncond


def test_comfyuis_2s_cfg_pp_keeps_a_term_without_guidance_that_first_removes():
    """ComfyUI's second stage uses the midpoint call's unconditional estimate: without
    guidance it adds ``guided - guided_mid`` and does not converge to the ODE's solution
    (the documented reason for the ``stage2_uncond="first"`` option)."""
    from sampling_helpers import gaussian_ode_solution

    mu = torch.randn(SAMPLE_SHAPE, generator=torch.Generator().manual_seed(5),
                     dtype=torch.float64) * DATA_STD  # fmt: skip
    plain = gaussian_denoiser(mu, DATA_STD)
    errors = {}
    for mode in ("midpoint", "first"):
        sampler = toolkit.sampler("dpmpp_2s_ancestral_cfg_pp", eta=0.0, stage2_uncond=mode)
        sigmas = schedule("karras", 100)
        x = start(sigmas)
        exact = gaussian_ode_solution(x, mu, DATA_STD, float(sigmas[0]))
        errors[mode] = rel_err(sampler(plain, x, sigmas, noise=None), exact)
    assert errors["first"] < 1e-3 < 0.05 < errors["midpoint"]
