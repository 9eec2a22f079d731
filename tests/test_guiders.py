"""The diffusers-guider plugins (`plugins/guiders.py`: ``cfg_zero_star``, ``apg``, ``tcfg``,
``fdg``) and the ``space`` seam they use (`GuidedDenoiser` converting to the network's raw
output and back, `Model.output_space`).

Unit level: random raw outputs per branch at given x and sigma, on a VP epsilon model and a
rectified-flow one (first level sigma = inf), through our denoiser, equal diffusers' guider
driven as its modular pipelines drive it (``set_state``, ``prepare_inputs``, ``guider(...)``)
on the same outputs, step by step. Pipeline level: ``toolkit.generate`` on tiny random SD
and SD 3 folders equals the standard denoising loop with the diffusers guider, within 1/255.
"""

from __future__ import annotations

import json
import math
import types

import diffusers.guiders as guiders
import numpy as np
import pytest
import torch
from folders import capture_decoded, max_pixel_difference, pixels, prompts_file
from invoke import dtk

import toolkit
from toolkit.models.family import Conditioning, Model, NetworkModel
from toolkit.models.noise import FlowLevels, NoiseLevels
from toolkit.models.parameterization import VP, Flow
from toolkit.models.ve import VE
from toolkit.sampling.denoiser import GuidedDenoiser

BRANCHES = ("cond", "uncond")
SHAPE = (2, 4, 8, 8)
SD_CONFIG = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
#: sigmas of a short run on each kind: SD's largest training sigma first; a flow model's inf
SIGMAS = {"vp": [14.6, 4.0, 1.2, 0.3, 0.05], "flow": [math.inf, 4.0, 1.0, 0.25, 0.04]}
#: what float32 leaves of the round trip through x0 = a + b * output, relative to the
#: magnitudes involved (|a| / |b| and the output's): x0 keeps the output only to x0's
#: precision (measured: up to 1.3e-6, tcfg)
RELATIVE_TOL = 1e-5


def parameterization(kind: str):
    if kind == "vp":
        levels = NoiseLevels.from_scheduler_config(SD_CONFIG)
        return levels, VP(levels, "epsilon")
    levels = FlowLevels(1000, shift=3.0)
    return levels, Flow(levels)


class BranchConditioning(Conditioning):
    def inputs(self, branch: str, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
        return {"branch": torch.full((batch,), BRANCHES.index(branch))}


class TableModel(NetworkModel):
    """A model whose network outputs, for each branch, the tensor `outputs[branch]` (set per
    step): the raw outputs a guider combines, whatever the input."""

    def __init__(self, kind: str) -> None:
        levels, param = parameterization(kind)
        folder = types.SimpleNamespace(scheduler_config={})
        super().__init__(folder, torch.nn.Linear(1, 1), levels, param)
        self.outputs: dict[str, torch.Tensor] = {}
        self.calls: list[int] = []

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, x_in, t, branch):
        chunks = branch.split(len(self.outputs["cond"]))  # one per branch
        self.calls.append(len(chunks))
        return torch.cat([self.outputs[BRANCHES[int(c[0])]] for c in chunks])

    def conditioning(self, batch, text_branches) -> Conditioning:
        return BranchConditioning()


