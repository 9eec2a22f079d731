"""Samplers whose reference is ComfyUI's ``comfy/k_diffusion/sampling.py``: ``ipndm`` and
``ipndm_v`` (which it took from zju-pi's ``diff-sampler``), ``res_multistep`` (with its
ancestral form), ``gradient_estimation`` and ``heunpp2``.

The references restate ComfyUI's loops as it writes them (torch arithmetic, its history
buffer, its order ramp), without the progress bar, callback or ``extra_args``. They run on
the exact denoiser of Gaussian data plus a small nonlinearity, in float64, as
tests/test_samplers_kdiffusion.py does for k-diffusion's samplers.
"""

from __future__ import annotations

import pytest
import torch
from sampling_helpers import SAMPLE_SHAPE, gaussian_denoiser, rel_err

import toolkit

TOL = 1e-4
DATA_STD = 0.5


def comfy_ipndm(model, x, sigmas, max_order=4):
    x_next, buffer = x, []
    for i in range(len(sigmas) - 1):
        t_cur, t_next, x_cur = sigmas[i], sigmas[i + 1], x_next
        denoised = model(x_cur, t_cur)
        d_cur = (x_cur - denoised) / t_cur
        order = min(max_order, i + 1)
        if t_next == 0:
            x_next = denoised
        elif order == 1:
            x_next = x_cur + (t_next - t_cur) * d_cur
        elif order == 2:
            x_next = x_cur + (t_next - t_cur) * (3 * d_cur - buffer[-1]) / 2
        elif order == 3:
            x_next = x_cur + (t_next - t_cur) * (23 * d_cur - 16 * buffer[-1]
                                                 + 5 * buffer[-2]) / 12  # fmt: skip
        else:
            x_next = x_cur + (t_next - t_cur) * (55 * d_cur - 59 * buffer[-1] + 37 * buffer[-2]
                                                 - 9 * buffer[-3]) / 24  # fmt: skip
        if len(buffer) == max_order - 1:
            buffer = [*buffer[1:], d_cur] if max_order > 1 else buffer
        else:
            buffer.append(d_cur)
    return x_next


def comfy_ipndm_v(model, x, sigmas, max_order=4):
    x_next, t, buffer = x, sigmas, []
    for i in range(len(sigmas) - 1):
        t_cur, t_next, x_cur = sigmas[i], sigmas[i + 1], x_next
        denoised = model(x_cur, t_cur)
        d_cur = (x_cur - denoised) / t_cur
        order = min(max_order, i + 1)
        h_n = t_next - t_cur
        if t_next == 0:
            x_next = denoised
        elif order == 1:
            x_next = x_cur + h_n * d_cur
        elif order == 2:
            h_n_1 = t_cur - t[i - 1]
            c1, c2 = (2 + h_n / h_n_1) / 2, -(h_n / h_n_1) / 2
            x_next = x_cur + h_n * (c1 * d_cur + c2 * buffer[-1])
        elif order == 3:
            h_n_1, h_n_2 = t_cur - t[i - 1], t[i - 1] - t[i - 2]
            temp = (1 - h_n / (3 * (h_n + h_n_1)) * (h_n * (h_n + h_n_1))
                    / (h_n_1 * (h_n_1 + h_n_2))) / 2  # fmt: skip
            c1 = (2 + h_n / h_n_1) / 2 + temp
            c2 = -(h_n / h_n_1) / 2 - (1 + h_n_1 / h_n_2) * temp
            c3 = temp * h_n_1 / h_n_2
            x_next = x_cur + h_n * (c1 * d_cur + c2 * buffer[-1] + c3 * buffer[-2])
        else:
            h_n_1, h_n_2, h_n_3 = t_cur - t[i - 1], t[i - 1] - t[i - 2], t[i - 2] - t[i - 3]
            temp1 = (1 - h_n / (3 * (h_n + h_n_1)) * (h_n * (h_n + h_n_1))
                     / (h_n_1 * (h_n_1 + h_n_2))) / 2  # fmt: skip
            temp2 = (((1 - h_n / (3 * (h_n + h_n_1))) / 2
                      + (1 - h_n / (2 * (h_n + h_n_1))) * h_n / (6 * (h_n + h_n_1 + h_n_2)))
                     * (h_n * (h_n + h_n_1) * (h_n + h_n_1 + h_n_2))
                     / (h_n_1 * (h_n_1 + h_n_2) * (h_n_1 + h_n_2 + h_n_3)))  # fmt: skip
            q = h_n_1 * (h_n_1 + h_n_2) / (h_n_2 * (h_n_2 + h_n_3))
            c1 = (2 + h_n / h_n_1) / 2 + temp1 + temp2
            c2 = -(h_n / h_n_1) / 2 - (1 + h_n_1 / h_n_2) * temp1 - (1 + h_n_1 / h_n_2 + q) * temp2
            c3 = temp1 * h_n_1 / h_n_2 + (h_n_1 / h_n_2 + q * (1 + h_n_2 / h_n_3)) * temp2
            c4 = -temp2 * q * h_n_1 / h_n_2
            x_next = x_cur + h_n * (c1 * d_cur + c2 * buffer[-1] + c3 * buffer[-2]
                                    + c4 * buffer[-3])  # fmt: skip
        if len(buffer) == max_order - 1:
            buffer = [*buffer[1:], d_cur] if max_order > 1 else buffer
        else:
            buffer.append(d_cur)
    return x_next


