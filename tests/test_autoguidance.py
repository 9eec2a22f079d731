"""``autoguidance`` (plugins/perturbed_guidance.py; Karras et al. 2024, "Guiding a Diffusion
Model with a Bad Version of Itself") in its two forms, and the seams they use.

- diffusers' ``AutoGuidance`` guider: the unconditional inputs through the network with
  layers skipped (a perturbed branch of the one batched pass, `toolkit.Perturbation` with
  condition ``uncond``; several per branch for a list of ``LayerSkipConfig``s), compared with
  the guider driven in a hand-written loop (diffusers 0.42's pipelines take no guider) with
  its own ``prepare_models``/``cleanup_models`` hooks, on tiny random SD 3 and SD folders.
- the paper's: the conditional inputs through a weaker model of the same family
  (`toolkit.GuideModel`; the generation run loads it beside the model and runs its branch
  in a pass of its own), compared with ``D_guide + w (D_main - D_guide)`` computed by hand
  with the same sampler, on two tiny label UNets that differ in their weights alone.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, StableDiffusion3Pipeline, StableDiffusionPipeline
from folders import capture_decoded, edit_json, made_once, max_pixel_difference, pixels
from invoke import dtk
from tiny_models import ATTRIBUTES, save_ve_pipeline, tiny_unet
from tiny_sd import spy_forwards, tiny_components

import toolkit
from toolkit import GuideModel, OptionError, Perturbation, defaults
from toolkit.data.images import to_pixels, to_unit
from toolkit.errors import DtkError
from toolkit.models import load_model
from toolkit.models.label_unet import LabelUNet, LabelUNetFolder
from toolkit.models.sd3 import StableDiffusion3
from toolkit.models.stable_diffusion import StableDiffusion
from toolkit.registry.protocols import SampleRequest
from toolkit.sampling.denoiser import GuidedDenoiser
from toolkit.sampling.engine import sample_images

CAT, NEG = "a photo of a cat", "blurry"
STEPS = 6
#: latents of two float32 runs of the same math, batched differently (as
#: tests/test_perturbed_guidance.py measured)
LATENT_TOL = 1e-4
DDIM = dict(sampler="ddim", schedule="leading", schedule_options={"offset": 1}, progress=False)
FLOW = dict(sampler="euler", schedule="flow", progress=False)
CONDITION = {"digit": "1", "group": "dark"}


def start(seed: int, n: int, shape) -> torch.Tensor:
    """Our per-sample start: sample i from its own generator seeded seed + i."""
    return torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed + i))
                        for i in range(n)])  # fmt: skip


def as_pixels(images) -> np.ndarray:
    """Decoded images in [-1, 1] ``[B, C, H, W]`` as pixel levels ``[B, H, W, C]``."""
    images = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).detach().numpy()
    return np.round(images * 255).astype(np.int16)


@pytest.fixture
def decoded(monkeypatch):
    """The clean samples each run decodes, in order."""
    return capture_decoded(monkeypatch, StableDiffusion, StableDiffusion3, LabelUNet)


# -- diffusers' form: skipped layers on the unconditional branch ---------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return made_once(tmp_path_factory.mktemp("autoguidance"))


def guider_loop(pipe, network, call, n: int, latents: torch.Tensor, **guider_options):
    """diffusers' ``AutoGuidance`` in the loop its modular pipelines run: the guider's state
    per step, then per batch (cond, then uncond) ``prepare_models`` (which installs the
    layer-skip hooks on the second, unconditional batch: it counts the batches it prepares,
    as 0.42's SEG guider does not), the network call and ``cleanup_models``; its ``forward``
    combines them; the scheduler steps. `call(network, x, t, branch)`: the network's raw
    output on `branch`'s inputs."""
    from diffusers.guiders import AutoGuidance

    guider = AutoGuidance(**guider_options)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(STEPS)
    latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)  # a flow one's: none
    scale = getattr(scheduler, "scale_model_input", lambda x, t: x)
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            guider.set_state(step=i, num_inference_steps=STEPS, timestep=t)
            x = scale(latents, t)
            preds = {}
            for branch, key in zip(("cond", "uncond")[: guider.num_conditions],
                                   ("pred_cond", "pred_uncond")):  # fmt: skip
                guider.prepare_models(network)
                preds[key] = call(network, x, t, branch)
                guider.cleanup_models(network)
            latents = scheduler.step(guider.forward(**preds).pred, t, latents).prev_sample
    return latents