def run_guider(guider, step: int, steps: int, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """diffusers' guider on raw `outputs`, as its modular pipelines drive it."""
    guider.set_state(step=step, num_inference_steps=steps, timestep=torch.tensor(999 - step))
    batches = guider.prepare_inputs({"branch": BRANCHES})
    for batch in batches:
        batch.noise_pred = outputs[batch.branch]
    return guider(batches).pred


def compare(kind: str, ours, theirs, *, runs: int = 2, start_batch: bool = True,
            seed: int = 0) -> float:  # fmt: skip
    """The largest difference (relative, see RELATIVE_TOL) between our guidance through the
    denoiser and diffusers' guider over `runs` sampling runs of SIGMAS[kind] (fresh random
    outputs at every step); asserts every step's is within RELATIVE_TOL."""
    model = TableModel(kind)
    denoiser = GuidedDenoiser(model, ours, BranchConditioning())
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    sigmas = SIGMAS[kind]
    for run in range(runs):
        reset = toolkit.optional_member("guidance", ours, "start_batch")
        if start_batch and reset is not None:
            reset([{}] * SHAPE[0])
        for step, sigma in enumerate(sigmas):
            x = torch.randn(SHAPE, generator=generator) * (1 if math.isinf(sigma) else sigma + 1)
            model.outputs = {b: torch.randn(SHAPE, generator=generator) for b in BRANCHES}
            # the branches share most of their direction, as a network's outputs do
            model.outputs["cond"] = model.outputs["uncond"] + 0.3 * model.outputs["cond"]
            x0 = denoiser(x, sigma)
            pred = run_guider(theirs, step, len(sigmas), model.outputs)
            a, b = model.output_space(x, sigma)
            reference = model.parameterization.denoised(x, sigma, pred)
            # in output units (x0 - a is b times the output), relative to the magnitudes
            scale = float(a.abs().max() / b.abs().min() + pred.abs().max())
            diff = float(((x0 - reference) / b).abs().max()) / scale
            assert diff <= RELATIVE_TOL, f"{kind} run {run} step {step} (sigma {sigma}): {diff}"
            worst = max(worst, diff)
    return worst


CASES = {
    "cfg_zero_star": [
        ({"scale": 4.0}, {"guidance_scale": 4.0}),
        ({"scale": 6.0, "zero_init_steps": 2}, {"guidance_scale": 6.0, "zero_init_steps": 2}),
        ({"scale": 3.0, "use_zero_init": False, "guidance_rescale": 0.7,
          "use_original_formulation": True},
         {"guidance_scale": 3.0, "zero_init_steps": 0, "guidance_rescale": 0.7,
          "use_original_formulation": True}),
    ],
    "apg": [
        ({}, {}),
        ({"scale": 5.0, "eta": 0.0, "norm_threshold": 4.0, "momentum": -0.5},
         {"guidance_scale": 5.0, "eta": 0.0, "adaptive_projected_guidance_rescale": 4.0,
          "adaptive_projected_guidance_momentum": -0.5}),
        ({"scale": 3.0, "eta": 0.3, "norm_threshold": 0.0, "momentum": 0.5, "norm_dim": (2, 3),
          "guidance_rescale": 0.5, "use_original_formulation": True},
         {"guidance_scale": 3.0, "eta": 0.3, "adaptive_projected_guidance_rescale": 0.0,
          "adaptive_projected_guidance_momentum": 0.5,
          "adaptive_projected_guidance_norm_dim": (2, 3), "guidance_rescale": 0.5,
          "use_original_formulation": True}),
    ],
    "tcfg": [
        ({}, {}),
        ({"scale": 3.0, "guidance_rescale": 0.7, "use_original_formulation": True},
         {"guidance_scale": 3.0, "guidance_rescale": 0.7, "use_original_formulation": True}),
    ],
    "fdg": [
        ({}, {}),
        ({"scales": (8.0, 4.0, 2.0), "parallel_weights": (0.5, 1.0, 0.2),
          "guidance_rescale": 0.3},
         {"guidance_scales": [8.0, 4.0, 2.0], "parallel_weights": [0.5, 1.0, 0.2],
          "guidance_rescale": 0.3}),
        ({"scales": (6.0, 2.0), "parallel_weights": 0.4, "guidance_rescale": (0.5, 0.2),
          "guidance_rescale_space": "freq", "upcast_to_double": False,
          "use_original_formulation": True},
         {"guidance_scales": [6.0, 2.0], "parallel_weights": 0.4, "guidance_rescale": [0.5, 0.2],
          "guidance_rescale_space": "freq", "upcast_to_double": False,
          "use_original_formulation": True}),
    ],
}  # fmt: skip
CLASSES = {
    "cfg_zero_star": "ClassifierFreeZeroStarGuidance",
    "apg": "AdaptiveProjectedGuidance",
    "tcfg": "TangentialClassifierFreeGuidance",
    "fdg": "FrequencyDecoupledGuidance",
}


def diffusers_guider(name: str, options: dict):
    # diffusers' FDG builds its pyramids with kornia (a test dependency: pyproject.toml)
    return getattr(guiders, CLASSES[name])(**options)


@pytest.mark.parametrize("kind", ["vp", "flow"])
@pytest.mark.parametrize(
    ("name", "case"), [(name, i) for name, cases in CASES.items() for i in range(len(cases))]
)
def test_equals_the_diffusers_guider_on_raw_outputs(name, case, kind):
    ours_options, theirs_options = CASES[name][case]
    ours = toolkit.guidance(name, **ours_options)
    assert ours.space == "output"
    worst = compare(kind, ours, diffusers_guider(name, theirs_options))
    print(f"{name} case {case} on {kind}: max relative difference {worst:.1e}")


@pytest.mark.parametrize("name", ["cfg_zero_star", "apg"])
def test_state_restarts_without_start_batch_when_sigma_rises(name):
    """A caller that never calls start_batch (a test's stand-in) still gets one run per
    descent: the step count (zero init) and the momentum restart when sigma rises."""
    ours_options, theirs_options = CASES[name][1]
    ours = toolkit.guidance(name, **ours_options)
    compare("vp", ours, diffusers_guider(name, theirs_options), start_batch=False)


def test_the_comparison_has_teeth():
    """Combining clean-image estimates (``space="denoised"``) instead of outputs differs."""
    ours_options, theirs_options = CASES["apg"][1]
    ours = toolkit.guidance("apg", **ours_options, space="denoised")
    with pytest.raises(AssertionError):
        compare("vp", ours, diffusers_guider("apg", theirs_options))


@pytest.mark.parametrize(
    ("name", "options"),
    [("apg", {"scale": 1.0}), ("tcfg", {"scale": 0.0, "use_original_formulation": True}),
     ("fdg", {"scales": (1.0, 1.0)}), ("cfg_zero_star", {"scale": 1.0, "use_zero_init": False})],
)  # fmt: skip
def test_an_identity_scale_skips_the_unconditional_pass(name, options):
    """Where diffusers' guider turns itself off (scale 1, or 0 from the conditional
    prediction) it runs the conditional batch alone: so do we, with its prediction."""
    model = TableModel("vp")
    guidance = toolkit.guidance(name, **options)
    denoiser = GuidedDenoiser(model, guidance, BranchConditioning())
    x = torch.randn(SHAPE)
    model.outputs = {b: torch.randn(SHAPE) for b in BRANCHES}
    x0 = denoiser(x, 3.0)
    assert model.calls == [1]
    torch.testing.assert_close(x0, model.parameterization.denoised(x, 3.0, model.outputs["cond"]))


def test_zero_init_steps_skip_the_unconditional_pass():
    model = TableModel("flow")
    guidance = toolkit.guidance("cfg_zero_star", zero_init_steps=2)
    denoiser = GuidedDenoiser(model, guidance, BranchConditioning())
    guidance.start_batch([{}, {}])
    x = torch.randn(SHAPE)
    model.outputs = {b: torch.randn(SHAPE) for b in BRANCHES}
    for sigma in SIGMAS["flow"][:3]:
        denoiser(x, sigma)
    assert model.calls == [1, 1, 2]
    # the zero velocity's estimate is the state itself at t = 1: x0 = x_t - t * 0
    guidance.start_batch([{}, {}])
    torch.testing.assert_close(denoiser(x, math.inf), x)


def test_fdg_with_a_level_left_unguided():
    """A level at scale 1 keeps its conditional band (diffusers' FDG appends the previous
    level's band there, which breaks its reconstruction; the paper's rule is this)."""
    from plugins.guiders import from_pyramid, laplacian_pyramid

    guidance = toolkit.guidance("fdg", scales=(5.0, 1.0), space="denoised")
    cond, uncond = torch.randn(SHAPE), torch.randn(SHAPE)
    (c0, c1), (u0, _) = laplacian_pyramid(cond, 2), laplacian_pyramid(uncond, 2)
    expected = from_pyramid([u0 + 5.0 * (c0 - u0), c1])
    torch.testing.assert_close(guidance({"cond": cond, "uncond": uncond}, 1.0), expected)


def test_fdg_pads_as_kornia_and_crops_back():
    """Sides that do not halve evenly are reflect-padded for the pyramid, as kornia does;
    diffusers then returns the padded size, we the sample's: its result, cropped."""
    theirs = diffusers_guider("fdg", {"guidance_scales": [7.0, 3.0]})
    ours = toolkit.guidance("fdg", scales=(7.0, 3.0))
    outputs = {b: torch.randn(2, 4, 12, 10) for b in BRANCHES}
    expected = run_guider(theirs, 0, 1, outputs)
    assert expected.shape[-2:] == (16, 16)
    torch.testing.assert_close(ours(outputs, 1.0), expected[..., :12, :10])


def test_fdg_refuses_more_levels_than_the_sample_has():
    guidance = toolkit.guidance("fdg", scales=(8.0, 6.0, 4.0, 2.0))
    with pytest.raises(toolkit.DtkError, match=r"fdg: 4 levels need samples of at least 16 px"):
        guidance({b: torch.randn(SHAPE) for b in BRANCHES}, 1.0)


# --- the seam -----------------------------------------------------------------------------


#: (parameterization, sigma): a flow model is also evaluated at sigma = inf (t = 1)
OUTPUT_SPACE_CASES = [
    *[(p, s) for p in ("eps", "v", "sample", "flow", "ve") for s in (0.02, 3.0, 80.0)],
    ("flow", math.inf),
]


@pytest.mark.parametrize(("param", "sigma"), OUTPUT_SPACE_CASES)
def test_output_space_is_exact_for_every_parameterization(param, sigma):
    levels = NoiseLevels.from_scheduler_config(SD_CONFIG)
    parameterizations = {
        "eps": VP(levels, "epsilon"),
        "v": VP(levels, "v_prediction"),
        "sample": VP(levels, "sample"),
        "flow": Flow(FlowLevels(1000, shift=3.0)),
        "ve": VE(),
    }
    model = TableModel("vp")
    model.parameterization = parameterizations[param]
    x, out = torch.randn(SHAPE), torch.randn(SHAPE)
    a, b = model.output_space(x, sigma)
    denoised = model.parameterization.denoised(x, sigma, out)
    torch.testing.assert_close(a + b * out, denoised, rtol=1e-5, atol=1e-5 * (1 + sigma**2))
    if param == "sample":
        assert float(a.abs().max()) == 0 and bool((b == 1).all())
    if param == "flow" and math.isinf(sigma):  # x_t = x, t = 1: x0 = x - v
        assert torch.equal(a, x) and bool((b == -1).all())


def test_the_unconditional_estimate_stays_a_clean_image_estimate():
    """CFG++ samplers read the uncond branch's estimate beside the guided one: it is the
    branch's x0 whatever space the guidance combines in."""
    model = TableModel("vp")
    denoiser = GuidedDenoiser(model, toolkit.guidance("tcfg"), BranchConditioning())
    x = torch.randn(SHAPE)
    model.outputs = {b: torch.randn(SHAPE) for b in BRANCHES}
    _, uncond = toolkit.with_unconditional(denoiser, x, 2.0)
    expected = model.parameterization.denoised(x, 2.0, model.outputs["uncond"])
    torch.testing.assert_close(uncond, expected)


def test_sigma_zero_gives_the_state_back():
    """b = 0 at sigma 0 (every output gives x0 = x): no division by it."""
    model = TableModel("vp")
    denoiser = GuidedDenoiser(model, toolkit.guidance("apg"), BranchConditioning())
    x = torch.randn(SHAPE)
    model.outputs = {b: torch.randn(SHAPE) for b in BRANCHES}
    torch.testing.assert_close(denoiser(x, 0.0), x)


def test_per_sample_sigmas_are_converted_per_sample():
    model = TableModel("vp")
    ours = toolkit.guidance("apg", eta=0.0)
    theirs = diffusers_guider("apg", {"eta": 0.0})
    denoiser = GuidedDenoiser(model, ours, BranchConditioning())
    x = torch.randn(SHAPE)
    model.outputs = {b: torch.randn(SHAPE) for b in BRANCHES}
    sigma = torch.tensor([3.0, 3.0])
    expected = model.parameterization.denoised(x, sigma, run_guider(theirs, 0, 1, model.outputs))
    torch.testing.assert_close(denoiser(x, sigma), expected)


class BareModel(Model):
    """A model that does not say how its output relates to its estimate."""

    noise_levels = None
    folder = types.SimpleNamespace(scheduler_config={})
    device = torch.device("cpu")

    def denoise(self, x, sigma, **inputs):
        return x * 0.5

    def prior(self, eps, sigma):
        return eps

    def conditioning(self, batch, text_branches):
        return BranchConditioning()


def test_an_output_space_guidance_on_a_model_without_one_is_one_line():
    stand_in = types.SimpleNamespace(noise_levels=None, scheduler_config={})
    message = r"^guidance 'apg' combines the network's raw outputs \(space 'output'\), and "
    with pytest.raises(toolkit.DtkError, match=message + "SimpleNamespace does not say") as info:
        GuidedDenoiser(stand_in, toolkit.guidance("apg"), BranchConditioning())
    assert "\n" not in str(info.value)
    denoiser = GuidedDenoiser(BareModel(), toolkit.guidance("fdg"), BranchConditioning())
    with pytest.raises(toolkit.DtkError, match=r"and BareModel does not say"):
        denoiser(torch.randn(SHAPE), 1.0)
    # combining clean-image estimates needs no conversion
    plain = GuidedDenoiser(BareModel(), toolkit.guidance("apg", space="denoised"),
                           BranchConditioning())  # fmt: skip
    assert plain(torch.ones(SHAPE), 1.0).shape == SHAPE


def test_a_guidance_with_another_space_is_refused():
    class Odd:
        name, branches, space = "odd", ("cond",), "eps"

        def __call__(self, preds, sigma):
            return preds["cond"]

    with pytest.raises(toolkit.DtkError, match=r"^guidance 'odd' has space 'eps'; a guidance"):
        GuidedDenoiser(TableModel("vp"), Odd(), BranchConditioning())


# --- options ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("apg", {"eta": math.nan}, "apg: eta must be a finite number"),
        ("apg", {"norm_threshold": -1.0}, "apg: norm_threshold must be a finite number >= 0"),
        ("apg", {"momentum": math.inf}, "apg: momentum must be a finite number"),
        ("apg", {"norm_dim": 0}, "apg: norm_dim must name sample dimensions"),
        ("apg", {"norm_dim": (1, 0)}, "apg: norm_dim must name sample dimensions"),
        ("apg", {"space": "eps"}, "bad value 'eps' for option 'space' of guidance 'apg'"),
        ("tcfg", {"scale": math.inf}, "tcfg: scale must be a finite number"),
        ("tcfg", {"guidance_rescale": 1.5}, r"tcfg: guidance_rescale must be in \[0, 1\]"),
        ("cfg_zero_star", {"zero_init_steps": -1}, "zero_init_steps must be at least 0"),
        ("fdg", {"scales": ()}, "fdg: scales needs at least one level"),
        ("fdg", {"scales": (4.0, math.nan)}, "fdg: each of scales must be a finite number"),
        ("fdg", {"parallel_weights": (0.5,)},
         r"fdg: parallel_weights needs one value or one per level of scales \(2\), got 1"),
        ("fdg", {"guidance_rescale": (0.1, 0.2, 0.3)},
         r"fdg: guidance_rescale needs one value or one per level of scales \(2\), got 3"),
        ("fdg", {"guidance_rescale_space": "pixels"}, "bad value 'pixels' for option"),
    ],
)  # fmt: skip
def test_bad_options_are_one_line(name, options, message):
    with pytest.raises(toolkit.OptionError, match=message) as info:
        toolkit.guidance(name, **options)
    assert "\n" not in str(info.value)


