"""ComfyUI's schedulers (`plugins.comfy_schedules`) against ComfyUI's formulas.

ComfyUI cannot be installed here (it is an application, not a package on PyPI), so the
reference below restates its ``comfy/samplers.py`` scheduler functions and the two model
samplings they read (``ModelSamplingDiscrete`` for VP models, ``ModelSamplingDiscreteFlow``
for SD 3-style flow models) the way ComfyUI computes them: torch, float32 tables, its own
loops. Our schedules are float64 numpy; the two agree to float32 rounding. Beyond the
restatement, each schedule's defining property is checked on its own, and every one samples
a VP and a flow model.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import toolkit
from toolkit.models.noise import FlowLevels

STEPS = (1, 3, 7, 10, 20, 50)
SHIFT = 3.0
#: relative: ComfyUI builds SD's table from float64 betas, diffusers' config (which we read)
#: from float32 ones; the smallest sigma differs by 1.3e-5 between the two tables
TOL = 1e-4


# -- ComfyUI's model samplings and schedulers, as it computes them --------------------------


class ComfyDiscrete:
    """ComfyUI's ModelSamplingDiscrete for SD's scaled-linear betas (its "linear")."""

    def __init__(self, n: int = 1000) -> None:
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, n, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).float()
        self.log_sigmas = self.sigmas.log()
        self.sigma_min, self.sigma_max = self.sigmas[0], self.sigmas[-1]

    def timestep(self, sigma):
        dists = torch.as_tensor(sigma).log() - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(torch.as_tensor(sigma).shape)

    def sigma(self, timestep):
        t = torch.clamp(torch.as_tensor(timestep).float(), min=0, max=len(self.sigmas) - 1)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()


class ComfyFlow:
    """ComfyUI's ModelSamplingDiscreteFlow (SD 3): its "sigmas" are the shifted times."""

    def __init__(self, shift: float = SHIFT, n: int = 1000) -> None:
        self.shift, self.multiplier = shift, n
        self.sigmas = self.sigma(torch.arange(1, n + 1, dtype=torch.float32))
        self.sigma_min, self.sigma_max = self.sigmas[0], self.sigmas[-1]

    def timestep(self, sigma):
        return sigma * self.multiplier

    def sigma(self, timestep):
        t = torch.as_tensor(timestep, dtype=torch.float32) / self.multiplier
        return self.shift * t / (1 + (self.shift - 1) * t)


def comfy_simple(s, steps):
    stride = len(s.sigmas) / steps
    return [float(s.sigmas[-(1 + int(x * stride))]) for x in range(steps)] + [0.0]


def comfy_ddim_uniform(s, steps):
    levels, x = [0.0], 1
    stride = max(len(s.sigmas) // steps, 1)
    while x < len(s.sigmas):
        levels.append(float(s.sigmas[x]))
        x += stride
    return levels[::-1]


def comfy_normal(s, steps, sgm=False):
    start, end = s.timestep(s.sigma_max), s.timestep(s.sigma_min)
    if sgm:
        timesteps = torch.linspace(float(start), float(end), steps + 1)[:-1]
    else:
        timesteps = torch.linspace(float(start), float(end), steps)
    return [float(s.sigma(t)) for t in timesteps] + [0.0]


def comfy_linear_quadratic(s, steps, threshold_noise=0.025, linear_steps=None):
    if steps == 1:
        schedule = [1.0, 0.0]
    else:
        linear_steps = steps // 2 if linear_steps is None else linear_steps
        ramp = [i * threshold_noise / linear_steps for i in range(linear_steps)]
        diff = linear_steps - threshold_noise * steps
        rest = steps - linear_steps
        quadratic = diff / (linear_steps * rest**2)
        slope = threshold_noise / linear_steps - 2 * diff / rest**2
        const = quadratic * linear_steps**2
        ramp += [quadratic * i**2 + slope * i + const for i in range(linear_steps, steps)]
        schedule = [1.0 - x for x in [*ramp, 1.0]]
    return (torch.tensor(schedule) * s.sigma_max).tolist()


def comfy_kl_optimal(s, steps):
    ramp = torch.arange(steps, dtype=torch.float32) / max(steps - 1, 1)
    low, high = math.atan(float(s.sigma_min)), math.atan(float(s.sigma_max))
    return [*(ramp * low + (1 - ramp) * high).tan().tolist(), 0.0]


REFERENCE = {
    "simple": comfy_simple,
    "ddim_uniform": comfy_ddim_uniform,
    "normal": comfy_normal,
    "sgm_uniform": lambda s, steps: comfy_normal(s, steps, sgm=True),
    "linear_quadratic": comfy_linear_quadratic,
    "kl_optimal": comfy_kl_optimal,
}


# -- ours -----------------------------------------------------------------------------------


def vp_levels() -> toolkit.NoiseLevels:
    return toolkit.NoiseLevels.from_scheduler_config(
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
         "num_train_timesteps": 1000})  # fmt: skip