@contextlib.contextmanager
def block_skip_in_order():
    """diffusers' ``TransformerBlockSkipHook`` with its ``(hidden, encoder)`` put in the order
    of the block's ``TransformerBlockRegistry`` entry (SD 3's and Flux's blocks return
    ``(encoder, hidden)``)."""
    from diffusers.hooks.layer_skip import TransformerBlockSkipHook

    new_forward = TransformerBlockSkipHook.new_forward

    def ordered(self, module, *args, **kwargs):
        out = new_forward(self, module, *args, **kwargs)
        if isinstance(out, tuple) and self._metadata.return_hidden_states_index == 1:
            return out[::-1]
        return out

    TransformerBlockSkipHook.new_forward = ordered
    try:
        yield
    finally:
        TransformerBlockSkipHook.new_forward = new_forward


def sd3_reference(folder, n: int, seed: int, **guider_options):
    from tiny_sd3 import LATENT

    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None,
                                                    tokenizer_3=None)  # fmt: skip
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        [CAT] * n, None, None, "cpu", 1, True, [NEG] * n
    )
    inputs = {"cond": (embeds, pooled), "uncond": (negative, negative_pooled)}

    def call(network, x, t, branch):
        text, pool = inputs[branch]
        return network(hidden_states=x, timestep=t.expand(x.shape[0]), encoder_hidden_states=text,
                       pooled_projections=pool, return_dict=False)[0]  # fmt: skip

    latents = guider_loop(pipe, pipe.transformer, call, n, start(seed, n, LATENT), **guider_options)
    vae = pipe.vae
    image = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample
    return latents, as_pixels(image)


def sd_reference(folder, n: int, seed: int, **guider_options):
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    cond, uncond = pipe.encode_prompt([CAT] * n, "cpu", 1, True, [NEG] * n)
    inputs = {"cond": cond, "uncond": uncond}

    def call(network, x, t, branch):
        return network(x, t, encoder_hidden_states=inputs[branch]).sample

    latents = guider_loop(pipe, pipe.unet, call, n, start(seed, n, (4, 8, 8)), **guider_options)
    vae = pipe.vae
    return latents, as_pixels(vae.decode(latents / vae.config.scaling_factor).sample)


def ours(folder, out, options, sampling, n=2, seed=4):
    toolkit.generate(folder, out=out, prompt=CAT, negative_prompt=NEG, n=n, seed=seed,
                     steps=STEPS, guidance="autoguidance", guidance_options=options,
                     **sampling)  # fmt: skip
    return pixels(out)


def test_skipped_blocks_on_sd3_equal_the_autoguidance_guider(folders, tmp_path, decoded):
    """``auto_guidance_layers`` with diffusers' defaults: whole blocks skipped, the block list
    found by ``fqn="auto"`` (SD 3's ``transformer_blocks``).

    Two diffusers 0.42 bugs are worked around in the reference, each with diffusers' own code:
    the guider cannot run its own ``auto_guidance_layers`` (it makes ``LayerSkipConfig(i,
    ...)`` with an int where the hook takes a list: ``len(indices)`` raises TypeError), so
    it is given the configs it means, ``LayerSkipConfig([i], fqn="auto", dropout=1.0)``;
    and its ``TransformerBlockSkipHook`` returns ``(hidden, encoder)`` whatever the block's
    own order, which SD 3's ``JointTransformerBlock`` has reversed (its registry entry says
    so: ``return_hidden_states_index=1``), so the skipped block swaps image and text tokens
    and the transformer fails to unpatchify: the hook's output is put in the registry's
    order (`block_skip_in_order`)."""
    from diffusers.hooks import LayerSkipConfig

    options = {"scale": 5.0, "auto_guidance_layers": [1]}
    images = ours(folders("sd3"), tmp_path / "out", options, FLOW)
    meant = [LayerSkipConfig([1], fqn="auto", dropout=1.0)]
    with block_skip_in_order():
        latents, theirs = sd3_reference(folders("sd3"), 2, 4, guidance_scale=5.0,
                                        auto_guidance_config=meant)  # fmt: skip
    difference = float((decoded[0] - latents).abs().max())
    assert difference <= LATENT_TOL, difference
    assert max_pixel_difference(images, theirs) <= 1
    # the skipped block matters: CFG at the same scale lands elsewhere
    ours(folders("sd3"), tmp_path / "cfg", {"scale": 5.0, "auto_guidance_config": {
        "indices": [1], "skip_attention": False, "skip_ff": False,
        "skip_attention_scores": True}}, FLOW)  # fmt: skip
    assert float((decoded[1] - latents).abs().max()) > 0.01