def test_command_line_options():
    fdg = toolkit.create_plugin("guidance", "fdg", {"scales": "8,4,2", "parallel_weights": "0.5",
                                                    "guidance_rescale": "0.1,0.2,0.3"},
                                from_strings=True)  # fmt: skip
    assert fdg.scales == (8.0, 4.0, 2.0) and fdg.parallel_weights == (0.5, 0.5, 0.5)
    assert fdg.rescales == (0.1, 0.2, 0.3)
    options = {"momentum": "none", "norm_dim": "1", "space": "denoised"}
    apg = toolkit.create_plugin("guidance", "apg", options, from_strings=True)
    assert apg.momentum is None and apg.norm_dim == 1 and apg.space == "denoised"
    zero = toolkit.create_plugin("guidance", "cfg_zero_star", {"use_zero_init": "false"},
                                 from_strings=True)  # fmt: skip
    assert zero.use_zero_init is False and zero.active(math.inf) == ("cond", "uncond")


# --- pipeline level -----------------------------------------------------------------------

CAT, DOG, NEG = "a photo of a cat", "a photo of a dog", "blurry"
DDIM = dict(sampler="ddim", schedule="leading", schedule_options={"offset": 1}, progress=False)
#: the pipeline-level runs: our guidance and options, diffusers' guider options
PIPELINE_CASES = {
    "apg": ({"scale": 7.5, "eta": 0.0, "norm_threshold": 2.0, "momentum": -0.5},
            {"guidance_scale": 7.5, "eta": 0.0, "adaptive_projected_guidance_rescale": 2.0,
             "adaptive_projected_guidance_momentum": -0.5}),
    "cfg_zero_star": ({"scale": 7.5}, {"guidance_scale": 7.5}),
    "tcfg": ({"scale": 7.5}, {"guidance_scale": 7.5}),
    "fdg": ({"scales": (10.0, 4.0), "parallel_weights": 0.5},
            {"guidance_scales": [10.0, 4.0], "parallel_weights": 0.5}),
}  # fmt: skip
#: latents of two float32 runs of the same math, in different orders
LATENT_TOL = 1e-4


