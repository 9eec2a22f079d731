"""``pag``, ``seg`` and ``slg`` (plugins/perturbed_guidance.py) and the seam they use: a
guidance's ``perturbations`` run its perturbed branch in the same batched forward pass as
CFG's two, perturbing that branch's rows alone (toolkit/models/attention.py).

References, on tiny random folders built offline: diffusers' ``StableDiffusionPAGPipeline``
and ``StableDiffusion3PAGPipeline``; its ``SmoothedEnergyGuidance`` guider in a hand-written
loop (diffusers 0.42's pipelines take no guider); ``StableDiffusion3Pipeline`` with
``skip_guidance_layers``, which runs its skip-layer branch as a separate forward pass. Our
``ddim`` on ``leading`` timesteps + 1 (SD) and ``euler`` on ``flow`` (SD 3) step as the
folders' DDIMScheduler and FlowMatchEulerDiscreteScheduler, to float rounding in the latents.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from diffusers import (
    StableDiffusion3PAGPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPAGPipeline,
    StableDiffusionPipeline,
)
from folders import capture_decoded, made_once, max_pixel_difference, pixels
from invoke import dtk
from tiny_sd import pipeline_parts, spy_forwards

import toolkit
from toolkit import OptionError, Perturbation
from toolkit.errors import DtkError
from toolkit.models import load_model, open_model
from toolkit.models.sd3 import StableDiffusion3
from toolkit.models.stable_diffusion import StableDiffusion
from toolkit.registry.protocols import PERTURBATION_KINDS, SampleRequest
from toolkit.sampling.denoiser import GuidedDenoiser

CAT, NEG = "a photo of a cat", "blurry"
SD_LATENT = (4, 8, 8)
#: latents of two float32 runs of the same math, batched differently (measured: 4e-5 on SD's
#: latents of size ~17, 5e-6 on SD 3's)
LATENT_TOL = 1e-4
STEPS = 6
DDIM = dict(sampler="ddim", schedule="leading", schedule_options={"offset": 1}, progress=False)
FLOW = dict(sampler="euler", schedule="flow", progress=False)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return made_once(tmp_path_factory.mktemp("perturbed"))


@pytest.fixture
def decoded(monkeypatch):
    """The latents each run decodes, in order."""
    return capture_decoded(monkeypatch, StableDiffusion, StableDiffusion3)


def start(seed: int, n: int, shape=SD_LATENT) -> torch.Tensor:
    """Our per-sample start: sample i from its own generator seeded seed + i."""
    return torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed + i))
                        for i in range(n)])  # fmt: skip


def as_pixels(images: np.ndarray) -> np.ndarray:
    return np.round(images * 255).astype(np.int16)


def ours(folder, out, guidance, options, *, n=2, seed=4, negative=None, sampling=DDIM):
    toolkit.generate(folder, out=out, prompt=CAT, negative_prompt=negative, n=n, seed=seed,
                     steps=STEPS, guidance=guidance, guidance_options=options,
                     **sampling)  # fmt: skip
    return pixels(out)


# -- pag ------------------------------------------------------------------------------------


def diffusers_pag(folder, n, seed, output_type="np", **kwargs):
    layers = kwargs.pop("pag_applied_layers", "mid")
    pipe = StableDiffusionPAGPipeline(**pipeline_parts(folder), pag_applied_layers=layers)
    pipe.set_progress_bar_config(disable=True)
    out = pipe([CAT] * n, num_inference_steps=STEPS, latents=start(seed, n),
               output_type=output_type, **kwargs).images  # fmt: skip
    return out if output_type == "latent" else as_pixels(out)


#: our options, the pipeline's
PAG_CASES = {
    "cfg, mid": ({}, {"guidance_scale": 7.5, "pag_scale": 3.0}),
    "pag without cfg": ({"scale": 1.0}, {"guidance_scale": 1.0, "pag_scale": 3.0}),
    "down and up layers": ({"layers": ["down_blocks.0", "up"], "pag_scale": 2.0},
                           {"pag_applied_layers": ["down_blocks.0", "up"], "pag_scale": 2.0}),
}  # fmt: skip


@pytest.mark.parametrize("case", list(PAG_CASES))
def test_pag_equals_the_pag_pipeline(folders, tmp_path, decoded, case):
    options, theirs = PAG_CASES[case]
    images = ours(folders("sd"), tmp_path / "out", "pag", options)
    reference = diffusers_pag(folders("sd"), 2, 4, output_type="latent", **theirs)
    assert float((decoded[0] - reference).abs().max()) <= LATENT_TOL
    assert max_pixel_difference(images, diffusers_pag(folders("sd"), 2, 4, **theirs)) <= 1
    # the perturbed branch matters: without it (pag_scale 0) the latents move well beyond
    plain = diffusers_pag(folders("sd"), 2, 4, output_type="latent",
                          **{**theirs, "pag_scale": 0.0})  # fmt: skip
    assert float((decoded[0] - plain).abs().max()) > 0.05


def test_pag_on_sd3_equals_its_pag_pipeline(folders, tmp_path, decoded):
    """SD 3's joint attention: the image tokens see themselves among the image tokens and
    all text tokens (``PAGJointAttnProcessor2_0``); diffusers' default layer ``blocks.1``."""
    from tiny_sd3 import LATENT

    folder = folders("sd3")
    ours(folder, tmp_path / "out", "pag", {"scale": 7.0, "layers": ["blocks.1"]},
         negative=NEG, sampling=FLOW)  # fmt: skip

    def pipeline(pag_scale):
        pipe = StableDiffusion3PAGPipeline.from_pretrained(
            folder, text_encoder_3=None, tokenizer_3=None, pag_applied_layers=["blocks.1"]
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe([CAT] * 2, negative_prompt=[NEG] * 2, num_inference_steps=STEPS,
                    guidance_scale=7.0, pag_scale=pag_scale, latents=start(4, 2, LATENT),
                    output_type="latent").images  # fmt: skip

    assert float((decoded[0] - pipeline(3.0)).abs().max()) <= LATENT_TOL
    assert float((decoded[0] - pipeline(0.0)).abs().max()) > 0.01


# -- seg ------------------------------------------------------------------------------------

#: SEG's self-attention layers in the tiny UNet, as the guider's configs name them
SEG_BLOCKS = ("down_blocks.0.attentions.0.transformer_blocks",
              "mid_block.attentions.0.transformer_blocks",
              "up_blocks.1.attentions.0.transformer_blocks",
              "up_blocks.1.attentions.1.transformer_blocks")  # fmt: skip
SEG_LAYERS = ["down_blocks.0", "mid", "up_blocks.1"]


def guider_loop(folder, n, seed, *, seg_scale, blur_sigma, fixed_blur=False):
    """diffusers' ``SmoothedEnergyGuidance`` in the loop its modular pipelines run: the
    guider's state per step, a batch per enabled branch, its ``forward`` combining them. The
    SEG branch runs with the guider's own hook (``_apply_smoothed_energy_guidance_hook``),
    which its ``prepare_models`` never installs in 0.42 (it does not count the batches it
    prepares). `fixed_blur`: with the hook's infinite/finite branches swapped back
    (huggingface/diffusers#14187), each still diffusers' own code."""
    from diffusers.guiders import SmoothedEnergyGuidance
    from diffusers.hooks import HookRegistry
    from diffusers.hooks import smoothed_energy_guidance_utils as seg_utils

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(STEPS)
    cond, uncond = pipe.encode_prompt([CAT] * n, "cpu", 1, True, None)
    configs = [seg_utils.SmoothedEnergyGuidanceConfig(indices=[0], fqn=f) for f in SEG_BLOCKS]
    guider = SmoothedEnergyGuidance(
        guidance_scale=7.5,
        seg_guidance_scale=seg_scale,
        seg_blur_sigma=blur_sigma,
        seg_guidance_config=configs,
    )
    blur = seg_utils._gaussian_blur_2d
    if fixed_blur:

        def swapped(query, size, sigma, threshold):
            return blur(query, size, sigma, -math.inf if sigma <= threshold else math.inf)

        seg_utils._gaussian_blur_2d = swapped
    latents = start(seed, n) * scheduler.init_noise_sigma
    unet, hooks = pipe.unet, HookRegistry.check_if_exists_or_initialize(pipe.unet)
    try:
        with torch.no_grad():
            for i, t in enumerate(scheduler.timesteps):
                guider.set_state(step=i, num_inference_steps=STEPS, timestep=t)
                x = scheduler.scale_model_input(latents, t)
                preds = {"pred_cond": unet(x, t, encoder_hidden_states=cond).sample}
                if guider._is_cfg_enabled():
                    preds["pred_uncond"] = unet(x, t, encoder_hidden_states=uncond).sample
                if guider._is_seg_enabled():
                    for k, config in enumerate(configs):
                        seg_utils._apply_smoothed_energy_guidance_hook(
                            unet, config, guider.seg_blur_sigma, name=f"seg{k}")  # fmt: skip
                    preds["pred_cond_seg"] = unet(x, t, encoder_hidden_states=cond).sample
                    for k in range(len(configs)):
                        hooks.remove_hook(f"seg{k}", recurse=True)
                latents = scheduler.step(guider.forward(**preds).pred, t, latents).prev_sample
    finally:
        seg_utils._gaussian_blur_2d = blur
    return latents


#: our blur_sigma -> diffusers' (and whether its blur branches are swapped back)
SEG_CASES = {
    # diffusers 0.42 takes the mean for any finite sigma: ours at infinite blur
    "uniform queries": (9999999.0, 1.0, False),
    "uniform queries, fixed": (9999999.0, 9999999.0, True),
    "gaussian, sigma 0.5": (0.5, 0.5, True),
    "gaussian, sigma 2": (2.0, 2.0, True),
}


@pytest.mark.parametrize("case", list(SEG_CASES))
def test_seg_equals_the_smoothed_energy_guider(folders, tmp_path, decoded, case):
    ours_sigma, their_sigma, fixed = SEG_CASES[case]
    folder = folders("sd")
    # the guider's default window (start 0, stop 1) leaves step 0 out: our sigma window
    # ends between the first two noise levels
    levels = toolkit.NoiseLevels.from_scheduler_config(
        folder / "scheduler" / "scheduler_config.json"
    )
    sigmas = toolkit.schedule("leading", offset=1)(STEPS, levels)
    options = {"seg_scale": 8.0, "blur_sigma": ours_sigma, "layers": SEG_LAYERS,
               "hi": float(sigmas[0] + sigmas[1]) / 2}  # fmt: skip
    images = ours(folder, tmp_path / "out", "seg", options)
    reference = guider_loop(folder, 2, 4, seg_scale=8.0, blur_sigma=their_sigma,
                            fixed_blur=fixed)  # fmt: skip
    assert float((decoded[0] - reference).abs().max()) <= LATENT_TOL
    vae = StableDiffusionPipeline.from_pretrained(folder).vae
    theirs = vae.decode(reference / vae.config.scaling_factor).sample
    theirs = as_pixels((theirs / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).detach().numpy())
    assert max_pixel_difference(images, theirs) <= 1
    plain = guider_loop(folder, 2, 4, seg_scale=0.0, blur_sigma=their_sigma)
    assert float((decoded[0] - plain).abs().max()) > 0.05


def test_finite_blur_is_not_uniform(folders, tmp_path, decoded):
    """diffusers 0.42 ignores a finite blur (the mean either way); here it blurs."""
    options = {"seg_scale": 8.0, "layers": SEG_LAYERS}
    ours(folders("sd"), tmp_path / "inf", "seg", options)
    ours(folders("sd"), tmp_path / "half", "seg", {**options, "blur_sigma": 0.5})
    assert float((decoded[0] - decoded[1]).abs().max()) > 0.05


# -- slg ------------------------------------------------------------------------------------

#: skip_guidance_layers, skip_layer_guidance_start, skip_layer_guidance_stop
SLG_CASES = {"block 0": ([0], 0.01, 0.5), "block 1, the last": ([1], 0.01, 0.5),
             "both, later": ([0, 1], 0.2, 0.9)}  # fmt: skip


@pytest.mark.parametrize("case", list(SLG_CASES))
def test_slg_equals_the_sd3_pipeline(folders, tmp_path, decoded, case):
    """The pipeline runs the skip-layer branch as a second forward pass on the steps
    ``start * N < i < stop * N``; ours is a third branch of the one pass, on the noise
    levels of those steps."""
    from tiny_sd3 import LATENT

    layers, first, last = SLG_CASES[case]
    folder = folders("sd3")
    sigmas = toolkit.schedule("flow")(STEPS, open_model(folder).noise_levels)
    steps = [i for i in range(STEPS) if first * STEPS < i < last * STEPS]
    lo = float(sigmas[steps[-1]] + sigmas[steps[-1] + 1]) / 2
    hi = 2 * float(sigmas[steps[0]])  # step 0's sigma is infinite: never inside
    images = ours(folder, tmp_path / "out", "slg",
                  {"layers": [str(i) for i in layers], "lo": lo, "hi": hi}, negative=NEG,
                  sampling=FLOW)  # fmt: skip

    def pipeline(output_type, **kwargs):
        pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None,
                                                        tokenizer_3=None)  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        return pipe(
            [CAT] * 2,
            negative_prompt=[NEG] * 2,
            num_inference_steps=STEPS,
            latents=start(4, 2, LATENT),
            output_type=output_type,
            **kwargs,
        ).images

    skip = dict(skip_guidance_layers=layers, skip_layer_guidance_start=first,
                skip_layer_guidance_stop=last)  # fmt: skip
    assert float((decoded[0] - pipeline("latent", **skip)).abs().max()) <= LATENT_TOL
    assert max_pixel_difference(images, as_pixels(pipeline("np", **skip))) <= 1
    assert float((decoded[0] - pipeline("latent")).abs().max()) > 0.05


