"""The image size (``--width``/``--height``, `GenerationSettings.width`/``height``) on tiny
random folders built offline: a non-square size equals the diffusers pipeline called with
that height and width and one generator per sample (SD, SDXL with its size ``time_ids``,
SD 3, PixArt-α with its resolution conditions); the per-sample noise is drawn in the
requested latent shape; sizes are checked at plan time, recorded in run.json and part of
the run's identity; the families with one trained size refuse them."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pandas
import pytest
import torch
from diffusers import (
    PixArtAlphaPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from folders import max_pixel_difference, pixels, prompts_file
from invoke import dtk
from tiny_dit import save_dit_pipeline
from tiny_models import save_pipeline, save_ve_pipeline
from tiny_pixart import save_pixart_pipeline, spy_size_conditions
from tiny_sd import save_sd_pipeline
from tiny_sd3 import save_sd3_pipeline
from tiny_sdxl import save_sdxl_pipeline

import toolkit
from toolkit.generation.plan import make_plan
from toolkit.generation.request import GenerationRequest, GenerationSettings
from toolkit.models import open_model
from toolkit.models.family import NetworkModel

CAT, DOG, NEG = "a photo of a cat", "a red dog", "blurry"
#: a non-square size of each family's tiny folder (a scale-2 VAE, default 16x16; SD 3 and
#: PixArt patch 2x2; SD's and SDXL's pipelines take multiples of 8 alone)
SIZE = HEIGHT, WIDTH = 24, 40
#: latents of two float32 runs of the same math, in different orders
LATENT_TOL = 1e-4
#: each family's sampler that steps as its folder's scheduler (tiny_*.py)
SAMPLERS = {
    "sd": ["--sampler", "ddim", "--schedule", "leading", "--schedule-option", "offset=1"],
    "sdxl": ["--sampler", "euler", "--schedule", "leading", "--schedule-option", "offset=1"],
    "sd3": ["--sampler", "euler", "--schedule", "flow"],
}
PIPELINES = {"sd": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline,
             "sd3": StableDiffusion3Pipeline}  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("size")
    return {"sd": save_sd_pipeline(root / "sd"), "sdxl": save_sdxl_pipeline(root / "sdxl"),
            "sd3": save_sd3_pipeline(root / "sd3")}  # fmt: skip


@pytest.fixture
def decoded(monkeypatch):
    """The latents every run decodes (any family), in order."""
    latents: list[torch.Tensor] = []
    for family in ("stable_diffusion.StableDiffusion", "sdxl.StableDiffusionXL",
                   "sd3.StableDiffusion3", "pixart.PixArt"):  # fmt: skip
        module, name = family.split(".")
        cls = getattr(__import__(f"toolkit.models.{module}", fromlist=[name]), name)

        def spy(model, x, decode=cls.decode):
            latents.append(x.clone())
            return decode(model, x)

        monkeypatch.setattr(cls, "decode", spy)
    return latents


def pipeline(family, folder, prompts, seed, height, width, *, output_type="np", **kwargs):
    """The pipeline's images (as our pixels: int16) or latents at `height` x `width`, sample
    i drawn by its own generator seeded seed + i."""
    extra = {"add_watermarker": False} if family == "sdxl" else {}
    if family == "sd3":
        extra = {"text_encoder_3": None, "tokenizer_3": None}
    pipe = PIPELINES[family].from_pretrained(folder, **extra)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(len(prompts))]
    out = pipe(prompts, height=height, width=width, generator=generators,
               output_type=output_type, **kwargs)  # fmt: skip
    if output_type == "latent":
        return out.images
    return np.round(out.images * 255).astype(np.int16)


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
def test_a_non_square_size_equals_the_pipeline(folders, tmp_path, decoded, family):
    """Two prompts with a negative prompt and CFG, 4 steps, at a non-square size: the
    pipeline called with that height and width and a generator per sample gives the same
    latents and pixels (within one level of 255); SDXL's time_ids are that size."""
    height, width = SIZE
    out = tmp_path / "out"
    result = dtk("generate", "--model", folders[family], "--prompts-file",
                 prompts_file(tmp_path, CAT, DOG, negative=NEG), *SAMPLERS[family], "--steps", 4,
                 "--seed", 3, "--width", width, "--height", height, "--out", out,
                 "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    [ours] = decoded
    assert ours.shape == (2, 4, height // 2, width // 2)
    kwargs = dict(negative_prompt=[NEG] * 2, num_inference_steps=4)
    theirs = pipeline(family, folders[family], [CAT, DOG], 3, height, width,
                      output_type="latent", **kwargs)  # fmt: skip
    assert float((ours - theirs).abs().max()) <= LATENT_TOL
    images = pixels(out)
    assert images[0].shape == (height, width, 3)
    reference = pipeline(family, folders[family], [CAT, DOG], 3, height, width, **kwargs)
    assert max_pixel_difference(images, reference) <= 1
    run = json.loads((out / "run.json").read_text())
    assert run["size"] == {"height": height, "width": width}
    assert run["model_info"]["image_shape"] == [3, height, width]
    if family == "sdxl":
        assert run["model_info"]["time_ids"] == [height, width, 0, 0, height, width]
        # the size conditioning matters: the folder's own size in time_ids samples elsewhere
        default_ids = pipeline(family, folders[family], [CAT, DOG], 3, height, width,
                               output_type="latent", original_size=(16, 16),
                               target_size=(16, 16), **kwargs)  # fmt: skip
        assert float((ours - default_ids).abs().max()) > 100 * LATENT_TOL
    metadata = pandas.read_csv(out / "metadata.csv")
    assert list(metadata["height"]) == [height] * 2 and list(metadata["width"]) == [width] * 2


def test_the_noise_is_drawn_in_the_requested_latent_shape(folders, tmp_path, monkeypatch):
    """Sample i's start is randn((C, h, w)) of its own generator, h and w the requested
    size's latent sides, whatever batch it is in."""
    seen = []
    prior = NetworkModel.prior

    def spy(model, eps, sigma):
        seen.append(eps.clone())
        return prior(model, eps, sigma)

    monkeypatch.setattr(NetworkModel, "prior", spy)
    toolkit.generate(folders["sd"], out=tmp_path / "out", prompt=CAT, n=3, seed=11, steps=1,
                     batch_size=2, height=HEIGHT, width=WIDTH, progress=False)  # fmt: skip
    eps = torch.cat(seen)
    expected = torch.stack([torch.randn((4, HEIGHT // 2, WIDTH // 2),
                                        generator=torch.Generator("cpu").manual_seed(11 + i))
                            for i in range(3)])  # fmt: skip
    assert torch.equal(eps, expected)


def test_pixart_alpha_conditions_on_the_requested_size(tmp_path, decoded, monkeypatch):
    """PixArt-α at 1024 px (sample_size 128) conditions on the image's height, width and
    aspect ratio: at a requested non-square size, those of that size, as the α pipeline
    (resolution binning off) hands them; the latents are the pipeline's."""
    folder = save_pixart_pipeline(tmp_path / "alpha128", "alpha", sample_size=128)
    height, width = SIZE
    seen = spy_size_conditions(monkeypatch)
    toolkit.generate(folder, out=tmp_path / "out", prompt=CAT, n=2, seed=1, steps=2,
                     height=height, width=width, sampler="dpmpp_2m", schedule="linspace",
                     schedule_options={"variant": "dpmsolver"}, progress=False)  # fmt: skip
    ours_conditions = seen[0]
    pipe = PixArtAlphaPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator("cpu").manual_seed(1 + i) for i in range(2)]
    theirs = pipe([CAT] * 2, height=height, width=width, generator=generators,
                  num_inference_steps=2, use_resolution_binning=False,
                  output_type="latent").images  # fmt: skip
    theirs_conditions = seen[-1]
    for key in ("resolution", "aspect_ratio"):
        torch.testing.assert_close(ours_conditions[key], theirs_conditions[key])
    assert ours_conditions["resolution"].tolist() == [[float(height), float(width)]] * 4
    [ours] = decoded
    assert ours.shape == (2, 4, height // 2, width // 2)
    assert float((ours - theirs).abs().max() / theirs.abs().max()) <= 1e-5


def test_flow_shifts_follow_the_requested_size(folders, tmp_path):
    """SD 3 with dynamic shifting: mu is the pipeline's calculate_shift of the requested
    size's sequence length (Flux's: tests/test_flux.py)."""
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
        calculate_shift,
    )

    sd3 = tmp_path / "dynamic"
    shutil.copytree(folders["sd3"], sd3)
    config_file = sd3 / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()),
                                       "use_dynamic_shifting": True}))  # fmt: skip
    folder = open_model(sd3)
    folder.image_size = folder.check_size(*SIZE)
    assert folder.sample_shape == (4, 12, 20)
    length = (12 // 2) * (20 // 2)
    assert math.isclose(folder.noise_levels.mu, calculate_shift(length, 256, 4096, 0.5, 1.15))


def test_the_dry_run_shows_the_size_and_the_default_is_the_same_run(folders, tmp_path):
    result = dtk("generate", "--model", folders["sd"], "--prompt", CAT, "-n", 1, "--width",
                 WIDTH, "--height", HEIGHT, "--dry-run")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"(stable-diffusion, samples 4x{HEIGHT // 2}x{WIDTH // 2})" in result.stdout
    assert f"size      {WIDTH}x{HEIGHT} pixels (width x height; --width/--height)" in result.stdout
    # one side given: the other is the model's (16)
    plan = make_plan(GenerationRequest(folders["sd"], tmp_path / "o", prompt=CAT, n=1,
                                       settings=GenerationSettings(width=WIDTH)))  # fmt: skip
    assert plan.folder.image_size == (16, WIDTH) and plan.record["size"] == {
        "height": 16, "width": WIDTH}  # fmt: skip
    # the model's own size asked for by name is the default: no size recorded
    settings = GenerationSettings(width=16, height=16)
    plan = make_plan(GenerationRequest(folders["sd"], tmp_path / "o", prompt=CAT, n=1,
                                       settings=settings))  # fmt: skip
    assert plan.folder.image_size is None and "size" not in plan.record
    result = dtk("generate", "--model", folders["sd"], "--prompt", CAT, "-n", 1, "--dry-run")
    assert "size      16x16 pixels (width x height; the model's default)" in result.stdout


def test_a_folder_resumes_only_at_its_size(folders, tmp_path):
    out = tmp_path / "out"
    args = ["generate", "--model", folders["sd"], "--prompt", CAT, "--steps", 1, "--out", out,
            "-q"]  # fmt: skip
    assert dtk(*args, "-n", 1, "--width", WIDTH).exit_code == 0
    assert dtk(*args, "-n", 2, "--width", WIDTH).exit_code == 0  # resumed, extended
    assert len(pandas.read_csv(out / "metadata.csv")) == 2
    other = dtk(*args, "-n", 3, "--width", 24)
    assert other.exit_code == 2
    [line] = other.stderr.splitlines()
    assert "holds a different run (differing in size)" in line, line
    default = dtk(*args, "-n", 3)
    assert default.exit_code == 2 and "differing in size" in default.stderr


ONE_SIZE = {
    "unet": lambda path: save_pipeline(path),
    "ve": lambda path: save_ve_pipeline(path),
    "dit": lambda path: save_dit_pipeline(path),
}


@pytest.mark.parametrize("family", list(ONE_SIZE))
def test_families_with_one_trained_size_refuse_a_size_in_one_line(tmp_path, family):
    folder = ONE_SIZE[family](tmp_path / family)
    out = tmp_path / "out"
    result = dtk("generate", "--model", folder, "-n", 1, "--height", 32, "--out", out)
    assert result.exit_code == 2, result.output
    [line] = result.stderr.splitlines()
    assert f"a {family} model samples at the one size it was trained at" in line, line
    assert not out.exists()


@pytest.mark.parametrize(
    "family, args, message",
    [
        ("sd", ["--width", 15], "--width 15: an image side of this stable-diffusion model is a "
         "positive multiple of 2 (the VAE's scale factor 2)"),
        ("sd", ["--height", 0], "--height 0: an image side"),
        ("sd", ["--height", -4], "--height -4: an image side"),
        ("sd3", ["--width", 22], "a positive multiple of 4 (the VAE's scale factor 2 times the "
         "2x2 latent patches)"),
        ("sd3", ["--width", 68], "positional embedding covers 16 patches a side, at most 64"),
    ],
)  # fmt: skip
def test_a_bad_size_is_one_line_before_any_weights(folders, tmp_path, family, args, message):
    out = tmp_path / "out"
    result = dtk("generate", "--model", folders[family], "--prompt", CAT, "-n", 1, *args,
                 "--out", out)  # fmt: skip
    assert result.exit_code == 2, result.output
    [line] = result.stderr.splitlines()
    assert message in line, line
    assert not out.exists()


def test_a_size_from_python_must_be_whole_pixels(folders, tmp_path):
    with pytest.raises(toolkit.DtkError, match="give a whole number of pixels"):
        make_plan(GenerationRequest(folders["sd"], tmp_path / "o", prompt=CAT, n=1,
                                    settings=GenerationSettings(height=12.5)))  # fmt: skip
