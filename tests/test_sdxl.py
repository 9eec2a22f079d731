"""The Stable Diffusion XL family (`toolkit.models.sdxl`) on tiny random folders built offline
(`tiny_sdxl.py`): ``dtk generate`` equals ``StableDiffusionXLPipeline`` from the same
per-sample start, with our Euler and with the folder's own scheduler, with and without
``force_zeros_for_empty_prompt``; a refiner-style folder equals
``StableDiffusionXLImg2ImgPipeline`` run from the same start."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas
import pytest
import torch
from diffusers import (
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from folders import (
    assert_damaged_copy_refused,
    capture_decoded,
    edit_json,
    max_pixel_difference,
    pixels,
    prompts_file,
)
from invoke import dtk
from tiny_sdxl import LATENT, PROJECTION, save_sdxl_pipeline, save_sdxl_refiner
from transformers import CLIPTextModel, CLIPTextModelWithProjection

import toolkit
from toolkit.models import open_model
from toolkit.models.detect import SDXL, detect_family
from toolkit.models.sdxl import StableDiffusionXL
from toolkit.registry.protocols import SampleRequest

CAT, DOG, NEG = "a photo of a cat", "a red dog", "blurry"
#: latents of two float32 runs of the same math, in different orders (measured: up to 3.8e-5
#: on latents of magnitude ~10, SDXL's scaling factor being small)
LATENT_TOL = 1e-4
#: SDXL's EulerDiscreteScheduler: leading spacing with steps_offset 1
EULER = ["--sampler", "euler", "--schedule", "leading", "--schedule-option", "offset=1"]
EULER_SETTINGS = dict(sampler="euler", schedule="leading", schedule_options={"offset": 1})


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    base = save_sdxl_pipeline(root / "base")
    no_zeros = root / "no-zeros"  # the same weights, force_zeros_for_empty_prompt false
    shutil.copytree(base, no_zeros)
    edit_json(no_zeros / "model_index.json", force_zeros_for_empty_prompt=False)
    return {"base": base, "no_zeros": no_zeros, "refiner": save_sdxl_refiner(root / "refiner")}


@pytest.fixture
def decoded(monkeypatch):
    """The latents each run decodes, in order."""
    return capture_decoded(monkeypatch, StableDiffusionXL)


def start(seed: int, n: int) -> torch.Tensor:
    """Our per-sample start: sample i from its own generator seeded seed + i."""
    return torch.stack([torch.randn(LATENT, generator=torch.Generator("cpu").manual_seed(seed + i))
                        for i in range(n)])  # fmt: skip


def load_pipeline(folder):
    cls = StableDiffusionXLImg2ImgPipeline if "refiner" in folder.name else (
        StableDiffusionXLPipeline)  # fmt: skip
    pipe = cls.from_pretrained(folder, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline(folder, prompts, seed, *, output_type="np", **kwargs):
    """The pipeline's images (as our pixels: int16) or latents from our per-sample start
    (which the text-to-image pipeline scales by its init_noise_sigma). The refiner's img2img
    pipeline starts there too: handed the scaled latents themselves and a denoising_start
    that keeps every timestep, it adds no noise of its own."""
    pipe = load_pipeline(folder)
    latents = start(seed, len(prompts))
    if isinstance(pipe, StableDiffusionXLImg2ImgPipeline):
        pipe.scheduler.set_timesteps(kwargs["num_inference_steps"])  # its first sigma's
        latents = latents * pipe.scheduler.init_noise_sigma
        kwargs.update(image=latents, denoising_start=1e-4)
    out = pipe(prompts, latents=latents, output_type=output_type, **kwargs)
    if output_type == "latent":
        return out.images
    return np.round(out.images * 255).astype(np.int16)


@pytest.mark.parametrize("sampler", ["euler", "diffusers"])
def test_generate_equals_the_pipeline_with_cfg(folders, tmp_path, decoded, sampler):
    """(a) euler on SDXL's leading timesteps (steps_offset 1) and (b) the folder's own
    EulerDiscreteScheduler through the diffusers sampler: two prompts, a negative prompt, CFG
    at the pipeline's 5.0."""
    out = tmp_path / "out"
    args = EULER if sampler == "euler" else ["--sampler", "diffusers"]
    result = dtk("generate", "--model", folders["base"], "--prompts-file",
                 prompts_file(tmp_path, CAT, DOG, negative=NEG), *args, "--steps", 6,
                 "--seed", 5, "--out", out, "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    [ours] = decoded
    kwargs = dict(negative_prompt=[NEG] * 2, num_inference_steps=6)
    theirs = pipeline(folders["base"], [CAT, DOG], 5, output_type="latent", **kwargs)
    assert float((ours - theirs).abs().max()) <= LATENT_TOL
    images = pixels(out)
    assert images[0].shape == (16, 16, 3)  # latent 8x8, VAE scale factor 2
    assert max_pixel_difference(images, pipeline(folders["base"], [CAT, DOG], 5, **kwargs)) <= 1
    # the comparison has teeth: with the empty negative prompt the latents move well beyond it
    plain = pipeline(folders["no_zeros"], [CAT, DOG], 5, output_type="latent",
                     num_inference_steps=6)  # fmt: skip
    assert float((ours - plain).abs().max()) > 0.05
    run = json.loads((out / "run.json").read_text())
    assert run["model_info"]["family"] == SDXL
    assert run["model_info"]["time_ids"] == [16, 16, 0, 0, 16, 16]
    assert run["guidance"] == {"name": "cfg", "options": {"scale": 5.0}}


@pytest.mark.parametrize("force_zeros", [True, False])
def test_force_zeros_for_empty_prompt(folders, tmp_path, decoded, force_zeros):
    """(c) no negative prompt: zeros on the unconditional branch when the folder says
    force_zeros_for_empty_prompt (never encoded), the empty prompt's text when it does not."""
    folder = folders["base" if force_zeros else "no_zeros"]
    out = tmp_path / "out"
    toolkit.generate(folder, out=out, prompt=[CAT, DOG], n=2, seed=3, steps=5, progress=False,
                     **EULER_SETTINGS)  # fmt: skip
    [ours] = decoded
    theirs = pipeline(folder, [CAT, DOG], 3, output_type="latent", num_inference_steps=5)
    assert float((ours - theirs).abs().max()) <= LATENT_TOL
    assert max_pixel_difference(pixels(out), pipeline(folder, [CAT, DOG], 3,
                                                      num_inference_steps=5)) <= 1  # fmt: skip
    other = folders["no_zeros" if force_zeros else "base"]
    elsewhere = pipeline(other, [CAT, DOG], 3, output_type="latent", num_inference_steps=5)
    assert float((ours - elsewhere).abs().max()) > 0.05  # the setting matters
    assert json.loads((out / "run.json").read_text())["model_info"][
        "force_zeros_for_empty_prompt"] is force_zeros  # fmt: skip


def test_a_refiner_style_folder_equals_the_img2img_pipeline(folders, tmp_path, decoded):
    """(d) text_encoder null: the second encoder alone, and the aesthetic scores (6 and 2.5)
    in the time ids, as StableDiffusionXLImg2ImgPipeline run from the same start."""
    folder = folders["refiner"]
    assert detect_family(folder) == SDXL
    out = tmp_path / "out"
    toolkit.generate(folder, out=out, prompt=[CAT, DOG], negative_prompt=NEG, n=2, seed=7,
                     steps=6, progress=False, **EULER_SETTINGS)  # fmt: skip
    [ours] = decoded
    kwargs = dict(negative_prompt=[NEG] * 2, num_inference_steps=6)
    theirs = pipeline(folder, [CAT, DOG], 7, output_type="latent", **kwargs)
    assert float((ours - theirs).abs().max()) <= LATENT_TOL
    assert max_pixel_difference(pixels(out), pipeline(folder, [CAT, DOG], 7, **kwargs)) <= 1
    # the comparison has teeth: with the empty negative prompt the latents move well beyond it
    plain = pipeline(folder, [CAT, DOG], 7, output_type="latent", num_inference_steps=6)
    assert float((ours - plain).abs().max()) > 0.05
    info = json.loads((out / "run.json").read_text())["model_info"]
    assert info["text_encoders"] == ["CLIPTextModelWithProjection"]
    assert info["time_ids"] == [16, 16, 0, 0, 6.0] and not info["force_zeros_for_empty_prompt"]


def test_a_vae_with_latents_mean_and_std_decodes_as_the_pipeline(folders, tmp_path):
    """A VAE config with latents_mean and latents_std: ``latents * std / scaling + mean``."""
    folder = tmp_path / "model"
    shutil.copytree(folders["base"], folder)
    edit_json(folder / "vae" / "config.json", latents_mean=[0.1, -0.2, 0.3, 0.0],
          latents_std=[1.5, 0.5, 1.0, 2.0])  # fmt: skip
    out = tmp_path / "out"
    toolkit.generate(folder, out=out, prompt=[CAT, DOG], n=2, seed=2, steps=4, progress=False,
                     **EULER_SETTINGS)  # fmt: skip
    theirs = pipeline(folder, [CAT, DOG], 2, num_inference_steps=4)
    assert max_pixel_difference(pixels(out), theirs) <= 1
    # the comparison has teeth: without them the images are elsewhere
    plain = pipeline(folders["base"], [CAT, DOG], 2, num_inference_steps=4)
    assert max_pixel_difference(pixels(out), plain) > 4


@pytest.mark.parametrize("name", ["base", "refiner"])
def test_the_text_conditioning_is_the_pipelines(folders, name):
    """Each branch's UNet inputs equal the pipeline's encode_prompt and _get_add_time_ids:
    both CLIPs' penultimate states side by side (the refiner: the second alone), the second
    one's projection, the size (and aesthetic) ids."""
    folder = folders[name]
    model = open_model(folder).load(device="cpu", dtype=torch.float32)
    batch = [SampleRequest(i, i, {}, prompt, NEG) for i, prompt in enumerate([CAT, DOG])]
    conditioning = model.conditioning(batch, {})
    pipe = load_pipeline(folder)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        [CAT, DOG], device="cpu", negative_prompt=[NEG, NEG])  # fmt: skip
    if name == "refiner":
        ids, negative_ids = pipe._get_add_time_ids(
            (16, 16), (0, 0), (16, 16), 6.0, 2.5, (16, 16), (0, 0), (16, 16), torch.float32,
            text_encoder_projection_dim=PROJECTION)  # fmt: skip
    else:
        ids = negative_ids = pipe._get_add_time_ids(
            (16, 16), (0, 0), (16, 16), torch.float32, text_encoder_projection_dim=PROJECTION
        )
    expected = {"cond": (embeds, pooled, ids), "uncond": (negative, negative_pooled, negative_ids)}
    for branch, (hidden, text, time_ids) in expected.items():
        inputs = conditioning.inputs(branch, 2, torch.device("cpu"))
        torch.testing.assert_close(inputs["encoder_hidden_states"], hidden, rtol=0, atol=1e-6)
        torch.testing.assert_close(inputs["text_embeds"], text, rtol=0, atol=1e-6)
        torch.testing.assert_close(inputs["time_ids"], time_ids.expand(2, -1))