# -- every kind against diffusers' hooks ----------------------------------------------------


def pixart_hook(kind: str, block: int, blur_sigma: float):
    """What diffusers' own hooks do to PixArt's block `block` for perturbation `kind`
    (``LayerSkipConfig``, ``SmoothedEnergyGuidanceConfig``): (apply(network), name)."""
    from diffusers.hooks import LayerSkipConfig
    from diffusers.hooks.layer_skip import _apply_layer_skip_hook
    from diffusers.hooks.smoothed_energy_guidance_utils import (
        SmoothedEnergyGuidanceConfig,
        _apply_smoothed_energy_guidance_hook,
    )

    fqn = "transformer_blocks"
    if kind == "blur_query":
        config = SmoothedEnergyGuidanceConfig([block], fqn)
        return lambda net: _apply_smoothed_energy_guidance_hook(net, config, blur_sigma, "h")
    flags = {
        "skip_block": dict(skip_attention=True, skip_ff=True),
        "skip_attention": dict(skip_attention=True, skip_ff=False),
        "skip_ff": dict(skip_attention=False, skip_ff=True),
        "attention_scores": dict(skip_attention=False, skip_attention_scores=True, skip_ff=False),
        "identity_attention": dict(skip_attention=False, skip_attention_scores=True, skip_ff=False),
    }[kind]
    config = LayerSkipConfig([block], fqn, **flags)
    return lambda net: _apply_layer_skip_hook(net, config, name="h")


