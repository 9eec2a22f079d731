"""The PixArt family (`toolkit.models.pixart`) on tiny random PixArt-α and PixArt-Σ folders
built offline (`tiny_pixart.py`): ``dtk generate`` equals the pipelines from the same
per-sample start, T5's attention mask included."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas
import pytest
import torch
from diffusers import PixArtTransformer2DModel
from diffusers.image_processor import PixArtImageProcessor
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
    ASPECT_RATIO_256_BIN,
    ASPECT_RATIO_512_BIN,
    ASPECT_RATIO_1024_BIN,
)
from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN
from folders import (
    assert_damaged_copy_refused,
    capture_decoded,
    edit_json,
    max_pixel_difference,
    pixels,
)
from invoke import dtk
from tiny_pixart import PIPELINES, save_pixart_pipeline, spy_size_conditions
from transformers import T5EncoderModel

import toolkit
from toolkit.models import open_model
from toolkit.models.detect import PIXART, detect_family
from toolkit.models.pixart import PixArt

# the pipelines lower-case and strip the prompt (their caption preprocessing)
CAT, DOG, NEG = " A photo of a CAT", "a red dog", "blurry"
#: latents of two float32 runs of the same math, in different orders, relative to the
#: largest latent (measured: up to 1e-6)
LATENT_TOL = 1e-5
TWIN = {"sampler": "dpmpp_2m", "schedule": "linspace", "schedule_options": {"variant": "dpmsolver"}}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pixart")
    return {variant: save_pixart_pipeline(root / variant, variant) for variant in PIPELINES}


@pytest.fixture
def decoded(monkeypatch):
    """The latents each run decodes, in order."""
    return capture_decoded(monkeypatch, PixArt)


def start(seed: int, n: int, shape=(4, 8, 8)) -> torch.Tensor:
    """Our per-sample start: sample i from its own generator seeded seed + i."""
    return torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed + i))
                        for i in range(n)])  # fmt: skip


def pipeline(folder, variant, prompts, seed, *, output_type="np", shape=(4, 8, 8), **kwargs):
    """The pipeline's images (as our pixels: int16) or latents from our per-sample start, at
    the folder's size (the tiny folders' sizes are in no aspect-ratio table: no binning)."""
    pipe = PIPELINES[variant].from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompts, latents=start(seed, len(prompts), shape), output_type=output_type,
               use_resolution_binning=False, **kwargs)  # fmt: skip
    if output_type == "latent":
        return out.images
    return np.round(out.images * 255).astype(np.int16)


def relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max())


@pytest.mark.parametrize("variant", list(PIPELINES))
@pytest.mark.parametrize("sampler", ["twin", "diffusers"])
def test_generate_equals_the_pipeline_with_cfg(folders, tmp_path, decoded, variant, sampler):
    """Two prompts and a negative prompt in one batch, CFG at the pipelines' 4.5: the
    folder's DPMSolverMultistepScheduler as our dpmpp_2m on its linspace timesteps, and
    through --sampler diffusers."""
    out = tmp_path / "out"
    options = TWIN if sampler == "twin" else {"sampler": "diffusers"}
    toolkit.generate(folders[variant], out=out, prompt=[CAT, DOG], negative_prompt=NEG, n=2,
                     seed=5, steps=6, progress=False, **options)  # fmt: skip
    [ours] = decoded
    kwargs = dict(negative_prompt=[NEG] * 2, num_inference_steps=6)
    theirs = pipeline(folders[variant], variant, [CAT, DOG], 5, output_type="latent", **kwargs)
    assert relative(ours, theirs) <= LATENT_TOL
    images = pixels(out)
    assert images[0].shape == (16, 16, 3)  # latent 8x8, VAE scale factor 2
    reference = pipeline(folders[variant], variant, [CAT, DOG], 5, **kwargs)
    assert max_pixel_difference(images, reference) <= 1
    # the comparison has teeth: without the negative prompt the latents move well beyond it
    plain = pipeline(folders[variant], variant, [CAT, DOG], 5, num_inference_steps=6,
                     output_type="latent")  # fmt: skip
    assert relative(ours, plain) > 1e-2
    run = json.loads((out / "run.json").read_text())
    info = run["model_info"]
    assert (info["family"], info["pipeline"]) == (PIXART, PIPELINES[variant].__name__)
    assert run["guidance"] == {"name": "cfg", "options": {"scale": 4.5}}


@pytest.mark.parametrize("variant", list(PIPELINES))
def test_t5_sees_the_prompt_with_its_mask(folders, tmp_path, decoded, monkeypatch, variant):
    """T5 runs once per distinct prompt, on the pipeline's max_sequence_length tokens (α 120,
    Σ 300) with the padding masked; the transformer attends with that mask, and without it
    the samples would differ."""
    calls, masks = [], []
    t5_forward, forward = T5EncoderModel.forward, PixArtTransformer2DModel.forward

    def spy_t5(self, input_ids=None, attention_mask=None, **kwargs):
        calls.extend(zip(map(tuple, input_ids.tolist()), attention_mask.sum(1).tolist()))
        return t5_forward(self, input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def spy(self, hidden_states, *args, encoder_attention_mask=None, **kwargs):
        masks.append(encoder_attention_mask)
        return forward(self, hidden_states, *args, encoder_attention_mask=encoder_attention_mask,
                       **kwargs)  # fmt: skip

    monkeypatch.setattr(T5EncoderModel, "forward", spy_t5)
    monkeypatch.setattr(PixArtTransformer2DModel, "forward", spy)
    toolkit.generate(folders[variant], out=tmp_path / "out", prompt=[CAT, DOG, CAT], n=3,
                     seed=1, steps=3, batch_size=2, progress=False, **TWIN)  # fmt: skip
    length = 120 if variant == "alpha" else 300
    # cat, dog and the empty (unconditional) prompt, each once: "a photo of a cat" + </s>
    assert len(calls) == len({ids for ids, _ in calls}) == 3
    assert {len(ids) for ids, _ in calls} == {length}
    assert sorted(tokens for _, tokens in calls) == [1, 4, 6]
    assert masks[0].shape == (4, length) and int(masks[0].sum()) == 6 + 4 + 1 + 1
    assert len(masks) == 3 + 3  # both branches in one call per step: two batches
    monkeypatch.undo()
    first = decoded[0]
    # the pipeline with the same embeddings but nothing masked samples elsewhere
    pipe = PIPELINES[variant].from_pretrained(folders[variant])
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        embeds, mask, negative, negative_mask = pipe.encode_prompt([CAT, DOG], negative_prompt="")
    ones = torch.ones_like(mask)
    unmasked = pipe(negative_prompt=None, prompt_embeds=embeds, prompt_attention_mask=ones,
                    negative_prompt_embeds=negative, negative_prompt_attention_mask=ones,
                    latents=start(1, 2), num_inference_steps=3, output_type="latent",
                    use_resolution_binning=False).images  # fmt: skip
    masked = pipe(negative_prompt=None, prompt_embeds=embeds, prompt_attention_mask=mask,
                  negative_prompt_embeds=negative, negative_prompt_attention_mask=negative_mask,
                  latents=start(1, 2), num_inference_steps=3, output_type="latent",
                  use_resolution_binning=False).images  # fmt: skip
    assert relative(first, masked) <= LATENT_TOL
    assert relative(first, unmasked) > 1e-2


def test_the_default_command_runs(folders, tmp_path):
    """No sampler, schedule, steps or guidance: the twin of the folder's DPM-Solver++
    (dpmpp_2m on linspace variant=dpmsolver), the pipelines' 20 steps and guidance scale
    4.5, recorded."""
    out = tmp_path / "out"
    result = dtk("generate", "--model", folders["sigma"], "--prompt", DOG, "-n", 2, "--out", out,
                 "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    run = json.loads((out / "run.json").read_text())
    sampling = (run["sampler"]["name"], run["schedule"]["name"], run["steps"])
    assert sampling == ("dpmpp_2m", "linspace", 20)
    assert run["schedule"]["options"] == {"variant": "dpmsolver"}
    assert run["guidance"] == {"name": "cfg", "options": {"scale": 4.5}}
    metadata = pandas.read_csv(out / "metadata.csv", keep_default_na=False)
    assert list(metadata["prompt"]) == [DOG] * 2 and list(metadata["steps"]) == [20, 20]
    assert len(pixels(out)) == 2


def test_pixart_alpha_at_1024_px_takes_its_size_conditions(tmp_path, decoded, monkeypatch):
    """A PixArt-α transformer of sample_size 128 takes the resolution and aspect ratio: the
    image's height and width in pixels (here 256: a scale-2 VAE), as the α pipeline hands
    them (its binning off: this VAE's default size is not in the 1024 px table)."""
    folder = save_pixart_pipeline(tmp_path / "alpha128", "alpha", sample_size=128)
    assert open_model(folder).size_conditions
    seen = spy_size_conditions(monkeypatch)
    toolkit.generate(folder, out=tmp_path / "out", prompt=CAT, n=1, seed=1, steps=2,
                     progress=False, **TWIN)  # fmt: skip
    ours_conditions = seen[0]
    theirs = pipeline(folder, "alpha", [CAT], 1, output_type="latent", shape=(4, 128, 128),
                      num_inference_steps=2)  # fmt: skip
    theirs_conditions = seen[-1]
    for key in ("resolution", "aspect_ratio"):
        torch.testing.assert_close(ours_conditions[key], theirs_conditions[key])
    assert ours_conditions["resolution"].tolist() == [[256.0, 256.0]] * 2
    [ours] = decoded
    assert relative(ours, theirs) <= LATENT_TOL


@pytest.mark.parametrize(
    "sample_size, table",
    [(32, ASPECT_RATIO_256_BIN), (64, ASPECT_RATIO_512_BIN), (128, ASPECT_RATIO_1024_BIN),
     (256, ASPECT_RATIO_2048_BIN)],
)  # fmt: skip
def test_resolution_binning_keeps_a_published_folders_default_size(sample_size, table):
    """With their scale-8 VAE, the published folders' default size is its own bin: the
    pipelines' binning changes nothing there, so sampling at the default size is theirs."""
    size = sample_size * 8
    binned = PixArtImageProcessor.classify_height_width_bin(size, size, ratios=table)
    assert binned == (size, size)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A PixArt-α folder at a published size: sample_size 32 and a scale-8 VAE (256 px, the
    square entry of ASPECT_RATIO_256_BIN), so the pipeline's resolution binning applies."""
    from diffusers import AutoencoderKL

    path = tmp_path_factory.mktemp("pixart-published") / "alpha256"
    save_pixart_pipeline(path, "alpha", sample_size=32)
    torch.manual_seed(3)
    AutoencoderKL(block_out_channels=(32,) * 4, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4,
                  layers_per_block=1, norm_num_groups=32,
                  sample_size=256).save_pretrained(path / "vae")  # fmt: skip
    return path


#: a non-square size of no table entry: binned to ASPECT_RATIO_256_BIN's 208x304 (ratio 0.68)
BINNED = (208, 320)


@pytest.mark.parametrize("binning", [True, False])
def test_resolution_binning_is_the_pipelines(published, tmp_path, binning):
    """--height/--width off the table: with binning (the default) sampled at the nearest
    entry of the pipeline's aspect-ratio table and resized back, as PixArtAlphaPipeline does
    by default; with resolution_binning=false sampled at the size asked. Both equal the
    pipeline called with one generator per sample."""
    height, width = BINNED
    out = tmp_path / "out"
    options = {} if binning else {"model_options": {"resolution_binning": False}}
    toolkit.generate(published, out=out, prompt=[CAT, DOG], n=2, seed=4, steps=3,
                     height=height, width=width, progress=False, **TWIN,
                     **options)  # fmt: skip
    pipe = PIPELINES["alpha"].from_pretrained(published)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator("cpu").manual_seed(4 + i) for i in range(2)]
    theirs = pipe([CAT, DOG], height=height, width=width, num_inference_steps=3,
                  generator=generators, use_resolution_binning=binning,
                  output_type="np").images  # fmt: skip
    images = pixels(out)
    assert images[0].shape == (height, width, 3)
    assert max_pixel_difference(images, np.round(theirs * 255).astype(np.int16)) <= 1
    run = json.loads((out / "run.json").read_text())
    assert run["model_options"] == {"resolution_binning": binning}
    assert run["size"] == {"height": height, "width": width}
    sampled = [4, 26, 38] if binning else [4, 26, 40]  # 208x304 or 208x320 px, a scale-8 VAE
    assert run["model_info"]["sample_shape"] == sampled
    if binning:  # the other setting is another image: the comparison has teeth
        other = pipe([CAT, DOG], height=height, width=width, num_inference_steps=3,
                     generator=[torch.Generator("cpu").manual_seed(4 + i) for i in range(2)],
                     use_resolution_binning=False, output_type="np").images  # fmt: skip
        assert max_pixel_difference(images, np.round(other * 255).astype(np.int16)) > 8