#: UNet transformer blocks (their lists as LayerSkipConfig's fqn names them) and the flags
SD_CASES = {
    "attention scores and feed-forward, and a whole block": (
        [{"indices": [0], "fqn": "down_blocks.0.attentions.0.transformer_blocks",
          "skip_attention": False, "skip_attention_scores": True},
         {"indices": [0], "fqn": "mid_block.attentions.0.transformer_blocks"}], {}),
    "self-attention alone, original formulation, rescaled": (
        [{"indices": [0], "fqn": "up_blocks.1.attentions.1.transformer_blocks",
          "skip_ff": False}],
        {"use_original_formulation": True, "guidance_rescale": 0.5, "scale": 2.0}),
}  # fmt: skip


@pytest.mark.parametrize("case", list(SD_CASES))
def test_skipped_layers_of_a_unet_equal_the_autoguidance_guider(folders, tmp_path, decoded,
                                                                case):  # fmt: skip
    """LayerSkipConfig's fqn addresses a UNet's transformer blocks; a list of configs, or a
    config with several flags, is several perturbations of the one branch."""
    configs, extra = SD_CASES[case]
    scale = extra.get("scale", 7.5)
    options = {"auto_guidance_config": configs, **extra, "scale": scale}
    images = ours(folders("sd"), tmp_path / "out", options, DDIM)
    theirs_options = {k: v for k, v in extra.items() if k != "scale"}
    latents, theirs = sd_reference(folders("sd"), 2, 4, guidance_scale=scale,
                                   auto_guidance_config=[dict(c) for c in configs],
                                   **theirs_options)  # fmt: skip
    difference = float((decoded[0] - latents).abs().max())
    assert difference <= LATENT_TOL, difference
    assert max_pixel_difference(images, theirs) <= 1


def test_the_guide_branch_is_the_unconditional_rows_perturbed(folders):
    """One forward per step; the cond rows are a plain pass's, the guide rows the uncond
    inputs through the network with both of the config's perturbations."""
    model = load_model(folders("sd"))
    batch = [SampleRequest(i, 4 + i, {}, prompt=CAT, negative_prompt=NEG) for i in range(2)]
    config = SD_CASES["attention scores and feed-forward, and a whole block"][0]
    guidance = toolkit.guidance("autoguidance", auto_guidance_config=config)
    assert [s.kind for s in guidance.perturbations["guide"]] == [
        "attention_scores", "skip_ff", "skip_block"]  # fmt: skip
    conditioning = model.conditioning(batch, {})
    denoise = GuidedDenoiser(model, guidance, conditioning)
    x, sigma = start(1, 2, (4, 8, 8)) * 3.0, 3.0
    with torch.inference_mode():
        preds = _preds(denoise, x, sigma)
        assert denoise.forwards == 1
        cond = conditioning.inputs("cond", 2, x.device)
        uncond = conditioning.inputs("uncond", 2, x.device)
        torch.testing.assert_close(preds["cond"], model.denoise(x, sigma, **cond))
        with model.perturbed({range(0, 2): guidance.perturbations["guide"]}):
            bad = model.denoise(x, sigma, **uncond)
        torch.testing.assert_close(preds["guide"], bad)
        assert float((bad - model.denoise(x, sigma, **uncond)).abs().max()) > 0.01
    assert not any(m._forward_hooks for m in model.network.modules())