@pytest.mark.parametrize("kind", PERTURBATION_KINDS)
def test_each_kind_perturbs_as_diffusers_hooks_on_a_pixart(tmp_path, kind):
    """One forward pass of a PixArt (BasicTransformerBlock, AttnProcessor2_0: what diffusers'
    hook registries know) with block 1 perturbed, all rows; SEG at infinite blur, which
    diffusers 0.42 computes for a finite sigma (0.5 here: its blur branches are swapped)."""
    from diffusers.hooks import HookRegistry
    from tiny_pixart import save_pixart_pipeline

    model = load_model(save_pixart_pipeline(tmp_path / "pixart"))
    batch = [SampleRequest(i, i, {}, prompt=CAT) for i in range(2)]
    inputs = model.conditioning(batch, {}).inputs("cond", 2, model.device)
    x, sigma = start(2, 2) * 3.0, 3.0
    spec = Perturbation(kind, (1,))
    with torch.inference_mode():
        plain = model.denoise(x, sigma, **inputs)
        with model.perturbed({range(0, 2): spec}):
            ours = model.denoise(x, sigma, **inputs)
        pixart_hook(kind, 1, blur_sigma=0.5)(model.network)
        try:
            theirs = model.denoise(x, sigma, **inputs)
        finally:
            HookRegistry.check_if_exists_or_initialize(model.network).remove_hook("h", True)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert float((ours - plain).abs().max()) > 1e-3