def test_the_default_command_samples_as_the_pipeline(folders, tmp_path, decoded):
    """(e) no sampler, schedule or steps: the family's, the pipeline's 50 steps of Euler on
    SDXL's leading timesteps, recorded in run.json and the metadata; with the scheduler's
    steps_offset as the schedule's offset it is the pipeline's default call."""
    out = tmp_path / "out"
    result = dtk("generate", "--model", folders["base"], "--prompt", CAT, "-n", 2, "--out", out,
                 "--schedule-option", "offset=1", "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    run = json.loads((out / "run.json").read_text())
    assert (run["sampler"]["name"], run["schedule"]["name"], run["steps"]) == (
        "euler", "leading", 50)  # fmt: skip
    assert run["guidance"] == {"name": "cfg", "options": {"scale": 5.0}}
    metadata = pandas.read_csv(out / "metadata.csv", keep_default_na=False)
    assert list(metadata["steps"]) == [50, 50] and set(metadata["sampler"]) == {"euler"}
    [ours] = decoded
    theirs = pipeline(folders["base"], [CAT, CAT], 0, output_type="latent")  # its defaults
    assert float((ours - theirs).abs().max()) <= LATENT_TOL
    assert open_model(folders["base"]).default_schedule_options() == {"offset": 1}
    plain = tmp_path / "plain"  # the bare command runs (leading without the offset, for now)
    result = dtk("generate", "--model", folders["base"], "--prompt", CAT, "-n", 1, "--out", plain,
                 "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(pixels(plain)) == 1


def test_prompts_are_encoded_once_and_cfg_is_one_forward_per_step(folders, tmp_path,
                                                                   monkeypatch):  # fmt: skip
    """(f) each distinct prompt through each encoder once (the empty negative prompt never,
    under force_zeros_for_empty_prompt); both CFG branches in one UNet call per step, with
    the added conditioning."""
    encoded, calls = [], []
    clip_forward, projection_forward, unet_forward = (
        CLIPTextModel.forward,
        CLIPTextModelWithProjection.forward,
        UNet2DConditionModel.forward,
    )

    inside = []  # transformers 5's projection model runs a CLIPTextModel inside: one call

    def spy(forward):
        def spied(self, input_ids=None, **kwargs):
            if not inside:
                encoded.extend((type(self).__name__, tuple(ids)) for ids in input_ids.tolist())
            inside.append(self)
            try:
                return forward(self, input_ids=input_ids, **kwargs)
            finally:
                inside.pop()

        return spied

    def spy_unet(self, sample, *args, added_cond_kwargs=None, **kwargs):
        calls.append((sample.shape[0], {k: tuple(v.shape) for k, v in added_cond_kwargs.items()}))
        return unet_forward(self, sample, *args, added_cond_kwargs=added_cond_kwargs, **kwargs)

    monkeypatch.setattr(CLIPTextModel, "forward", spy(clip_forward))
    monkeypatch.setattr(CLIPTextModelWithProjection, "forward", spy(projection_forward))
    monkeypatch.setattr(UNet2DConditionModel, "forward", spy_unet)
    toolkit.generate(folders["base"], out=tmp_path / "out", prompt=[CAT, DOG, CAT, DOG, CAT],
                     n=5, steps=3, batch_size=2, sampler="euler", progress=False)  # fmt: skip
    # cat and dog through each of the two encoders once; no empty prompt (zeros instead)
    assert len(encoded) == len(set(encoded)) == 2 * 2
    assert [batch for batch, _ in calls] == [4] * 6 + [2] * 3
    assert calls[0][1] == {"text_embeds": (4, PROJECTION), "time_ids": (4, 6)}


def test_detection_and_the_folders_configs(folders):
    folder, refiner = open_model(folders["base"]), open_model(folders["refiner"])
    assert detect_family(folders["base"]) == SDXL and folder.family == "sdxl"
    assert folder.sample_shape == LATENT and folder.image_shape == (3, 16, 16)
    assert folder.has_text_encoder and not refiner.has_text_encoder
    assert folder.default_sampling() == ("euler", "leading", 50)
    assert folder.default_guidance(True) == ("cfg", {"scale": 5.0})
    assert folder.time_ids() == folder.time_ids(negative=True) == [16, 16, 0, 0, 16, 16]
    assert refiner.time_ids() == [16, 16, 0, 0, 6.0]
    assert refiner.time_ids(negative=True) == [16, 16, 0, 0, 2.5]


@pytest.mark.parametrize(
    "scheduler, sampling, options",
    [
        ({"timestep_spacing": "trailing"}, ("euler", "trailing", 50), {}),
        ({"timestep_spacing": "linspace"}, ("euler", "linspace", 50), {}),
        ({"use_karras_sigmas": True}, ("euler", "karras", 50), {}),
        ({"_class_name": "EulerAncestralDiscreteScheduler"}, ("euler_ancestral", "leading", 50),
         {"offset": 1}),
        ({"_class_name": "DPMSolverMultistepScheduler"}, ("dpmpp_2m", "karras", 20), {}),
        ({"interpolation_type": "log_linear"}, ("dpmpp_2m", "karras", 20), {}),
    ],
)  # fmt: skip
def test_the_default_sampling_follows_the_scheduler(folders, tmp_path, scheduler, sampling,
                                                   options):  # fmt: skip
    """Our twin of the folder's scheduler on its sigmas' schedule, 50 steps; the toolkit's
    sampling for a scheduler without a twin here."""
    folder = tmp_path / "model"
    shutil.copytree(folders["base"], folder)
    edit_json(folder / "scheduler" / "scheduler_config.json", **scheduler)
    model = open_model(folder)
    assert model.default_sampling() == sampling
    assert model.default_schedule_options() == options


BROKEN = {
    "no second text encoder": (lambda f: shutil.rmtree(f / "text_encoder_2"),
                               "needs text_encoder_2/config.json"),
    "no first tokenizer": (lambda f: shutil.rmtree(f / "tokenizer"), "needs tokenizer/"),
    "an SD UNet": (lambda f: edit_json(f / "unet" / "config.json", addition_embed_type=None),
                   "the UNet takes no pooled text and size conditioning"),
    "an inpainting UNet": (lambda f: edit_json(f / "unet" / "config.json", in_channels=9),
                           "the UNet takes 9 input channels but the VAE gives 4"),
    "text width": (lambda f: edit_json(f / "unet" / "config.json", cross_attention_dim=48),
                   "attends to 48-wide text features but the text encoders give 80"),
    "aesthetic score flag": (lambda f: edit_json(f / "model_index.json",
                                             requires_aesthetics_score=True),
                             "requires_aesthetics_score is true"),
    "no projection": (lambda f: edit_json(f / "model_index.json",
                                      text_encoder_2=["transformers", "CLIPTextModel"]),
                      "second encoder is a CLIPTextModelWithProjection"),
    "an LCM scheduler": (lambda f: edit_json(f / "scheduler" / "scheduler_config.json",
                                         _class_name="LCMScheduler"),
                         "Latent Consistency Model (LCM)"),
    "an LCM UNet": (lambda f: edit_json(f / "unet" / "config.json", time_cond_proj_dim=256),
                    "Latent Consistency Model"),
    "an inpainting pipeline": (lambda f: edit_json(f / "model_index.json",
                                               _class_name="StableDiffusionXLInpaintPipeline"),
                               "Stable Diffusion XL pipeline (StableDiffusionXLInpaintPipeline)"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_folder_is_one_line_before_any_weights(folders, tmp_path, case):
    assert_damaged_copy_refused(folders["base"], tmp_path, *BROKEN[case], "--prompt", CAT)