def _preds(denoise: GuidedDenoiser, x, sigma) -> dict[str, torch.Tensor]:
    """The estimates `denoise`'s guidance is handed at (x, sigma)."""
    seen: dict[str, torch.Tensor] = {}
    combine = denoise._combine

    def spy(guidance, space, preds, x, sigma):
        seen.update({k: v.clone() for k, v in preds.items()})
        return combine(guidance, space, preds, x, sigma)

    denoise._combine = spy
    try:
        denoise(x, sigma)
    finally:
        del denoise._combine
    return seen


# -- the paper's form: a weaker model of the same family -------------------------------------


def save_label_unet(path, seed: int, attributes=ATTRIBUTES, **config):
    """A label-conditioned DDPMPipeline folder whose UNet's weights come from `seed`; it
    predicts the clean sample, so that a random network's images are not all saturated."""
    unet = tiny_unet(12, seed=seed, **config)
    scheduler = DDPMScheduler(prediction_type="sample")
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(path)
    (path / "toolkit.json").write_text(json.dumps({"format": 1, "attributes": attributes}))
    return path


@pytest.fixture(scope="module")
def unets(tmp_path_factory):
    root = tmp_path_factory.mktemp("guides")
    return save_label_unet(root / "main", 0), save_label_unet(root / "guide", 1)


LABEL = dict(conditions=CONDITION, n=3, seed=5, steps=5, sampler="euler", progress=False)


def hand_loop(main, guide, w: float, n: int, seed: int, steps: int) -> torch.Tensor:
    """``D = D_guide + w (D_main - D_guide)`` on the conditional inputs, each model's own
    denoiser called directly, through our ``euler`` on the default schedule: the clean
    samples."""
    model, bad = load_model(main), load_model(guide)
    labels = torch.full((n,), model.labels.label(CONDITION), dtype=torch.long)
    sigmas = toolkit.schedule(defaults.SCHEDULE)(steps, model.noise_levels)
    x = model.prior(start(seed, n, model.sample_shape), float(sigmas[0]))

    def denoise(x, sigma):
        good = model.denoise(x, sigma, class_labels=labels)
        worse = bad.denoise(x, sigma, class_labels=labels)
        return worse + w * (good - worse)

    with torch.inference_mode():
        return toolkit.sampler("euler")(denoise, x, sigmas, noise=None)


def test_images_equal_the_papers_formula_by_hand(unets, tmp_path, decoded):
    main, guide = unets
    options = {"guide": guide, "scale": 2.5, "space": "denoised"}
    toolkit.generate(main, out=tmp_path / "out", guidance="autoguidance",
                     guidance_options=options, **LABEL)  # fmt: skip
    reference = hand_loop(main, guide, 2.5, LABEL["n"], LABEL["seed"], LABEL["steps"])
    difference = float((decoded[0] - reference).abs().max())
    assert difference <= 1e-5, difference
    theirs = to_pixels(to_unit(reference)).astype(np.int16)
    assert max_pixel_difference(pixels(tmp_path / "out"), theirs) == 0
    # combined as the networks' outputs (the default space): the same affine combination
    toolkit.generate(main, out=tmp_path / "output", guidance="autoguidance",
                     guidance_options={"guide": guide, "scale": 2.5}, **LABEL)  # fmt: skip
    assert float((decoded[1] - reference).abs().max()) <= 1e-5
    # the guide matters
    plain = hand_loop(main, main, 2.5, LABEL["n"], LABEL["seed"], LABEL["steps"])
    assert float((plain - reference).abs().max()) > 0.05