def start(seed: int, n: int, shape=(4, 8, 8)) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed + i))
                        for i in range(n)])  # fmt: skip


def guided_loop(guider, scheduler, latents, steps, inputs, network):
    """The standard denoising loop with a diffusers guider (its modular pipelines' way):
    one network call per guider batch, the guider on the outputs, the scheduler's step."""
    scheduler.set_timesteps(steps)
    # a flow-matching scheduler feeds the state as it is
    scale_input = getattr(scheduler, "scale_model_input", lambda latents, t: latents)
    for i, t in enumerate(scheduler.timesteps):
        guider.set_state(step=i, num_inference_steps=steps, timestep=t)
        batches = guider.prepare_inputs(inputs)
        for batch in batches:
            batch.noise_pred = network(scale_input(latents, t), t, batch)
        latents = scheduler.step(guider(batches).pred, t, latents).prev_sample
    return latents


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    from tiny_sd import save_sd_pipeline

    return save_sd_pipeline(tmp_path_factory.mktemp("models") / "sd")


@pytest.fixture
def decoded(monkeypatch):
    """The latents each of our runs decodes, in order."""
    from toolkit.models.sd3 import StableDiffusion3
    from toolkit.models.stable_diffusion import StableDiffusion

    return capture_decoded(monkeypatch, StableDiffusion, StableDiffusion3)


