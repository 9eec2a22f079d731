"""The Stable Diffusion 3 family (`toolkit.models.sd3`) on tiny random folders built offline
(`tiny_sd3.py`): ``dtk generate`` equals ``StableDiffusion3Pipeline`` from the same
per-sample start, with and without T5."""

from __future__ import annotations

import json
import math
import shutil

import diffusers
import numpy as np
import pandas
import pytest
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from folders import (
    assert_damaged_copy_refused,
    capture_decoded,
    edit_json,
    max_pixel_difference,
    pixels,
    prompts_file,
)
from invoke import dtk
from tiny_sd3 import LATENT, SHIFT, save_sd3_pipeline
from transformers import CLIPTextModelWithProjection, T5EncoderModel

import toolkit
from toolkit.models import open_model
from toolkit.models.detect import SD3, detect_family
from toolkit.models.sd3 import StableDiffusion3

CAT, DOG, NEG = "a photo of a cat", "a red dog", "blurry"
#: latents of two float32 runs of the same math, in different orders (measured: 3e-6)
LATENT_TOL = 1e-4


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    return {"sd3": save_sd3_pipeline(root / "sd3"), "t5": save_sd3_pipeline(root / "t5", t5=True)}


@pytest.fixture
def decoded(monkeypatch):
    """The latents each run decodes, in order."""
    return capture_decoded(monkeypatch, StableDiffusion3)


def start(seed: int, n: int) -> torch.Tensor:
    """Our per-sample start: sample i from its own generator seeded seed + i."""
    return torch.stack([torch.randn(LATENT, generator=torch.Generator("cpu").manual_seed(seed + i))
                        for i in range(n)])  # fmt: skip


def pipeline(folder, prompts, seed, *, t5=False, output_type="np", **kwargs):
    """The pipeline's images (as our pixels: int16) or latents from our per-sample start."""
    without_t5 = {} if t5 else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, **without_t5)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompts, latents=start(seed, len(prompts)), output_type=output_type, **kwargs)
    if output_type == "latent":
        return out.images
    return np.round(out.images * 255).astype(np.int16)


