"""The Flux family (`toolkit.models.flux`) on tiny random folders built offline
(`tiny_flux.py`): ``dtk generate`` equals ``FluxPipeline`` run with one generator per sample,
dev (guidance-distilled, dynamically shifted) and schnell, with the native sampler and with
the folder's own scheduler through ``--sampler diffusers``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from folders import capture_decoded, max_pixel_difference, pixels, prompts_file
from invoke import dtk
from tiny_flux import LATENT_CHANNELS, save_flux_pipeline

import toolkit
from toolkit.models import open_model
from toolkit.models.detect import FLUX, detect_family
from toolkit.models.flux import Flux, pack, unpack

CAT, DOG, NEG = "a photo of a cat", "a red dog", "blurry"
#: latents of two float32 runs of the same math, in different orders (measured: 9.5e-7)
LATENT_TOL = 1e-4
#: a small image and T5 prompt, to keep the tests fast: a 16x24 latent, 96 tokens
SIZE = {"height": 32, "width": 48, "max_sequence_length": 32}
#: ... as dtk's options: the size is --height/--width, the prompt length a model option
SIZE_ARGS = ["--height", 32, "--width", 48, "--model-option", "max_sequence_length=32"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    return {"dev": save_flux_pipeline(root / "dev"),
            "schnell": save_flux_pipeline(root / "schnell", guidance=False)}  # fmt: skip


@pytest.fixture
def decoded(monkeypatch):
    """The latents each run decodes, in order."""
    return capture_decoded(monkeypatch, Flux)


def pipeline(folder, prompts, seed, *, output_type="np", **kwargs):
    """The pipeline's images (as our pixels: int16) or unpacked latents, sample i drawn by
    its own generator seeded seed + i."""
    pipe = FluxPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(len(prompts))]
    out = pipe(prompts, generator=generators, output_type=output_type, **kwargs)
    if output_type == "latent":
        height = kwargs.get("height", 2 * 128)
        width = kwargs.get("width", 2 * 128)
        return FluxPipeline._unpack_latents(out.images, height, width, pipe.vae_scale_factor)
    return np.round(out.images * 255).astype(np.int16)


def model_options(**options):
    return [arg for key, value in options.items() for arg in ("--model-option", f"{key}={value}")]


@pytest.mark.parametrize("sampler", ["euler", "diffusers"])
@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_generate_equals_the_pipeline(folders, tmp_path, decoded, variant, sampler):
    """Two prompts, one generator per sample, 5 steps: euler on the flow schedule (the
    pipeline's times) and the folder's FlowMatchEulerDiscreteScheduler through the diffusers
    sampler both give the pipeline's latents and pixels."""
    out = tmp_path / "out"
    result = dtk("generate", "--model", folders[variant], "--prompts-file",
                 prompts_file(tmp_path, CAT, DOG), "--sampler", sampler, "--steps", 5,
                 "--seed", 3, *SIZE_ARGS, "--out", out, "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    [ours] = decoded
    assert ours.shape == (2, LATENT_CHANNELS, 16, 24)
    theirs = pipeline(folders[variant], [CAT, DOG], 3, num_inference_steps=5,
                      output_type="latent", **SIZE)  # fmt: skip
    assert float((ours - theirs).abs().max()) <= LATENT_TOL
    images = pixels(out)
    assert images[0].shape == (32, 48, 3)
    reference = pipeline(folders[variant], [CAT, DOG], 3, num_inference_steps=5, **SIZE)
    assert max_pixel_difference(images, reference) <= 1
    run = json.loads((out / "run.json").read_text())
    assert run["model_info"]["family"] == FLUX and run["model_info"]["prediction_type"] == "flow"
    assert run["guidance"] == {"name": "none", "options": {}}
    embedded = {"guidance": 3.5} if variant == "dev" else {}
    assert run["model_options"] == {**embedded, "max_sequence_length": 32}
    assert run["size"] == {"height": 32, "width": 48}
    assert (run["sampler"]["name"], run["schedule"]["name"], run["steps"]) == (sampler, "flow", 5)


def test_the_embedded_guidance_scale_is_a_model_option(folders, tmp_path, decoded):
    """dev's guidance scale is an input of its one forward pass: --model-option guidance=6
    is the pipeline's guidance_scale=6, and it matters."""
    out = tmp_path / "out"
    result = dtk("generate", "--model", folders["dev"], "--prompts-file",
                 prompts_file(tmp_path, CAT, DOG), "--steps", 4, "--seed", 7,
                 *model_options(guidance=6), *SIZE_ARGS, "--out", out, "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    [ours] = decoded
    kwargs = dict(num_inference_steps=4, output_type="latent", **SIZE)
    theirs = pipeline(folders["dev"], [CAT, DOG], 7, guidance_scale=6.0, **kwargs)
    assert float((ours - theirs).abs().max()) <= LATENT_TOL
    default = pipeline(folders["dev"], [CAT, DOG], 7, **kwargs)  # its 3.5
    assert float((ours - default).abs().max()) > 0.05
    run = json.loads((out / "run.json").read_text())
    assert run["model_options"]["guidance"] == 6.0
    # the model options are part of the run: another scale is another run
    again = dtk("generate", "--model", folders["dev"], "--prompts-file",
                prompts_file(tmp_path, CAT, DOG), "--steps", 4, "--seed", 7,
                *model_options(guidance=5), *SIZE_ARGS, "--out", out, "-q")  # fmt: skip
    assert again.exit_code == 2 and "differing in model_options" in again.stderr


def test_cfg_is_the_pipelines_true_cfg(folders, tmp_path, decoded):
    """cfg on Flux is FluxPipeline's true CFG (true_cfg_scale with a negative prompt): both
    branches in one forward pass, each with the embedded scale."""
    out = tmp_path / "out"
    result = dtk("generate", "--model", folders["dev"], "--prompts-file",
                 prompts_file(tmp_path, CAT, DOG, negative=NEG), "--guidance", "cfg",
                 "--guidance-option", "scale=4", "--steps", 3, "--seed", 1,
                 *SIZE_ARGS, "--out", out, "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    [ours] = decoded
    theirs = pipeline(folders["dev"], [CAT, DOG], 1, num_inference_steps=3, true_cfg_scale=4.0,
                      negative_prompt=[NEG] * 2, output_type="latent", **SIZE)  # fmt: skip
    assert float((ours - theirs).abs().max()) <= LATENT_TOL


def test_the_default_command(folders, tmp_path, decoded):
    """No sampler, schedule, steps, guidance or size: the pipeline's. dev: euler on its
    times, 28 steps, embedded scale 3.5, 128x128 latents, 512 T5 tokens (checked in the
    plan); schnell: 4 steps, run and compared with the pipeline at its defaults."""
    result = dtk("generate", "--model", folders["dev"], "--prompt", CAT, "-n", 1, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "sampler   euler, 28 steps, schedule flow" in result.output
    assert "guidance  none" in result.output
    assert ("(flux, samples 4x128x128), options guidance=3.5, max_sequence_length=512"
            in result.output)  # fmt: skip
    assert "size      256x256 pixels (width x height; the model's default)" in result.output
    out = tmp_path / "out"
    result = dtk("generate", "--model", folders["schnell"], "--prompt", CAT, "-n", 2,
                 "--out", out, "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    run = json.loads((out / "run.json").read_text())
    assert (run["sampler"]["name"], run["schedule"]["name"], run["steps"]) == ("euler", "flow", 4)
    assert run["guidance"]["name"] == "none"
    [ours] = decoded
    theirs = pipeline(folders["schnell"], [CAT, CAT], 0, num_inference_steps=4,
                      output_type="latent")  # fmt: skip
    assert float((ours - theirs).abs().max()) <= LATENT_TOL


def test_noise_is_drawn_unpacked_as_the_pipeline_draws_it(folders):
    """Sample i's start is randn((C, h, w)) from its own generator; the pipeline's
    prepare_latents with a generator per sample draws that shape, then packs it."""
    pipe = FluxPipeline.from_pretrained(folders["dev"])
    shape = (LATENT_CHANNELS, 16, 24)
    ours = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(5 + i))
                        for i in range(3)])  # fmt: skip
    generators = [torch.Generator().manual_seed(5 + i) for i in range(3)]
    theirs, _ = pipe.prepare_latents(3, LATENT_CHANNELS, 32, 48, torch.float32, "cpu",
                                     generators)  # fmt: skip
    assert torch.equal(pack(ours), theirs)
    assert torch.equal(unpack(pack(ours), 16, 24), ours)


def test_detection_noise_levels_and_times(folders):
    """mu is the pipeline's calculate_shift of the packed sequence length; the flow
    schedule's times are those FluxPipeline hands its scheduler."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    assert detect_family(folders["dev"]) == detect_family(folders["schnell"]) == FLUX
    dev, schnell = open_model(folders["dev"]), open_model(folders["schnell"])
    assert dev.guidance_embeds and not schnell.guidance_embeds
    assert dev.default_sampling() == ("euler", "flow", 28)
    assert schnell.default_sampling() == ("euler", "flow", 4)
    assert dev.default_guidance(True) == ("none", {})
    dev.image_size = dev.check_size(32, 48)
    assert dev.sample_shape == (LATENT_CHANNELS, 16, 24) and dev.image_shape == (3, 32, 48)
    levels = dev.noise_levels
    assert math.isclose(levels.mu, calculate_shift(8 * 12, 256, 4096, 0.5, 1.15))
    for folder, steps in ((dev, 5), (schnell, 7), (dev, 1)):
        levels = folder.noise_levels
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(folder.scheduler_config)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=levels.mu)
        ours = toolkit.schedule("flow")(steps, levels)
        assert math.isinf(ours[0]) and float(ours[-1]) == 0
        torch.testing.assert_close(ours[1:-1] / (1 + ours[1:-1]), scheduler.sigmas[1:-1].double(),
                                   rtol=1e-6, atol=0)  # fmt: skip


@pytest.mark.parametrize(
    "variant, args, message",
    [
        ("dev", ["--negative-prompt", NEG],
         "Flux samples without classifier-free guidance (dev's own scale is --model-option"),
        ("schnell", model_options(guidance=2), "takes no guidance scale (no guidance_embeds"),
        ("dev", ["--height", 34], "--height 34: an image side of this flux model is a positive "
         "multiple of 4 (the VAE's scale factor 2 times the 2x2 latent patches)"),
        ("dev", model_options(width=64), "model option width: the image size is --width"),
        ("dev", model_options(max_sequence_length=513), "T5's prompt length is 1 to 512"),
        ("dev", model_options(steps=3), "unknown option 'steps' for model 'flux'"),
        ("dev", ["--attention-slicing"], "the Flux transformer has no sliced attention"),
        ("dev", ["--schedule", "karras"], "rectified-flow model"),
    ],
)  # fmt: skip
def test_what_flux_cannot_do_is_one_line(folders, tmp_path, variant, args, message):
    result = dtk("generate", "--model", folders[variant], "--prompt", CAT, "-n", 1, "--steps", 2,
                 *args, "--out", tmp_path / "out", "-q")  # fmt: skip
    assert result.exit_code == 2, result.output
    [line] = result.stderr.splitlines()
    assert message in line, line
    assert not (tmp_path / "out").exists()


def test_a_model_without_options_refuses_them(tmp_path):
    from tiny_sd import save_sd_pipeline

    folder = save_sd_pipeline(tmp_path / "sd")
    result = dtk("generate", "--model", folder, "--prompt", CAT, "-n", 1, "--dry-run",
                 *model_options(guidance=3))  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "a stable-diffusion model takes no model options; got 'guidance'" in result.stderr