def ancestral(sigma_from, sigma_to, eta):
    if not eta:
        return sigma_to, torch.zeros(())
    up = torch.minimum(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2)
                                        / sigma_from**2) ** 0.5)  # fmt: skip
    return (sigma_to**2 - up**2) ** 0.5, up


def comfy_res_multistep(model, x, sigmas, eta=0.0, s_noise=1.0, noise_sampler=None):
    def phi1(t):
        return torch.expm1(t) / t

    def phi2(t):
        return (phi1(t) - 1.0) / t

    old_sigma_down = old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        sigma_down, sigma_up = ancestral(sigmas[i], sigmas[i + 1], eta)
        if sigma_down == 0 or old_denoised is None:
            x = x + (x - denoised) / sigmas[i] * (sigma_down - sigmas[i])
        else:
            t, t_old = sigmas[i].log().neg(), old_sigma_down.log().neg()
            t_next, t_prev = sigma_down.log().neg(), sigmas[i - 1].log().neg()
            h = t_next - t
            c2 = (t_prev - t_old) / h
            b1 = torch.nan_to_num(phi1(-h) - phi2(-h) / c2, nan=0.0)
            b2 = torch.nan_to_num(phi2(-h) / c2, nan=0.0)
            x = (-h).exp() * x + h * (b1 * denoised + b2 * old_denoised)
        if sigma_up > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        old_denoised, old_sigma_down = denoised, sigma_down
    return x


def comfy_gradient_estimation(model, x, sigmas, ge_gamma=2.0):
    old_d = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        d = (x - denoised) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            x = x + d * dt
            if i >= 1:
                x = x + (ge_gamma - 1) * (d - old_d) * dt
        old_d = d
    return x


def comfy_heunpp2(model, x, sigmas):
    """Without churn (ComfyUI draws its churn noise with torch.randn_like: no shared stream)."""
    s_end = sigmas[-1]
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        d = (x - denoised) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == s_end:
            x = x + d * dt
        elif sigmas[i + 2] == s_end:
            x_2 = x + d * dt
            d_2 = (x_2 - model(x_2, sigmas[i + 1])) / sigmas[i + 1]
            w2 = sigmas[i + 1] / (2 * sigmas[0])
            x = x + (d * (1 - w2) + d_2 * w2) * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - model(x_2, sigmas[i + 1])) / sigmas[i + 1]
            x_3 = x_2 + d_2 * (sigmas[i + 2] - sigmas[i + 1])
            d_3 = (x_3 - model(x_3, sigmas[i + 2])) / sigmas[i + 2]
            w2, w3 = sigmas[i + 1] / (3 * sigmas[0]), sigmas[i + 2] / (3 * sigmas[0])
            x = x + ((1 - w2 - w3) * d + w2 * d_2 + w3 * d_3) * dt
    return x


REFERENCES = {"ipndm": comfy_ipndm, "ipndm_v": comfy_ipndm_v, "heunpp2": comfy_heunpp2,
              "res_multistep": comfy_res_multistep,
              "res_multistep_ancestral": comfy_res_multistep,
              "gradient_estimation": comfy_gradient_estimation}  # fmt: skip


def schedule(name: str, steps: int) -> torch.Tensor:
    levels = toolkit.NoiseLevels.continuous(0.002, 80.0)
    if name == "karras":
        return toolkit.schedule("karras")(steps, levels)
    return toolkit.schedule("exponential")(steps, levels)


@pytest.fixture(scope="module")
def denoise():
    mu = torch.randn(SAMPLE_SHAPE, generator=torch.Generator().manual_seed(100),
                     dtype=torch.float64) * DATA_STD  # fmt: skip
    return gaussian_denoiser(mu, DATA_STD, wiggle=0.3)


@pytest.mark.parametrize("name", ["ipndm", "ipndm_v"])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("grid", ["karras", "exponential"])
def test_equal_to_comfyui(denoise, name, order, grid):
    sigmas = schedule(grid, 12)
    x = torch.randn(SAMPLE_SHAPE, generator=torch.Generator().manual_seed(101),
                    dtype=torch.float64) * sigmas[0]  # fmt: skip
    theirs = REFERENCES[name](denoise, x, sigmas, max_order=order)

    def no_noise(sigma, sigma_next):
        raise AssertionError("a deterministic sampler asked for noise")

    ours = toolkit.sampler(name, order=order)(denoise, x, sigmas, noise=no_noise)
    assert rel_err(ours, theirs) <= TOL