@pytest.mark.parametrize("sampler", ["euler", "diffusers"])
def test_generate_equals_the_pipeline_with_cfg(folders, tmp_path, decoded, sampler):
    """(a) euler on the flow schedule and (b) the folder's own FlowMatchEulerDiscreteScheduler
    through the diffusers sampler: two prompts, a negative prompt, CFG at the pipeline's 7.0."""
    out = tmp_path / "out"
    schedule = ["--schedule", "flow"] if sampler == "euler" else []
    result = dtk("generate", "--model", folders["sd3"], "--prompts-file",
                 prompts_file(tmp_path, CAT, DOG, negative=NEG), "--sampler", sampler,
                 *schedule, "--steps", 6, "--seed", 5, "--out", out, "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    [ours] = decoded
    theirs = pipeline(folders["sd3"], [CAT, DOG], 5, negative_prompt=[NEG] * 2,
                      num_inference_steps=6, output_type="latent")  # fmt: skip
    assert float((ours - theirs).abs().max()) <= LATENT_TOL
    images = pixels(out)
    assert images[0].shape == (16, 16, 3)  # latent 8x8, VAE scale factor 2
    reference = pipeline(folders["sd3"], [CAT, DOG], 5, negative_prompt=[NEG] * 2,
                         num_inference_steps=6)  # fmt: skip
    assert max_pixel_difference(images, reference) <= 1
    # the comparison has teeth: without the negative prompt the latents move well beyond it
    plain = pipeline(folders["sd3"], [CAT, DOG], 5, num_inference_steps=6, output_type="latent")
    assert float((ours - plain).abs().max()) > 0.05
    run = json.loads((out / "run.json").read_text())
    assert run["model_info"]["family"] == SD3 and run["model_info"]["prediction_type"] == "flow"
    assert run["guidance"] == {"name": "cfg", "options": {"scale": 7.0}}
    assert (run["sampler"]["name"], run["schedule"]["name"], run["steps"]) == (sampler, "flow", 6)


def test_the_default_command_samples_as_the_pipeline(folders, tmp_path, decoded):
    """(c) no sampler, schedule or steps: the family's, the pipeline's euler on its flow
    schedule, 28 steps, recorded in run.json and the metadata."""
    out = tmp_path / "out"
    result = dtk("generate", "--model", folders["sd3"], "--prompt", CAT, "-n", 2, "--out", out,
                 "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    run = json.loads((out / "run.json").read_text())
    assert (run["sampler"]["name"], run["schedule"]["name"], run["steps"]) == ("euler", "flow", 28)
    metadata = pandas.read_csv(out / "metadata.csv", keep_default_na=False)
    assert list(metadata["steps"]) == [28, 28] and set(metadata["sampler"]) == {"euler"}
    [ours] = decoded
    theirs = pipeline(folders["sd3"], [CAT, CAT], 0, output_type="latent")  # its defaults
    assert float((ours - theirs).abs().max()) <= LATENT_TOL
    # the same command again resumes the folder (the resolved defaults are its identity)
    again = dtk("generate", "--model", folders["sd3"], "--prompt", CAT, "-n", 3, "--out", out,
                "--sampler", "euler", "--schedule", "flow", "--steps", 28, "-q")  # fmt: skip
    assert again.exit_code == 0, again.output
    assert len(pandas.read_csv(out / "metadata.csv")) == 3


def test_a_named_sampler_keeps_the_models_schedule_and_steps(folders, tmp_path):
    result = dtk("generate", "--model", folders["sd3"], "--prompt", CAT, "-n", 1,
                 "--sampler", "dpmpp_2m", "--dry-run")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "sampler   dpmpp_2m, 28 steps, schedule flow" in result.output
    assert "(sd3, samples 4x8x8)" in result.output


def test_prompts_are_encoded_once_and_cfg_is_one_forward_per_step(folders, tmp_path,
                                                                   monkeypatch):  # fmt: skip
    """(d) each distinct prompt through each CLIP encoder once; both CFG branches in one
    transformer call per step (the first, from t = 1, included)."""
    encoded, batches = [], []
    clip_forward, transformer_forward = (CLIPTextModelWithProjection.forward,
                                         SD3Transformer2DModel.forward)  # fmt: skip

    def spy_clip(self, input_ids=None, **kwargs):
        encoded.extend((id(self), tuple(ids)) for ids in input_ids.tolist())
        return clip_forward(self, input_ids=input_ids, **kwargs)

    def spy_transformer(self, hidden_states, *args, **kwargs):
        batches.append(hidden_states.shape[0])
        return transformer_forward(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(CLIPTextModelWithProjection, "forward", spy_clip)
    monkeypatch.setattr(SD3Transformer2DModel, "forward", spy_transformer)
    toolkit.generate(folders["sd3"], out=tmp_path / "out", prompt=[CAT, DOG, CAT, DOG, CAT],
                     n=5, steps=3, batch_size=2, progress=False)  # fmt: skip
    # cat, dog and the empty (unconditional) prompt, through each of the two encoders once
    assert len(encoded) == len(set(encoded)) == 2 * 3
    assert batches == [4] * 6 + [2] * 3


def test_a_folder_with_t5_equals_the_pipeline_with_t5(folders, tmp_path, decoded, monkeypatch):
    """(e) T5's tokens follow CLIP's in the transformer's text, as the pipeline's."""
    t5_prompts: list[tuple[int, ...]] = []
    t5_forward = T5EncoderModel.forward

    def spy_t5(self, input_ids=None, **kwargs):
        t5_prompts.extend(map(tuple, input_ids.tolist()))
        return t5_forward(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(T5EncoderModel, "forward", spy_t5)
    out = tmp_path / "out"
    toolkit.generate(folders["t5"], out=out, prompt=[CAT, DOG], negative_prompt=NEG, n=2, seed=3,
                     steps=5, progress=False)  # fmt: skip
    assert len(t5_prompts) == len(set(t5_prompts)) == 3 and len(t5_prompts[0]) == 256
    monkeypatch.undo()
    [ours] = decoded
    kwargs = dict(negative_prompt=[NEG] * 2, num_inference_steps=5)
    theirs = pipeline(folders["t5"], [CAT, DOG], 3, t5=True, output_type="latent", **kwargs)
    assert float((ours - theirs).abs().max()) <= LATENT_TOL
    reference = pipeline(folders["t5"], [CAT, DOG], 3, t5=True, **kwargs)
    assert max_pixel_difference(pixels(out), reference) <= 1
    # T5 matters: the same folder with T5's part zeroed (as without T5) samples elsewhere
    zeros = pipeline(folders["t5"], [CAT, DOG], 3, output_type="latent", **kwargs)
    assert float((ours - zeros).abs().max()) > 0.05
    assert json.loads((out / "run.json").read_text())["model_info"]["text_encoders"][-1] == (
        "T5EncoderModel"
    )


def test_detection_and_the_folders_configs(folders):
    assert detect_family(folders["sd3"]) == detect_family(folders["t5"]) == SD3
    folder = open_model(folders["sd3"])
    assert folder.sample_shape == LATENT and folder.image_shape == (3, 16, 16)
    assert not folder.has_t5 and open_model(folders["t5"]).has_t5
    assert folder.noise_levels.shift == SHIFT and folder.noise_levels.mu is None
    assert folder.default_sampling() == ("euler", "flow", 28)
    assert folder.default_guidance(True) == ("cfg", {"scale": 7.0})


def test_dynamic_shifting_is_the_pipelines(folders, tmp_path):
    sd3 = tmp_path / "dynamic"
    shutil.copytree(folders["sd3"], sd3)
    config_file = sd3 / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "use_dynamic_shifting": True}))
    levels = open_model(sd3).noise_levels
    # the pipeline's mu for the sample's (8 / 2)^2 tokens
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    mu = calculate_shift(16, 256, 4096, 0.5, 1.15)
    assert math.isclose(levels.mu, mu)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(
        {**config, "use_dynamic_shifting": True})  # fmt: skip
    scheduler.set_timesteps(7, mu=mu)
    ours = toolkit.schedule("flow")(7, levels)
    torch.testing.assert_close(ours[1:-1] / (1 + ours[1:-1]), scheduler.sigmas[1:-1].double(),
                               rtol=1e-6, atol=0)  # fmt: skip


BROKEN = {
    "no second text encoder": (lambda f: shutil.rmtree(f / "text_encoder_2"),
                               "needs text_encoder_2/config.json"),
    "T5 named but missing": (lambda f: shutil.rmtree(f / "text_encoder_3"),
                             "needs text_encoder_3/config.json"),
    "a VP scheduler": (lambda f: edit_json(f / "scheduler" / "scheduler_config.json",
                                       _class_name="DDIMScheduler"),
                       "samples with FlowMatchEulerDiscreteScheduler"),
    "pooled width": (lambda f: edit_json(f / "transformer" / "config.json",
                                     pooled_projection_dim=8),
                     "pooled features; the transformer takes 8"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_folder_is_one_line_before_any_weights(folders, tmp_path, case):
    assert_damaged_copy_refused(folders["t5"], tmp_path, *BROKEN[case], "--prompt", CAT)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--attention-slicing"], "the SD 3 transformer has no sliced attention"),
        (["--schedule", "karras"], "rectified-flow model"),
        (["--sampler", "diffusers", "--sampler-option", "scheduler=DDIMScheduler"],
         "this is a rectified-flow model: it runs the model's own FlowMatchEulerDiscreteScheduler"),
    ],
)  # fmt: skip
def test_what_sd3_cannot_do_is_one_line(folders, tmp_path, args, message):
    result = dtk("generate", "--model", folders["sd3"], "--prompt", CAT, "-n", 1, "--steps", 2,
                 *args, "--out", tmp_path / "out", "-q")  # fmt: skip
    assert result.exit_code == 2, result.output
    [line] = result.stderr.splitlines()
    assert message in line, line