# -- the seam -------------------------------------------------------------------------------


class Capture:
    """A guidance that keeps the estimates it is handed (and combines as `inner`)."""

    def __init__(self, inner):
        self.inner, self.preds = inner, None
        self.name, self.branches = inner.name, inner.branches
        self.perturbations = inner.perturbations

    def __call__(self, preds, sigma):
        self.preds = {k: v.clone() for k, v in preds.items()}
        return self.inner(preds, sigma)


def test_one_forward_per_step_perturbing_only_the_perturbed_rows(folders):
    model = load_model(folders("sd"))
    batch = [SampleRequest(i, 4 + i, {}, prompt=CAT) for i in range(2)]
    guidance = Capture(toolkit.guidance("pag", layers=["down_blocks.0", "mid"]))
    conditioning = model.conditioning(batch, {})
    denoise = GuidedDenoiser(model, guidance, conditioning)
    x, sigma = start(1, 2) * 3.0, 3.0
    with torch.inference_mode():
        denoise(x, sigma)
        assert denoise.forwards == 1
        preds = guidance.preds
        cond = conditioning.inputs("cond", 2, x.device)
        uncond = conditioning.inputs("uncond", 2, x.device)
        # the cond and uncond rows are a plain forward's (other batching: float rounding)
        torch.testing.assert_close(preds["cond"], model.denoise(x, sigma, **cond))
        torch.testing.assert_close(preds["uncond"], model.denoise(x, sigma, **uncond))
        # the perturbed rows: the cond inputs through the perturbed network
        spec = guidance.perturbations["perturbed"]
        with model.perturbed({range(0, 2): spec}):
            perturbed = model.denoise(x, sigma, **cond)
        torch.testing.assert_close(preds["perturbed"], perturbed)
        assert float((preds["perturbed"] - preds["cond"]).abs().max()) > 0.01
    # the hooks are gone afterwards, even when the pass fails
    assert not any(m._forward_hooks for m in model.network.modules())
    with pytest.raises(RuntimeError, match="boom"), model.perturbed({range(0, 1): spec}):
        assert any(m._forward_hooks for m in model.network.modules())
        raise RuntimeError("boom")
    assert not any(m._forward_hooks for m in model.network.modules())


