"""Rectified flow in sigma space (``sigma = t / (1 - t)``): our samplers on a flow model's
velocity network equal diffusers' flow schedulers, from ``t = 1`` (``sigma = inf``) exactly.

The network here is a small random convolution of ``(x_t, t)``: the comparison is of the
sampling math, which a trained model would only make harder to read.
"""

from __future__ import annotations

import math

import diffusers
import pytest
import torch

import toolkit
from toolkit.models.noise import FlowLevels
from toolkit.models.parameterization import Flow
from toolkit.sampling.engine import integrate

SHAPE = (2, 4, 8, 8)
N = 1000


class Velocity(torch.nn.Module):
    """A fixed random velocity field v(x_t, t) that depends on both its inputs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x_t: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        t = (timestep.float() / N).view(-1, 1, 1, 1)
        return torch.tanh(self.conv(x_t)) * (0.5 + t) + 0.3 * x_t


@pytest.fixture(scope="module")
def net() -> Velocity:
    return Velocity().eval()


def eps() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))


def ours(net, levels, sampler, schedule, steps, timesteps=None) -> torch.Tensor:
    """Our sampling; with `timesteps`, the network is handed the nearest of them instead of
    the exact timestep (what a scheduler that rounds its timesteps hands it)."""
    flow = Flow(levels)

    def denoise(x, sigma):
        x_t, timestep = flow.inputs(x, sigma)
        if timesteps is not None:
            nearest = (timesteps.double()[None, :] - timestep.double()[:, None]).abs().argmin(1)
            assert ((timesteps[nearest] - timestep).abs() <= 1).all()
            timestep = timesteps[nearest].float()
        return flow.denoised(x, sigma, net(x_t, timestep))

    sigmas = schedule(steps, levels)
    x = flow.prior(eps(), float(sigmas[0]))
    with torch.no_grad():
        return integrate(sampler, denoise, x, sigmas, lambda s, n: torch.randn(SHAPE))


def diffusers_loop(net, scheduler, steps, **timesteps) -> torch.Tensor:
    scheduler.set_timesteps(steps, **timesteps)
    x = eps() * getattr(scheduler, "init_noise_sigma", 1.0)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(net(x, t.expand(SHAPE[0])), t, x, return_dict=False)[0]
    return x


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 4, 12])
def test_euler_equals_flow_match_euler(net, shift, steps):
    levels = FlowLevels(shift=shift)
    mine = ours(net, levels, toolkit.sampler("euler"), toolkit.schedule("flow"), steps)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    theirs = diffusers_loop(net, scheduler, steps)
    assert (mine - theirs).abs().max() <= 1e-4
    assert (mine - eps()).abs().max() > 0.1  # it moved


def test_euler_with_dynamic_shift_equals_flux_style_shifting(net):
    mu = 0.87
    mine = ours(net, FlowLevels(mu=mu), toolkit.sampler("euler"), toolkit.schedule("flow"), 6)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    theirs = diffusers_loop(net, scheduler, 6, mu=mu)
    assert (mine - theirs).abs().max() <= 1e-4


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [3, 10])
def test_dpmpp_2m_equals_dpm_solver_with_flow_sigmas(net, shift, steps):
    levels = FlowLevels(shift=shift)
    schedule = toolkit.schedule("flow", variant="dpmsolver")
    scheduler = diffusers.DPMSolverMultistepScheduler(
        use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift
    )
    theirs = diffusers_loop(net, scheduler, steps)
    # DPMSolverMultistepScheduler casts its timesteps to int64: the network sees floor(t N).
    # Given those, the update rules agree to rounding; our network gets the exact t N.
    emulated = ours(net, levels, toolkit.sampler("dpmpp_2m"), schedule, steps,
                    timesteps=scheduler.timesteps)  # fmt: skip
    assert (emulated - theirs).abs().max() <= 1e-4
    exact = ours(net, levels, toolkit.sampler("dpmpp_2m"), schedule, steps)
    assert 1e-5 < (exact - theirs).abs().max() <= 1e-2


def test_the_flow_schedules_are_diffusers_sigmas_in_sigma_space():
    levels = FlowLevels(shift=3.0)
    euler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    euler.set_timesteps(8)
    t = euler.sigmas.double()
    ours_ = toolkit.schedule("flow")(8, levels)
    assert math.isinf(ours_[0]) and ours_[-1] == 0
    torch.testing.assert_close(ours_[1:-1] / (1 + ours_[1:-1]), t[1:-1], rtol=1e-6, atol=0)


def test_vp_schedules_refuse_a_flow_model_and_flow_refuses_a_vp_one():
    with pytest.raises(toolkit.DtkError, match=r"rectified-flow model.*--schedule flow"):
        toolkit.schedule("karras")(10, FlowLevels())
    with pytest.raises(toolkit.DtkError, match="rectified-flow model: use --schedule flow"):
        toolkit.schedule("leading")(10, FlowLevels())
    vp = toolkit.NoiseLevels.from_scheduler_config({})
    with pytest.raises(toolkit.DtkError, match="'flow' is for rectified-flow models"):
        toolkit.schedule("flow")(10, vp)


def test_the_first_step_from_infinity_is_its_exact_limit(net):
    """From sigma = inf, every first-order step lands on x0 + sigma_1 eps; a huge finite
    start only approaches it (and loses it to rounding in float32)."""
    levels = FlowLevels(shift=1.0)
    flow = Flow(levels)
    e = eps()
    x_t, timestep = flow.inputs(e, math.inf)
    assert torch.equal(x_t, e) and float(timestep[0]) == N
    x0 = flow.denoised(e, math.inf, net(x_t, timestep))
    torch.testing.assert_close(x0, e - net(e, timestep))


# -- every built-in sampler on a flow model ------------------------------------------------

#: each ODE sampler in its deterministic form (the stochastic ones at eta 0): all integrate
#: the one probability-flow ODE, through the same change of variables
ODE_SAMPLERS = {
    "ddim": {}, "euler": {}, "heun": {}, "dpm_2": {}, "lms": {}, "dpmpp_2m": {}, "unipc": {},
    # ipndm_v at order 3: ComfyUI's order-4 weights are not fourth order (docs/samplers.md)
    "ipndm": {}, "ipndm_v": {"order": 3}, "res_multistep": {}, "gradient_estimation": {},
    "res_multistep_ancestral": {"eta": 0.0}, "heunpp2": {}, "dpmpp_2m_sde_heun": {"eta": 0.0},
    "euler_ancestral": {"eta": 0.0}, "dpm_2_ancestral": {"eta": 0.0},
    "dpmpp_2s_ancestral": {"eta": 0.0}, "dpmpp_sde": {"eta": 0.0},
    "dpmpp_2m_sde": {"eta": 0.0}, "dpmpp_3m_sde": {"eta": 0.0},
    # without guidance the CFG++ samplers are their plain namesakes (ComfyUI's 2S form is
    # not: docs/samplers.md, "CFG++")
    "euler_cfg_pp": {}, "euler_ancestral_cfg_pp": {"eta": 0.0}, "dpmpp_2m_cfg_pp": {},
    "dpmpp_2s_ancestral_cfg_pp": {"eta": 0.0, "stage2_uncond": "first"},
    "res_multistep_cfg_pp": {}, "res_multistep_ancestral_cfg_pp": {"eta": 0.0},
    "gradient_estimation_cfg_pp": {},
    "seeds_2": {"eta": 0.0}, "seeds_3": {"eta": 0.0}, "exp_heun_2_x0": {},
    "exp_heun_2_x0_sde": {"eta": 0.0},
    "deis": {}, "sa_solver": {"eta": 0.0}, "sa_solver_pece": {"eta": 0.0},
    "restart": {"restart_times": 0},
}  # fmt: skip
#: how much closer 100 steps must come than 10 (8: better than first order's 10 less the
#: noise of a float32 network); gradient_estimation, a first-order step plus a heuristic
#: correction, gains less on this field (measured: 2.6e-2 at 10 steps, 6.6e-3 at 100)
RATE = {"gradient_estimation": 3, "gradient_estimation_cfg_pp": 3}
#: built-in samplers documented as not applicable to a rectified-flow model (docs/samplers.md)
NOT_FOR_FLOW = {"lcm": "needs a discrete-time VP model", "tcd": "needs a discrete-time VP model"}
#: the diffusers sampler runs the model's own FlowMatchEulerDiscreteScheduler on its times
OWN_TIMES_ONLY = {"diffusers"}
#: k-diffusion's DPM-Solver samplers end at the last non-zero sigma, as ComfyUI runs them,
#: not at 0 (and dpm_adaptive picks its own steps): tests/test_samplers_comfyui_sde.py
#: checks them against the solution there; below they only run
TO_SIGMA_MIN = {"dpm_fast", "dpm_adaptive"}


def builtin_samplers() -> list[str]:
    from plugins.samplers import SAMPLERS

    return [cls.name for cls in SAMPLERS]


@pytest.fixture(scope="module")
def reference(net) -> torch.Tensor:
    """The flow ODE's solution from `eps()`, to about 1e-5: Heun, 500 steps."""
    return ours(net, FlowLevels(shift=3.0), toolkit.sampler("heun"), toolkit.schedule("flow"),
                500)  # fmt: skip


