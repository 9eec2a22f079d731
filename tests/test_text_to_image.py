"""`dtk generate` / `toolkit.generate` on a tiny random Stable-Diffusion-style folder."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas
import pytest
import torch
from click.testing import CliRunner
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from folders import pixels
from tiny_models import save_pipeline
from tiny_sd import save_sd_pipeline, spy_forwards

from toolkit.cli import cli
from toolkit.generation.generate import generate
from toolkit.models.stable_diffusion import StableDiffusion

CAT, DOG, NEG = "a photo of a cat", "a photo of a dog", "blurry"
# diffusers' DDIM with SD's steps_offset=1 (tiny_sd.py) is our ddim on leading timesteps + 1
DDIM = dict(sampler="ddim", schedule="leading", schedule_options={"offset": 1}, progress=False)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    sd = save_sd_pipeline(root / "sd")
    no_tokenizer = root / "no-tokenizer"
    shutil.copytree(sd, no_tokenizer)
    shutil.rmtree(no_tokenizer / "tokenizer")
    return {
        "sd": sd,
        "no_tokenizer": no_tokenizer,
        "cond": save_pipeline(root / "cond", conditional=True),
    }


def diffusers_sd(model_dir, prompts, negative, seed, steps, scale=7.5) -> np.ndarray:
    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    # the pipeline draws its own noise from generators; hand it our per-sample start instead
    # (the DDIM prior's sigma scaling is its init_noise_sigma = 1 in VP space)
    latents = torch.stack([
        torch.randn((4, 8, 8), generator=torch.Generator("cpu").manual_seed(seed + i))
        for i in range(len(prompts))
    ])  # fmt: skip
    images = pipe(prompts, negative_prompt=negative, num_inference_steps=steps,
                  guidance_scale=scale, latents=latents, output_type="np").images  # fmt: skip
    return np.round(images * 255).astype(np.int16)


def test_equals_stable_diffusion_pipeline(models, tmp_path):
    prompts = [CAT, DOG, CAT]
    out = tmp_path / "out"
    metadata = generate(models["sd"], out=out, prompt=prompts, negative_prompt=NEG, n=3,
                        seed=4, steps=5, batch_size=2, **DDIM)  # fmt: skip
    assert list(metadata["guidance"]) == ["cfg"] * 3  # the default for a prompt
    assert json.loads(metadata["guidance_options"][0]) == {"scale": 7.5}
    ours = pixels(out)
    assert ours[0].shape == (16, 16, 3)  # latent 8x8, VAE scale factor 2
    theirs = diffusers_sd(models["sd"], prompts, [NEG] * 3, seed=4, steps=5)
    for i in range(3):
        assert np.abs(ours[i] - theirs[i]).max() <= 1, f"sample {i}"
    # the comparison has teeth: without the negative prompt the images change well beyond
    # the tolerance (a random tiny text encoder keeps prompts' embeddings close)
    plain = diffusers_sd(models["sd"], prompts[:1], None, seed=4, steps=5)
    assert np.abs(ours[0] - plain[0]).max() > 4


def test_v_prediction_folders_equal_the_pipeline(models, tmp_path):
    # SD 2.x (768 px) folders predict v, not epsilon: the same model read both ways
    sd = tmp_path / "sd-v"
    shutil.copytree(models["sd"], sd)
    config_file = sd / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "prediction_type": "v_prediction"}))
    generate(sd, out=tmp_path / "v", prompt=[CAT, DOG], n=2, seed=6, steps=5, **DDIM)
    generate(models["sd"], out=tmp_path / "eps", prompt=[CAT, DOG], n=2, seed=6, steps=5,
             **DDIM)  # fmt: skip
    ours, eps = pixels(tmp_path / "v"), pixels(tmp_path / "eps")
    theirs = diffusers_sd(sd, [CAT, DOG], None, seed=6, steps=5)
    for i in range(2):
        assert np.abs(ours[i] - theirs[i]).max() <= 1, f"sample {i}"
        assert np.abs(ours[i] - eps[i]).max() > 4, f"sample {i}"  # the reading matters


def test_the_folders_own_scheduler_matches_sd_configs_exactly(models, tmp_path, monkeypatch):
    # real SD configs set set_alpha_to_one=False: diffusers' last DDIM step stops at the
    # first training noise level instead of 0. `--sampler diffusers` runs the folder's own
    # scheduler config, so it reproduces that; our ddim ends at sigma 0 and differs a little
    sd = tmp_path / "sd-alpha"
    shutil.copytree(models["sd"], sd)
    config_file = sd / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "set_alpha_to_one": False}))
    # the tiny VAE hides a small latent difference in rounding: compare what gets decoded
    decoded = []
    decode = StableDiffusion.decode
    monkeypatch.setattr(StableDiffusion, "decode", lambda m, x: decoded.append(x) or decode(m, x))
    for sampler, options in (("diffusers", {}), ("ddim", DDIM)):
        generate(sd, out=tmp_path / sampler, prompt=[CAT, DOG], n=2, seed=2, steps=5,
                 **({"sampler": "diffusers", "progress": False} | options))  # fmt: skip
    exact, ours = decoded
    pipe = StableDiffusionPipeline.from_pretrained(sd)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.stack([torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(2 + i))
                           for i in range(2)])  # fmt: skip
    theirs = pipe([CAT, DOG], num_inference_steps=5, latents=latents, output_type="latent")
    theirs = theirs.images
    assert torch.allclose(exact, theirs, atol=1e-4)
    assert (ours - theirs).abs().max() > 0.01
    # and the decoded images agree with the pipeline's within 1/255
    images = pixels(tmp_path / "diffusers")
    reference = diffusers_sd(sd, [CAT, DOG], None, seed=2, steps=5)
    for i in range(2):
        assert np.abs(images[i] - reference[i]).max() <= 1, f"sample {i}"


def test_prompts_are_encoded_once_and_cfg_is_one_forward_per_step(models, tmp_path, monkeypatch):
    encoded, unet_batches = spy_forwards(monkeypatch)
    generate(models["sd"], out=tmp_path / "out", prompt=[CAT, DOG, CAT, DOG, CAT], n=5,
             steps=3, batch_size=2, **DDIM)  # fmt: skip
    # cat, dog and the empty (unconditional) prompt: each through the encoder once
    assert len(encoded) == len(set(encoded)) == 3
    # 3 batches x 3 steps, each one forward holding both CFG branches
    assert unet_batches == [4] * 6 + [2] * 3


def test_prompts_steer_images_and_are_recorded(models, tmp_path):
    runs = {}
    for name, prompt in (("cat", [CAT, DOG]), ("dog", DOG)):
        runs[name] = tmp_path / name
        generate(models["sd"], out=runs[name], prompt=prompt, n=2, seed=0, steps=4, **DDIM)
    cat, dog = pixels(runs["cat"]), pixels(runs["dog"])
    # same seed, other prompt (beyond the tolerance; a random text encoder's prompts are close)
    assert np.abs(cat[0] - dog[0]).max() > 3
    assert np.abs(cat[1] - dog[1]).max() <= 1  # same seed, same prompt
    metadata = pandas.read_csv(runs["cat"] / "metadata.csv", keep_default_na=False)
    assert list(metadata["prompt"]) == [CAT, DOG]
    assert list(metadata["negative_prompt"]) == ["", ""]
    assert list(metadata["file_name"]) == ["a_photo_of_a_cat/000000.png",
                                           "a_photo_of_a_dog/000001.png"]  # fmt: skip
    run = json.loads((runs["cat"] / "run.json").read_text())
    assert run["prompt"] == [CAT, DOG] and run["negative_prompt"] is None
    assert json.loads((runs["dog"] / "run.json").read_text())["prompt"] == DOG


def test_cli_prompts_file_and_blocklist_sees_prompts(models, tmp_path):
    prompts_file = tmp_path / "prompts.csv"
    prompts_file.write_text(f"prompt,count,negative_prompt\n{CAT},2,{NEG}\n{DOG},1,\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, [
        "generate", "--model", str(models["sd"]), "--prompts-file", str(prompts_file),
        "--steps", "2", "--schedule", "leading", "--filter", "blocklist", "--filter-option",
        "words=dog", "--out", str(out), "-q",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    metadata = pandas.read_csv(out / "metadata.csv", keep_default_na=False)
    assert list(metadata["prompt"]) == [CAT, CAT]
    assert list(metadata["negative_prompt"]) == [NEG, NEG]
    rejected = pandas.read_csv(out / "rejected.csv", keep_default_na=False)
    assert list(rejected["prompt"]) == [DOG] and list(rejected["status"]) == ["refused"]
    # no prompt: plain unconditional sampling, no guidance
    plain = generate(models["sd"], out=tmp_path / "plain", n=1, steps=2, **DDIM)
    assert list(plain["guidance"]) == ["none"] and list(plain["prompt"]) == [""]


def test_memory_options_keep_the_images(models, tmp_path, monkeypatch):
    """Attention slicing and VAE tiling trade speed for memory, not results."""
    from diffusers import AutoencoderKL

    calls = []
    original_slice, original_tiling = (UNet2DConditionModel.set_attention_slice,
                                       AutoencoderKL.enable_tiling)  # fmt: skip

    def spy_slice(self, size):
        calls.append(("slice", size))
        return original_slice(self, size)

    def spy_tiling(self, *args, **kwargs):
        calls.append(("tiling",))
        return original_tiling(self, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "set_attention_slice", spy_slice)
    monkeypatch.setattr(AutoencoderKL, "enable_tiling", spy_tiling)
    common = {"prompt": CAT, "n": 2, "steps": 3, "progress": False}
    plain = generate(models["sd"], out=tmp_path / "plain", **common)
    saving = generate(models["sd"], out=tmp_path / "saving", attention_slicing=True,
                      vae_tiling=True, **common)  # fmt: skip
    assert calls == [("slice", "auto"), ("tiling",)]
    assert len(plain) == len(saving) == 2
    a, b = pixels(tmp_path / "plain"), pixels(tmp_path / "saving")
    assert all(np.abs(a[i] - b[i]).max() <= 1 for i in a)
    run = json.loads((tmp_path / "saving" / "run.json").read_text())
    assert run["memory"] == {"attention_slicing": True, "vae_tiling": True}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_the_networks_in_it(models, tmp_path, monkeypatch, dtype):
    """--dtype: UNet and text encoder in half precision, the sampler's state in float32;
    SD's VAE (force_upcast in its config) decodes in float32 under float16."""
    seen = []
    forward = UNet2DConditionModel.forward

    def spy(self, sample, *args, **kwargs):
        seen.append((self.dtype, sample.dtype, kwargs["encoder_hidden_states"].dtype))
        return forward(self, sample, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", spy)
    decoded = []
    decode = StableDiffusion.decode

    def spy_decode(model, latents):
        decoded.append((latents.dtype, model.vae.dtype))
        return decode(model, latents)

    monkeypatch.setattr(StableDiffusion, "decode", spy_decode)
    common = {"prompt": CAT, "n": 2, "seed": 1, "steps": 4, **DDIM}
    generate(models["sd"], out=tmp_path / "full", **common)
    generate(models["sd"], out=tmp_path / "half", dtype=dtype, **common)
    half = getattr(torch, dtype)
    assert set(seen[4:]) == {(half, half, half)}
    assert decoded[1] == (torch.float32, torch.float32 if dtype == "float16" else half)
    full, low = pixels(tmp_path / "full"), pixels(tmp_path / "half")
    # half precision changes the numbers a little, not the picture
    for i in range(2):
        assert np.abs(full[i] - low[i]).mean() < 3, f"sample {i}"
    assert json.loads((tmp_path / "half" / "run.json").read_text())["dtype"] == dtype


BAD_INPUTS = {
    "prompt on label model": (["--model", "{cond}", "--prompt", CAT], "takes no --prompt"),
    "condition on text model": (["--model", "{sd}", "--condition", "digit=1"], "give --prompt"),
    "no tokenizer": (["--model", "{no_tokenizer}", "--prompt", CAT], "needs tokenizer/"),
    "cfg without prompt": (["--model", "{sd}", "--guidance", "cfg"], "needs a prompt"),
    "fair without values": (
        ["--model", "{sd}", "--prompt", CAT, "--guidance", "fair"],
        "give the values of 'group'",
    ),
    "prompts file columns": (
        ["--model", "{sd}", "--prompts-file", "{bad_csv}"],
        "needs a 'prompt' column",
    ),
    "memory options on label model": (
        ["--model", "{cond}", "--attention-slicing"],
        "--attention-slicing is for text-to-image",
    ),
    "prompt and file": (
        ["--model", "{sd}", "--prompt", CAT, "--prompts-file", "{bad_csv}"],
        "not both",
    ),
    "n against file": (
        ["--model", "{sd}", "--prompts-file", "{good_csv}", "-n", "3"],
        "asks for 2 samples",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_clear_line_and_no_files(models, tmp_path, case):
    (tmp_path / "bad.csv").write_text("text\nhello\n")
    (tmp_path / "good.csv").write_text(f"prompt,count\n{CAT},2\n")
    paths = {name: str(path) for name, path in models.items()}
    paths.update(bad_csv=str(tmp_path / "bad.csv"), good_csv=str(tmp_path / "good.csv"))
    template, message = BAD_INPUTS[case]
    args = [a.format(**paths) if a.startswith("{") else a for a in template]
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["generate", *args, "--out", str(out), "--steps", "2", "-q"])
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists()