def test_generate_runs_every_branch_in_one_unet_call_per_step(folders, tmp_path, monkeypatch):
    _, unet_batches = spy_forwards(monkeypatch)
    ours(folders("sd"), tmp_path / "pag", "pag", {})
    assert unet_batches == [6] * STEPS  # cond, uncond, perturbed: 2 samples each
    unet_batches.clear()
    # outside seg's noise levels its branch is left out of the pass
    # (the noise levels: 5.9, 2.9, 1.6, 0.93, 0.49, 0.04)
    ours(folders("sd"), tmp_path / "seg", "seg", {"lo": 1.0, "hi": 4.0})
    assert unet_batches == [4, 6, 6, 4, 4, 4]
    run = json.loads((tmp_path / "seg" / "run.json").read_text())
    assert run["guidance"]["name"] == "seg" and run["guidance"]["options"]["hi"] == 4.0


def test_the_shipped_label_model_takes_pag(tmp_path):
    """A label UNet's attention blocks (UNet2DModel: 4-d attention input, group norm,
    residual) perturb like a text UNet's; pag without CFG needs no null label."""
    common = dict(conditions={"digit": "3"}, n=2, seed=1, steps=4, progress=False)
    toolkit.generate(toolkit.default_model(), out=tmp_path / "cond", guidance="none", **common)
    toolkit.generate(toolkit.default_model(), out=tmp_path / "pag", guidance="pag",
                     guidance_options={"scale": 1.0, "pag_scale": 5.0}, **common)  # fmt: skip
    assert max_pixel_difference(pixels(tmp_path / "pag"), pixels(tmp_path / "cond")) > 4