def test_a_size_on_the_table_and_the_default_are_not_resized(published):
    folder = open_model(published)
    folder.model_options = folder.check_model_options({})
    assert folder.model_options == {"resolution_binning": True}
    for size in (None, (208, 304)):  # the default (256x256) and an entry of the table
        folder.image_size = size
        assert folder.binned_size is None
    folder.image_size = BINNED
    assert folder.binned_size == (208, 304) and folder.image_shape == (3, *BINNED)


def test_binning_is_refused_where_the_tables_do_not_apply(folders, tmp_path):
    """A folder whose default size is no table's square entry samples at the size asked;
    the option would do nothing there, so it is refused in one line."""
    result = dtk("generate", "--model", folders["alpha"], "--prompt", CAT, "--model-option",
                 "resolution_binning=true", "--out", tmp_path / "out")  # fmt: skip
    assert result.exit_code == 2
    assert "is not an entry of the pipelines' aspect-ratio tables" in result.stderr
    assert not (tmp_path / "out").exists()


def test_detection_and_the_folders_configs(folders):
    assert detect_family(folders["alpha"]) == detect_family(folders["sigma"]) == PIXART
    alpha, sigma = open_model(folders["alpha"]), open_model(folders["sigma"])
    assert (alpha.max_length, sigma.max_length) == (120, 300)
    assert alpha.sample_shape == (4, 8, 8) and alpha.image_shape == (3, 16, 16)
    assert alpha.default_sampling() == ("dpmpp_2m", "linspace", 20)
    assert alpha.default_schedule_options() == {"variant": "dpmsolver"}
    assert alpha.default_guidance(True) == ("cfg", {"scale": 4.5})
    assert alpha.learned_sigma and not alpha.learned_variance and not alpha.size_conditions