def test_the_ode_samplers_list_is_every_deterministic_builtin():
    stochastic_only = {"ddpm", "score_sde_ve", "er_sde"}  # no deterministic form
    listed = set(ODE_SAMPLERS) | stochastic_only | set(NOT_FOR_FLOW) | OWN_TIMES_ONLY
    assert listed | TO_SIGMA_MIN == set(builtin_samplers())


@pytest.mark.parametrize("name", list(ODE_SAMPLERS))
def test_every_ode_sampler_converges_to_the_flow_odes_solution(net, reference, name):
    """Beyond euler and dpmpp_2m (equal to diffusers' flow schedulers above), every ODE
    sampler runs through the same change of variables: from the exact first step at
    sigma = inf, its error against the ODE's solution shrinks with the steps (measured at
    100 steps: 3e-5 for lms to 7.5e-3 for the first-order ones, on values of size 3.5)."""
    sampler = toolkit.sampler(name, **ODE_SAMPLERS[name])
    levels, schedule = FlowLevels(shift=3.0), toolkit.schedule("flow")
    flow = Flow(levels)

    def solve(steps: int) -> torch.Tensor:
        sigmas = schedule(steps, levels)

        def denoise(x, sigma):
            return flow.denoised(x, sigma, net(*flow.inputs(x, sigma)))

        with torch.no_grad():
            return integrate(sampler, denoise, flow.prior(eps(), float(sigmas[0])), sigmas,
                             lambda s, n: torch.zeros(SHAPE))  # fmt: skip

    errors = [float((solve(steps) - reference).abs().max()) for steps in (10, 30, 100)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] <= 1e-2 and errors[2] < errors[0] / RATE.get(name, 8)


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """A tiny SD 3 model (rectified flow), loaded."""
    from tiny_sd3 import save_sd3_pipeline

    from toolkit.models import load_model

    return load_model(save_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "sd3"))