def as_times(sigmas: torch.Tensor) -> np.ndarray:
    """Our flow sigmas as ComfyUI's times ``t = sigma / (1 + sigma)`` (inf: 1)."""
    s = sigmas.numpy()
    with np.errstate(invalid="ignore"):
        return np.where(np.isinf(s), 1.0, s / (1 + s))


@pytest.mark.parametrize("name", list(REFERENCE))
@pytest.mark.parametrize("steps", STEPS)
def test_equal_to_comfyui_on_a_vp_model(name, steps):
    ours = toolkit.schedule(name)(steps, vp_levels()).numpy()
    theirs = np.asarray(REFERENCE[name](ComfyDiscrete(), steps))
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, rtol=TOL, atol=0)


@pytest.mark.parametrize("name", list(REFERENCE))
@pytest.mark.parametrize("steps", STEPS)
def test_equal_to_comfyui_on_a_flow_model(name, steps):
    """ComfyUI's flow levels are times; ours are sigma = t / (1 - t) of the same times."""
    ours = as_times(toolkit.schedule(name)(steps, FlowLevels(shift=SHIFT)))
    theirs = np.asarray(REFERENCE[name](ComfyFlow(), steps))
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, rtol=TOL, atol=0)


# -- each schedule's defining property, on its own ------------------------------------------


def test_sgm_uniform_spaces_steps_plus_one_timesteps_and_drops_the_last():
    levels = vp_levels()
    sigmas = toolkit.schedule("sgm_uniform")(10, levels)
    timesteps = levels.sigma_to_t(sigmas[:-1]).double().numpy()
    # timesteps 999 - k * 99.9: evenly spaced, one interval short of 0
    np.testing.assert_allclose(np.diff(timesteps), -99.9, atol=0.05)
    assert timesteps[0] == pytest.approx(999, abs=0.01)
    assert timesteps[-1] == pytest.approx(99.9, abs=0.05)


def test_kl_optimal_is_even_in_arctan():
    levels = vp_levels()
    angles = np.arctan(toolkit.schedule("kl_optimal")(8, levels)[:-1].numpy())
    np.testing.assert_allclose(np.diff(angles), np.diff(angles)[0], rtol=1e-9)
    assert angles[0] == pytest.approx(math.atan(levels.sigma_max))
    assert angles[-1] == pytest.approx(math.atan(levels.sigma_min))


def test_ddim_uniform_takes_comfyuis_count_of_steps():
    """1000 training steps: 10 steps take every 100th level; 7 take every 142nd, which is 8
    levels (ComfyUI's count, kept)."""
    levels = vp_levels()
    assert len(toolkit.schedule("ddim_uniform")(10, levels)) == 11
    sigmas = toolkit.schedule("ddim_uniform")(7, levels)
    assert len(sigmas) == 9
    np.testing.assert_allclose(sigmas[:-1].numpy(), levels.sigmas.double().numpy()[1::142][::-1])


def test_simple_on_a_flow_model_starts_from_pure_noise():
    sigmas = toolkit.schedule("simple")(4, FlowLevels(shift=SHIFT))
    assert math.isinf(float(sigmas[0])) and float(sigmas[-1]) == 0


def test_a_continuous_model_is_refused_in_one_line():
    with pytest.raises(toolkit.DtkError, match="reads a model's discrete training noise"):
        toolkit.schedule("normal")(5, toolkit.NoiseLevels.continuous(0.01, 80.0))


@pytest.mark.parametrize(
    ("options", "message"),
    [({"threshold_noise": 1.5}, "threshold_noise must be in"),
     ({"linear_steps": 0}, "linear_steps must be at least 1")],
)  # fmt: skip
def test_linear_quadratic_options_are_checked(options, message):
    with pytest.raises(toolkit.DtkError, match=message):
        toolkit.schedule("linear_quadratic", **options)


# -- every one samples a VP and a flow model -------------------------------------------------


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    from tiny_sd3 import save_sd3_pipeline

    return save_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "sd3")


@pytest.mark.parametrize("name", list(REFERENCE))
def test_each_samples_the_shipped_model_and_a_flow_model(name, sd3, tmp_path):
    for model, extra in ((None, {"conditions": {"digit": "3"}}),
                         (sd3, {"prompt": "a photo of a cat"})):  # fmt: skip
        out = tmp_path / ("vp" if model is None else "flow")
        written = toolkit.generate(model, out=out, n=2, steps=4, schedule=name,
                                   sampler="euler", progress=False, **extra)  # fmt: skip
        assert len(written) == 2 and set(written["schedule"]) == {name}