def test_a_legacy_transformer2dmodel_folder_is_pixart(folders, tmp_path, decoded):
    """Published PixArt-α folders name their transformer Transformer2DModel (norm_type
    ada_norm_single), which diffusers loads as PixArtTransformer2DModel."""
    folder = tmp_path / "legacy"
    shutil.copytree(folders["alpha"], folder)
    edit_json(folder / "transformer" / "config.json", _class_name="Transformer2DModel")
    edit_json(folder / "model_index.json", transformer=["diffusers", "Transformer2DModel"])
    toolkit.generate(folder, out=tmp_path / "out", prompt=DOG, n=1, seed=2, steps=3,
                     progress=False, **TWIN)  # fmt: skip
    [ours] = decoded
    theirs = pipeline(folder, "alpha", [DOG], 2, num_inference_steps=3, output_type="latent")
    assert relative(ours, theirs) <= LATENT_TOL


BROKEN = {
    "no T5": (lambda f: shutil.rmtree(f / "text_encoder"), "needs text_encoder/config.json"),
    "T5 width": (lambda f: edit_json(f / "text_encoder" / "config.json", d_model=48),
                 "T5 gives 48 features; the transformer's caption_channels is 32"),
    "a DiT transformer": (lambda f: edit_json(f / "transformer" / "config.json",
                                          _class_name="DiTTransformer2DModel"),
                          "the transformer is a DiTTransformer2DModel; a PixArt folder needs "
                          "PixArtTransformer2DModel"),
    "latent channels": (lambda f: edit_json(f / "vae" / "config.json", latent_channels=16),
                        "the transformer takes 4 latent channels but the VAE gives 16"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_folder_is_one_line_before_any_weights(folders, tmp_path, case):
    assert_damaged_copy_refused(folders["sigma"], tmp_path, *BROKEN[case], "--prompt", DOG)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--attention-slicing"], "the PixArt transformer has no sliced attention"),
        (["--condition", "style=photo"], "is a text-to-image model: give --prompt"),
    ],
)  # fmt: skip
def test_what_pixart_cannot_do_is_one_line(folders, tmp_path, args, message):
    prompt = ["--prompt", DOG] if "--condition" not in args else []
    result = dtk("generate", "--model", folders["alpha"], *prompt, "-n", 1, "--steps", 2, *args,
                 "--out", tmp_path / "out", "-q")  # fmt: skip
    assert result.exit_code == 2, result.output
    [line] = result.stderr.splitlines()
    assert message in line, line