def flow_images(model, name: str, variant: str, steps: int = 3) -> torch.Tensor:
    from toolkit import SampleRequest
    from toolkit.sampling.engine import sample_images

    batch = [SampleRequest(index=k, seed=k, conditions={}, prompt=prompt)
             for k, prompt in enumerate(["a photo of a cat", "a red dog"])]  # fmt: skip
    sigmas = toolkit.schedule("flow", variant=variant)(steps, model.noise_levels)
    return sample_images(model, toolkit.sampler(name), toolkit.guidance("cfg", scale=7.0),
                         sigmas, batch)  # fmt: skip


@pytest.mark.parametrize("name", [n for n in builtin_samplers() if n not in NOT_FOR_FLOW])
def test_every_builtin_sampler_samples_a_flow_model(sd3, name):
    """Every built-in sampler but those not applicable gives finite images on an SD 3 model
    in a few steps, on both flow schedules (from sigma = inf, and from the finite start of
    DPM-Solver's); the diffusers sampler on the model's own times only."""
    variants = ("euler",) if name in OWN_TIMES_ONLY else ("euler", "dpmsolver")
    for variant in variants:
        images = flow_images(sd3, name, variant)
        assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
        assert images[0].std() > 0.01  # not blank


def test_what_does_not_apply_to_a_flow_model_is_refused(sd3):
    for name, message in NOT_FOR_FLOW.items():
        with pytest.raises(toolkit.DtkError, match=message):
            flow_images(sd3, name, "euler")
    with pytest.raises(toolkit.DtkError, match="run it with --schedule flow"):
        flow_images(sd3, "diffusers", "dpmsolver")