def diffusers_sd_guided(folder, guider, prompts, seed, steps):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompts, "cpu", 1, True, [NEG] * len(prompts))

        def unet(latents, t, batch):
            return pipe.unet(latents, t, encoder_hidden_states=batch.encoder_hidden_states).sample

        latents = start(seed, len(prompts)) * pipe.scheduler.init_noise_sigma
        latents = guided_loop(guider, pipe.scheduler, latents, steps,
                              {"encoder_hidden_states": (cond, uncond)}, unet)  # fmt: skip
        images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    images = pipe.image_processor.postprocess(images, output_type="np")
    return latents, np.round(images * 255).astype(np.int16)


@pytest.mark.parametrize("name", list(PIPELINE_CASES))
def test_sd_generate_equals_the_loop_with_the_diffusers_guider(sd, tmp_path, decoded, name):
    ours_options, theirs_options = PIPELINE_CASES[name]
    out = tmp_path / name
    generate_options = dict(out=out, prompt=[CAT, DOG], negative_prompt=NEG, n=2, seed=3,
                            steps=5, **DDIM)  # fmt: skip
    toolkit.generate(sd, guidance=name, guidance_options=ours_options, **generate_options)
    latents, images = diffusers_sd_guided(sd, diffusers_guider(name, theirs_options),
                                          [CAT, DOG], seed=3, steps=5)  # fmt: skip
    latent_diff = float((decoded[0] - latents).abs().max())
    pixel_diff = max_pixel_difference(pixels(out), images)
    print(f"SD {name}: latents {latent_diff:.2e}, pixels {pixel_diff}/255")
    assert latent_diff <= LATENT_TOL
    assert pixel_diff <= 1
    # the comparison has teeth: plain CFG at the same scale lands elsewhere
    toolkit.generate(sd, guidance="cfg", guidance_options={"scale": 7.5},
                     **{**generate_options, "out": tmp_path / "cfg"})  # fmt: skip
    assert float((decoded[1] - latents).abs().max()) > 100 * LATENT_TOL


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    from tiny_sd3 import save_sd3_pipeline

    return save_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "sd3")