def test_scale_one_gives_the_main_models_images_without_the_guide(unets, tmp_path, monkeypatch):
    main, guide = unets
    toolkit.generate(main, out=tmp_path / "none", guidance="none", **LABEL)
    loads = []
    original = LabelUNetFolder.load
    monkeypatch.setattr(LabelUNetFolder, "load", lambda self, **kw: loads.append(self.path)
                        or original(self, **kw))  # fmt: skip
    toolkit.generate(main, out=tmp_path / "one", guidance="autoguidance",
                     guidance_options={"guide": guide, "scale": 1.0}, **LABEL)  # fmt: skip
    assert loads == [main]  # guidance is off: the guide is not loaded
    ours, theirs = pixels(tmp_path / "one"), pixels(tmp_path / "none")
    assert all(np.array_equal(ours[i], theirs[i]) for i in theirs)


def test_the_guide_runs_one_pass_of_its_own_per_step(unets):
    main, guide = unets
    model, bad = load_model(main), load_model(guide)
    batch = [SampleRequest(i, 5 + i, CONDITION) for i in range(2)]
    guidance = toolkit.guidance("autoguidance", guide=guide, scale=3.0)
    assert guidance.guide_models == {"guide": GuideModel(guide, "cond")}
    conditioning = model.conditioning(batch, {})
    with pytest.raises(DtkError, match="evaluates branch 'guide' with a guide model, and none"):
        GuidedDenoiser(model, guidance, conditioning)
    denoise = GuidedDenoiser(model, guidance, conditioning, {"guide": bad})
    x, sigma = start(2, 2, model.sample_shape) * 3.0, 3.0
    with torch.inference_mode():
        preds = _preds(denoise, x, sigma)
        assert denoise.forwards == 2  # the model's pass and the guide's
        cond = conditioning.inputs("cond", 2, x.device)
        torch.testing.assert_close(preds["cond"], model.denoise(x, sigma, **cond))
        torch.testing.assert_close(preds["guide"], bad.denoise(x, sigma, **cond))
    # through the engine: two UNet calls of the batch per step
    calls = []
    forward = type(model.network).forward

    def spy(network, sample, *args, **kwargs):
        calls.append((id(network), sample.shape[0]))
        return forward(network, sample, *args, **kwargs)

    sigmas = toolkit.schedule("karras")(3, model.noise_levels)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(model.network), "forward", spy)
        sample_images(model, toolkit.sampler("euler"), guidance, sigmas, batch,
                      guides={"guide": bad})  # fmt: skip
    assert calls == [(id(model.network), 2), (id(bad.network), 2)] * 3


def test_run_json_records_the_guide_and_resuming_checks_it(unets, tmp_path):
    main, guide = unets
    copy = tmp_path / "guide"
    shutil.copytree(guide, copy)
    out = tmp_path / "out"
    options = {"guide": copy, "scale": 2.0}
    toolkit.generate(main, out=out, guidance="autoguidance", guidance_options=options,
                     **{**LABEL, "n": 1})  # fmt: skip
    record = json.loads((out / "run.json").read_text())
    [entry] = record["guides"].values()
    assert entry["path"] == str(copy.resolve()) and entry["family"] == "unet"
    assert len(entry["sha256"]) == 64
    assert record["guidance"]["options"]["guide"] == str(copy)
    # the same folder with other weights is another run
    save_label_unet(copy, 2)
    with pytest.raises(DtkError, match="differing in guides"):
        toolkit.generate(main, out=out, guidance="autoguidance", guidance_options=options,
                         **{**LABEL, "n": 2})  # fmt: skip