# -- options and refusals -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("pag", {"pag_scale": -1.0}, "pag: pag_scale must be >= 0"),
        ("pag", {"pag_adaptive_scale": 0.1}, "pag_adaptive_scale is not supported"),
        ("pag", {"scale": math.nan}, "pag: scale must be a finite number"),
        ("pag", {"layers": []}, "layers are one or more layer names or block indices"),
        ("pag", {"layers": ["mid["]}, "layer 'mid[' is not a valid pattern"),
        ("seg", {"blur_sigma": 0.0}, "seg: blur_sigma must be > 0"),
        ("seg", {"lo": 2.0, "hi": 1.0}, "seg: need 0 <= lo <= hi"),
        ("slg", {"layers": ["transformer_blocks"]}, "skip=block skips blocks: give layers as"),
        ("slg", {"skip": "everything"}, "bad value 'everything' for option 'skip'"),
    ],
)
def test_options_are_checked_in_one_line(name, options, message):
    with pytest.raises(OptionError) as error:
        toolkit.guidance(name, **options)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_perturbation_spec_checks_itself():
    with pytest.raises(DtkError, match="a perturbation's kind is one of"):
        Perturbation("blur", ("mid",))
    with pytest.raises(DtkError, match="selects blocks by index"):
        Perturbation("skip_block", ("mid",))
    assert Perturbation("skip_block", 3).layers == (3,)


@pytest.mark.parametrize(
    ("folder", "args", "message"),
    [
        ("sd", ["--guidance-option", "layers=middle"], "pag: layer 'middle' matches no "
         "self-attention layer of this network; its self-attention layers are in "
         "down_blocks.0, up_blocks.1, mid_block"),
        ("sd", ["--guidance", "slg", "--guidance-option", "layers=0"],
         "slg: this network has no block list 'transformer_blocks'"),
        ("sd3", ["--guidance", "slg"], "slg: block 7 is out of range; transformer_blocks "
         "holds 2 blocks (0 to 1)"),
        ("sd3", ["--guidance-option", "layers=mid"], "pag: layer 'mid' matches no"),
    ],
)  # fmt: skip
def test_layers_a_network_lacks_are_refused_before_any_weights(folders, folder, args, message):
    guidance = [] if "--guidance" in args else ["--guidance", "pag"]
    result = dtk("generate", "--model", folders(folder), "--prompt", CAT, *guidance, *args,
                 "--dry-run")  # fmt: skip
    assert result.exit_code == 2, result.output
    [line] = result.stderr.strip().splitlines()
    assert message in line, line


def test_a_network_without_attention_refuses_pag(tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler
    from tiny_models import tiny_unet

    DDPMPipeline(unet=tiny_unet(add_attention=False), scheduler=DDPMScheduler()).save_pretrained(
        tmp_path / "plain")  # fmt: skip
    result = dtk("generate", "--model", tmp_path / "plain", "--guidance", "pag",
                 "--guidance-option", "scale=1", "--dry-run")  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "matches no self-attention layer of this network; it has no self-attention " \
           "layers" in result.stderr  # fmt: skip


def test_cfg_on_a_model_without_uncond_is_refused_but_pag_alone_runs(tmp_path):
    """A latent consistency model has no unconditional branch: PAG without CFG only."""
    from tiny_lcm import save_lcm_pipeline

    folder = save_lcm_pipeline(tmp_path / "lcm")
    refused = dtk("generate", "--model", folder, "--prompt", CAT, "--guidance", "pag",
                  "--dry-run")  # fmt: skip
    assert refused.exit_code == 2 and "needs an unconditional branch" in refused.stderr
    out = tmp_path / "out"
    result = dtk("generate", "--model", folder, "--prompt", CAT, "--guidance", "pag",
                 "--guidance-option", "scale=1", "--guidance-option", "layers=mid", "-n", 1,
                 "--steps", 2, "--out", out, "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