def diffusers_sd3_guided(folder, guider, prompts, seed, steps):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompts, None, None, negative_prompt=[NEG] * len(prompts), device="cpu"
        )

        def transformer(latents, t, batch):
            return pipe.transformer(hidden_states=latents, timestep=t.expand(latents.shape[0]),
                                    encoder_hidden_states=batch.encoder_hidden_states,
                                    pooled_projections=batch.pooled_projections).sample  # fmt: skip

        inputs = {"encoder_hidden_states": (embeds, negative),
                  "pooled_projections": (pooled, negative_pooled)}  # fmt: skip
        latents = guided_loop(guider, pipe.scheduler, start(seed, len(prompts)), steps, inputs,
                              transformer)  # fmt: skip
        vae = pipe.vae
        images = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample
    images = pipe.image_processor.postprocess(images, output_type="np")
    return latents, np.round(images * 255).astype(np.int16)


@pytest.mark.parametrize("name", list(PIPELINE_CASES))
def test_sd3_generate_equals_the_loop_with_the_diffusers_guider(sd3, tmp_path, decoded, name):
    """A rectified-flow model (FlowMatchEulerDiscreteScheduler is our euler on the flow
    schedule): the guider combines velocities, and our first step is at sigma = inf
    (t = 1), where the conversion is exact. Through the command line, options as text."""
    ours_options, theirs_options = PIPELINE_CASES[name]
    out = tmp_path / name
    options = [("--guidance-option", f"{key}={','.join(map(str, value))}"
                if isinstance(value, tuple) else f"{key}={value}")
               for key, value in ours_options.items()]  # fmt: skip
    result = dtk("generate", "--model", sd3, "--prompts-file",
                 prompts_file(tmp_path, CAT, DOG, negative=NEG), "--sampler", "euler",
                 "--schedule", "flow", "--steps", 6, "--seed", 5, "--guidance", name,
                 *(part for option in options for part in option), "--out", out, "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    run = json.loads((out / "run.json").read_text())
    assert run["guidance"]["name"] == name
    latents, images = diffusers_sd3_guided(sd3, diffusers_guider(name, theirs_options),
                                           [CAT, DOG], seed=5, steps=6)  # fmt: skip
    latent_diff = float((decoded[0] - latents).abs().max())
    pixel_diff = max_pixel_difference(pixels(out), images)
    print(f"SD3 {name}: latents {latent_diff:.2e}, pixels {pixel_diff}/255")
    assert latent_diff <= LATENT_TOL
    assert pixel_diff <= 1
    toolkit.generate(sd3, out=tmp_path / "cfg", prompt=[CAT, DOG], negative_prompt=NEG, n=2,
                     seed=5, steps=6, sampler="euler", schedule="flow", guidance="cfg",
                     guidance_options={"scale": 7.5}, progress=False)  # fmt: skip
    assert float((decoded[1] - latents).abs().max()) > 100 * LATENT_TOL