@pytest.fixture(scope="module")
def odd_guides(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd")
    other = [{"name": "digit", "values": ["0", "1", "7"], "droppable": True},
             {"name": "group", "values": ["light", "dark"], "droppable": True}]  # fmt: skip
    return {
        "ve": save_ve_pipeline(root / "ve", conditional=True),
        "shape": _shape(save_label_unet(root / "shape", 1)),
        "labels": save_label_unet(root / "labels", 1, attributes=other),
        "classes": _classes(root / "classes"),
        "empty": _empty(root / "empty"),
    }


def _empty(path):
    path.mkdir()
    return path


def _shape(path):
    """A label UNet that samples at 16x16 (its weights serve any size)."""
    edit_json(path / "unet" / "config.json", sample_size=16)
    return path


def _classes(path):
    """A label UNet with more class embeddings (a network taking other inputs)."""
    scheduler = DDPMScheduler(prediction_type="sample")
    DDPMPipeline(unet=tiny_unet(16, seed=1), scheduler=scheduler).save_pretrained(path)
    (path / "toolkit.json").write_text(json.dumps({"format": 1, "attributes": ATTRIBUTES}))
    return path


@pytest.mark.parametrize(
    ("guide", "message"),
    [
        ("ve", "is a ve model; a guide model is of the model's family (unet)"),
        ("shape", "samples 3x16x16; the model samples 3x8x8"),
        ("labels", "is conditioned on other labels than the model"),
        ("classes", "its network's num_class_embeds is 16, the model's 12"),
        ("missing", "is not a model folder (no such folder)"),
        ("empty", "is not a diffusers model folder: expected model_index.json"),
    ],
)
def test_a_guide_that_cannot_stand_in_is_refused_at_plan_time(unets, odd_guides, tmp_path,
                                                              guide, message):  # fmt: skip
    main, _ = unets
    folder = odd_guides.get(guide, tmp_path / "nowhere")
    out = tmp_path / "out"
    result = dtk("generate", "--model", main, "--condition", "digit=1", "--guidance",
                 "autoguidance", "--guidance-option", f"guide={folder}", "-n", 1, "--out", out,
                 "--dry-run")  # fmt: skip
    assert result.exit_code == 2, result.output
    [line] = result.stderr.strip().splitlines()
    assert "guidance 'autoguidance': guide" in line and message in line, line
    assert not out.exists()


def test_a_text_guide_takes_the_models_prompt_embeddings(folders, tmp_path, monkeypatch):
    """An SD guide whose UNet differs: its pass is the batch's cond rows through its own
    UNet, with the main model's embeddings; a guide whose text encoder differs is
    refused."""
    main = folders("sd")
    guide = tmp_path / "guide"
    shutil.copytree(main, guide)
    shutil.rmtree(guide / "unet")
    tiny_components(seed=1)["unet"].save_pretrained(guide / "unet")
    _, unet_batches = spy_forwards(monkeypatch)
    common = dict(prompt=CAT, n=2, seed=4, steps=STEPS, **DDIM)
    toolkit.generate(main, out=tmp_path / "out", guidance="autoguidance",
                     guidance_options={"guide": guide, "scale": 2.0}, **common)  # fmt: skip
    assert unet_batches == [2, 2] * STEPS  # the model's cond rows, the guide's
    unet_batches.clear()
    toolkit.generate(main, out=tmp_path / "one", guidance="autoguidance",
                     guidance_options={"guide": guide, "scale": 1.0}, **common)  # fmt: skip
    toolkit.generate(main, out=tmp_path / "none", guidance="none", **common)
    ones, nones = pixels(tmp_path / "one"), pixels(tmp_path / "none")
    assert all(np.array_equal(ones[i], nones[i]) for i in nones)
    assert max_pixel_difference(pixels(tmp_path / "out"), nones) > 2
    edit_json(guide / "text_encoder" / "config.json", hidden_act="gelu")
    result = dtk("generate", "--model", main, "--prompt", CAT, "--guidance", "autoguidance",
                 "--guidance-option", f"guide={guide}", "--dry-run")  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "its text_encoder/config.json differs from the model's" in result.stderr


# -- options and refusals -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "give auto_guidance_layers (block indices to skip), auto_guidance_config"),
        ({"auto_guidance_layers": [1], "auto_guidance_config": {"indices": [1]}},
         "give auto_guidance_layers or auto_guidance_config, not both"),
        ({"auto_guidance_layers": [1], "dropout": 0.5}, "dropout must be 1.0"),
        ({"auto_guidance_config": {"indices": [1], "dropout": 0.9}}, "dropout must be 1.0"),
        ({"guide": "/x", "auto_guidance_layers": [1]}, "are its two forms; give one"),
        ({"auto_guidance_layers": [-1]}, "one or more block indices >= 0"),
        ({"auto_guidance_config": {"indices": [1], "skip_attention": False, "skip_ff": False}},
         "a LayerSkipConfig that skips nothing"),
        ({"auto_guidance_config": {"indices": [1], "skip_attention_scores": True}},
         "sets one of skip_attention and skip_attention_scores"),
        ({"auto_guidance_config": {"indices": [1], "layers": 2}},
         "unknown LayerSkipConfig field 'layers'"),
        ({"auto_guidance_config": "{not json"}, "JSON on the command line"),
        ({"auto_guidance_layers": [1], "guidance_rescale": 2.0},
         "guidance_rescale must be in [0, 1]"),
        ({"auto_guidance_layers": [1], "scale": math.inf}, "scale must be a finite number"),
    ],
)  # fmt: skip
def test_options_are_checked_in_one_line(options, message):
    with pytest.raises(OptionError) as error:
        toolkit.guidance("autoguidance", **options)
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_diffusers_layer_skip_configs_are_taken_as_they_are():
    from diffusers.hooks import LayerSkipConfig

    config = LayerSkipConfig([0, 1], fqn="transformer_blocks", skip_attention=False,
                             skip_ff=True)  # fmt: skip
    guidance = toolkit.guidance("autoguidance", auto_guidance_config=config)
    assert guidance.perturbations == {
        "guide": (Perturbation("skip_ff", (0, 1), condition="uncond", stack="transformer_blocks"),)
    }
    # from the command line: JSON
    cli = toolkit.create_plugin("guidance", "autoguidance", {
        "auto_guidance_config": json.dumps(config.to_dict())}, from_strings=True)  # fmt: skip
    assert cli.perturbations == guidance.perturbations
    # off at the scale that gives the conditional estimate back: one branch, nothing perturbed
    off = toolkit.guidance("autoguidance", auto_guidance_layers=[1], scale=1.0)
    assert off.branches == ("cond",) and off.perturbations == {}
    original = toolkit.guidance("autoguidance", auto_guidance_layers=[1], scale=0.0,
                                use_original_formulation=True)  # fmt: skip
    assert original.branches == ("cond",)