def test_ipndm_v_differs_from_ipndm_on_uneven_steps(denoise):
    """The variable-step coefficients are not the equal-step ones on a Karras grid (their
    comparisons with ComfyUI above would pass for either otherwise)."""
    sigmas = schedule("karras", 12)
    x = torch.randn(SAMPLE_SHAPE, generator=torch.Generator().manual_seed(101),
                    dtype=torch.float64) * sigmas[0]  # fmt: skip
    fixed = toolkit.sampler("ipndm")(denoise, x, sigmas, noise=None)
    variable = toolkit.sampler("ipndm_v")(denoise, x, sigmas, noise=None)
    assert rel_err(fixed, variable) > 1e-3


def test_order_is_checked():
    with pytest.raises(toolkit.OptionError, match="order must be between 1 and 4"):
        toolkit.sampler("ipndm", order=5)


def test_on_equal_steps_the_variable_weights_are_adams_bashforths_up_to_third_order():
    """ipndm_v's weights reduce to ipndm's on equal steps at orders 2 and 3. At order 4
    ComfyUI's (diff-sampler's) weights do not: (2.375, -2.708, 1.792, -0.458) against
    Adams-Bashforth's (55, -59, 37, -9) / 24. They still sum to 1 (a consistent step), and
    we keep them, so that ipndm_v gives ComfyUI's images; order=3 is the accurate choice."""
    from plugins.samplers.ipndm import FIXED, variable_weights

    sigmas = [10.0, 9.0, 8.0, 7.0, 6.0, 5.0]
    for order in (2, 3):
        assert variable_weights(sigmas, 3, order) == pytest.approx(FIXED[order], rel=1e-12)
    comfy = variable_weights(sigmas, 3, 4)
    assert comfy == pytest.approx((57 / 24, -65 / 24, 43 / 24, -11 / 24), rel=1e-12)
    assert sum(comfy) == pytest.approx(1.0)


#: (our sampler, its options, the reference's keyword arguments)
RES_CASES = [
    ("res_multistep", {}, {}),
    ("res_multistep_ancestral", {}, {"eta": 1.0}),
    ("res_multistep_ancestral", {"eta": 0.5, "s_noise": 0.9}, {"eta": 0.5, "s_noise": 0.9}),
    ("gradient_estimation", {}, {}),
    ("gradient_estimation", {"gamma": 1.5}, {"ge_gamma": 1.5}),
    ("heunpp2", {}, {}),
]


@pytest.mark.parametrize(("name", "options", "reference"), RES_CASES)
@pytest.mark.parametrize("grid", ["karras", "exponential"])
def test_res_and_gradient_estimation_equal_comfyui(denoise, name, options, reference, grid):
    """The same fresh noise on both sides, asked for with the same (sigma, sigma_next)."""
    from sampling_helpers import NoiseStream

    sigmas = schedule(grid, 12)
    x = torch.randn(SAMPLE_SHAPE, generator=torch.Generator().manual_seed(101),
                    dtype=torch.float64) * sigmas[0]  # fmt: skip
    theirs_noise = NoiseStream(7, dtype=torch.float64)
    ours_noise = NoiseStream(7, dtype=torch.float64)
    extra = {"noise_sampler": theirs_noise} if name.startswith("res") else {}
    theirs = REFERENCES[name](denoise, x, sigmas, **reference, **extra)
    ours = toolkit.sampler(name, **options)(denoise, x, sigmas, noise=ours_noise)
    assert rel_err(ours, theirs) <= TOL
    flat = [s for call in ours_noise.calls for s in call]
    assert flat == pytest.approx([s for call in theirs_noise.calls for s in call], rel=1e-12)
    if name == "res_multistep_ancestral":
        assert len(ours_noise.calls) == 11  # every step but the last to sigma 0


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_res_multistep_is_dpmpp_2m_sde_heun_at_eta_0_and_1(denoise, eta):
    """Two names for one rule: ComfyUI's RES step to the ancestral sigma_down and DPM-Solver++
    (2M) SDE with the Heun correction agree to rounding at eta 0 (both deterministic) and 1
    (the same decay, noise and second-order term); between they split the noise otherwise."""
    from sampling_helpers import NoiseStream

    sigmas = schedule("karras", 12)
    x = torch.randn(SAMPLE_SHAPE, generator=torch.Generator().manual_seed(101),
                    dtype=torch.float64) * sigmas[0]  # fmt: skip

    def run(name: str, eta: float) -> torch.Tensor:
        noise = NoiseStream(7, dtype=torch.float64)
        return toolkit.sampler(name, eta=eta)(denoise, x, sigmas, noise=noise)

    assert rel_err(run("res_multistep_ancestral", eta), run("dpmpp_2m_sde_heun", eta)) <= 1e-12
    half = rel_err(run("res_multistep_ancestral", 0.5), run("dpmpp_2m_sde_heun", 0.5))
    assert half > 1e-2