@pytest.mark.parametrize(
    ("folder", "options", "message"),
    [
        ("sd", ["auto_guidance_layers=0"], "stack 'auto' finds one top-level block list, and "
         "this network has no top-level block list; name the block list (fqn)"),
        ("sd3", ["auto_guidance_layers=2"], "block 2 is out of range; transformer_blocks "
         "holds 2 blocks (0 to 1)"),
    ],
)  # fmt: skip
def test_layers_a_network_lacks_are_refused_before_any_weights(folders, folder, options, message):
    args = [arg for option in options for arg in ("--guidance-option", option)]
    result = dtk("generate", "--model", folders(folder), "--prompt", CAT, "--guidance",
                 "autoguidance", *args, "--dry-run")  # fmt: skip
    assert result.exit_code == 2, result.output
    [line] = result.stderr.strip().splitlines()
    assert message in line, line


def test_auto_is_refused_where_diffusers_would_pick_a_block_list_at_random(tmp_path):
    """Flux has ``transformer_blocks`` and ``single_transformer_blocks``; diffusers' "auto"
    takes the first it finds in a set, whose order varies between processes."""
    from tiny_flux import save_flux_pipeline

    folder = save_flux_pipeline(tmp_path / "flux")
    result = dtk("generate", "--model", folder, "--prompt", CAT, "--guidance", "autoguidance",
                 "--guidance-option", "auto_guidance_layers=0", "--dry-run")  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "has transformer_blocks and single_transformer_blocks" in result.stderr


def test_the_dry_run_names_the_guide(unets):
    main, guide = unets
    result = dtk("generate", "--model", main, "--condition", "digit=1", "--guidance",
                 "autoguidance", "--guidance-option", f"guide={guide}", "--dry-run")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"guide     guide: {guide} (unet, sha256 " in result.output
