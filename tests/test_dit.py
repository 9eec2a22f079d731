"""The DiT family (`toolkit.models.dit`) on tiny random folders built offline (`tiny_dit.py`):
``dtk generate`` equals ``DiTPipeline`` from the same per-sample start, classes are named
by id2label's names, and the null class is the transformer's extra embedding."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas
import pytest
import torch
from diffusers import (
    DDPMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
)
from folders import (
    assert_damaged_copy_refused,
    capture_decoded,
    edit_json,
    max_pixel_difference,
    pixels,
)
from invoke import dtk
from tiny_dit import LATENT, NUM_CLASSES, save_dit_pipeline

import toolkit
from toolkit.models import open_model
from toolkit.models.detect import DIT, detect_family
from toolkit.models.dit import DiT

#: latents of two float32 runs of the same math, in different orders, relative to the
#: largest latent (measured: up to 1.2e-6)
LATENT_TOL = 1e-5
#: the pipeline's own scheduler through --sampler diffusers, or our twin of it, per folder
CASES = {
    "ddim-default": ("ddim", {}),  # ddim on leading: the family's default for DDIM folders
    "ddim-diffusers": ("ddim", {"sampler": "diffusers"}),
    "dpm-twin": ("dpm", {"sampler": "dpmpp_2m", "schedule": "linspace",
                         "schedule_options": {"variant": "dpmsolver"}}),
    "dpm-diffusers": ("dpm", {"sampler": "diffusers"}),
}  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit")
    dpm = DPMSolverMultistepScheduler(beta_schedule="linear")
    return {"ddim": save_dit_pipeline(root / "ddim"),
            "dpm": save_dit_pipeline(root / "dpm", scheduler=dpm),
            "plain": save_dit_pipeline(root / "plain", learned_sigma=False)}  # fmt: skip


@pytest.fixture
def decoded(monkeypatch):
    """The latents each run decodes, in order."""
    return capture_decoded(monkeypatch, DiT)


def pipeline(folder, classes, seed, *, output_type="np", **kwargs):
    """The pipeline's images (as our pixels: int16) or latents, sample i drawn from its own
    generator seeded seed + i, as ours."""
    pipe = DiTPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(len(classes))]
    if output_type == "latent":  # the pipeline decodes always: catch what it decodes
        latents = []
        decode = pipe.vae.decode
        pipe.vae.decode = lambda z, **kw: latents.append(z * pipe.vae.config.scaling_factor) or (
            decode(z, **kw))  # fmt: skip
        pipe(class_labels=classes, generator=generators, output_type="np", **kwargs)
        return latents[0]
    images = pipe(class_labels=classes, generator=generators, output_type="np", **kwargs).images
    return np.round(images * 255).astype(np.int16)


def relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max())


@pytest.mark.parametrize("case", list(CASES))
def test_generate_equals_the_pipeline_with_cfg(folders, tmp_path, decoded, case):
    """Two classes by name in one batch, CFG at the pipeline's 4.0: (a) the folder's DDIM
    as our ddim (the default) and through --sampler diffusers, (b) a DPM-Solver folder as
    dpmpp_2m on its linspace timesteps and through --sampler diffusers."""
    folder, options = CASES[case]
    out = tmp_path / "out"
    classes = [{"class": "golden retriever"}, {"class": "tabby cat"}]
    toolkit.generate(folders[folder], out=out, conditions=classes, n=2, seed=5, steps=6,
                     progress=False, **options)  # fmt: skip
    [ours] = decoded
    theirs = pipeline(folders[folder], [207, 281], 5, num_inference_steps=6, output_type="latent")
    assert relative(ours, theirs) <= LATENT_TOL
    images = pixels(out)
    assert images[0].shape == (16, 16, 3)  # latent 8x8, VAE scale factor 2
    reference = pipeline(folders[folder], [207, 281], 5, num_inference_steps=6)
    assert max_pixel_difference(images, reference) <= 1
    # the comparison has teeth: without guidance, or with the classes swapped, the images
    # move well beyond the tolerance
    unguided = pipeline(folders[folder], [207, 281], 5, num_inference_steps=6, guidance_scale=1)
    assert max_pixel_difference(images, unguided) > 4
    swapped = pipeline(folders[folder], [281, 207], 5, num_inference_steps=6)
    assert max_pixel_difference(images, swapped) > 4
    run = json.loads((out / "run.json").read_text())
    assert run["model_info"]["family"] == DIT and run["model_info"]["learned_sigma"]
    assert run["guidance"] == {"name": "cfg", "options": {"scale": 4.0}}
    metadata = pandas.read_csv(out / "metadata.csv", keep_default_na=False)
    # "tabby cat" is class 281's other name: recorded as the class's value, "tabby"
    assert list(metadata["class"]) == ["golden retriever", "tabby"]


def test_the_default_command_samples_as_the_pipeline(folders, tmp_path, decoded):
    """No sampler, schedule, steps or guidance: DiT-XL-2's DDIM as our ddim on leading, the
    pipeline's 50 steps and guidance scale 4.0, recorded; a class by its number."""
    out = tmp_path / "out"
    result = dtk("generate", "--model", folders["ddim"], "--condition", "class=1", "-n", 2,
                 "--out", out, "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    run = json.loads((out / "run.json").read_text())
    sampling = (run["sampler"]["name"], run["schedule"]["name"], run["steps"])
    assert sampling == ("ddim", "leading", 50)
    assert run["guidance"] == {"name": "cfg", "options": {"scale": 4.0}}
    metadata = pandas.read_csv(out / "metadata.csv", keep_default_na=False)
    assert list(metadata["class"]) == ["goldfish"] * 2
    assert list(metadata["file_name"]) == ["goldfish/000000.png", "goldfish/000001.png"]
    [ours] = decoded
    theirs = pipeline(folders["ddim"], [1, 1], 0, output_type="latent")  # its defaults
    assert relative(ours, theirs) <= LATENT_TOL


def test_without_a_class_it_samples_the_null_class_unguided(folders, tmp_path, decoded,
                                                            monkeypatch):  # fmt: skip
    """A request without a class is the model's unconditional one: the null class id
    num_classes (1000, the extra row of the class table, which DiTPipeline's CFG uses)."""
    labels_seen = []
    forward = DiTTransformer2DModel.forward

    def spy(self, hidden_states, *args, class_labels=None, **kwargs):
        labels_seen.append(class_labels.tolist())
        return forward(self, hidden_states, *args, class_labels=class_labels, **kwargs)

    monkeypatch.setattr(DiTTransformer2DModel, "forward", spy)
    out = tmp_path / "out"
    result = dtk("generate", "--model", folders["ddim"], "-n", 1, "--steps", 4, "--out", out,
                 "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((out / "run.json").read_text())["guidance"]["name"] == "none"
    assert labels_seen == [[NUM_CLASSES]] * 4  # one branch: no guidance
    monkeypatch.undo()
    [ours] = decoded
    null = pipeline(folders["ddim"], [NUM_CLASSES], 0, num_inference_steps=4, guidance_scale=1,
                    output_type="latent")  # fmt: skip
    assert relative(ours, null) <= LATENT_TOL
    transformer = DiTTransformer2DModel.from_pretrained(folders["ddim"] / "transformer")
    table = transformer.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
    assert table.num_embeddings == NUM_CLASSES + 1


def test_a_transformer_without_learned_sigma_equals_the_pipeline(folders, tmp_path, decoded):
    result = dtk("generate", "--model", folders["plain"], "--condition", "class=tench", "-n", 2,
                 "--steps", 4, "--seed", 2, "--out", tmp_path / "out", "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    [ours] = decoded
    theirs = pipeline(folders["plain"], [0, 0], 2, num_inference_steps=4, output_type="latent")
    assert relative(ours, theirs) <= LATENT_TOL
    assert not open_model(folders["plain"]).learned_sigma


def test_a_learned_variance_scheduler_samples_ddpm_with_the_variance(tmp_path):
    """A DDPM scheduler config whose variance_type is learned_range keeps the learned sigma
    for ddpm (the label-UNet family's seam); the pipeline drops it whatever the scheduler."""
    images = {}
    for variance in ("learned_range", "fixed_small"):
        folder = save_dit_pipeline(tmp_path / variance,
                                   scheduler=DDPMScheduler(variance_type=variance))  # fmt: skip
        assert open_model(folder).learned_variance == (variance == "learned_range")
        out = tmp_path / f"out-{variance}"
        result = dtk("generate", "--model", folder, "--condition", "class=tench", "-n", 1,
                     "--sampler", "ddpm", "--schedule", "leading", "--steps", 4, "--out", out,
                     "-q")  # fmt: skip
        assert result.exit_code == 0, result.output
        images[variance] = pixels(out)
    assert max_pixel_difference(images["learned_range"], images["fixed_small"]) > 4


def test_classes_by_name(folders):
    """Every name of id2label names its class; the first name that names no other class is
    the class's value; a name of two classes is refused (the pipeline maps it to the last)."""
    labels = open_model(folders["ddim"]).labels
    values = labels.attributes[0].values
    assert len(values) == NUM_CLASSES and labels.null_label == NUM_CLASSES
    assert (values[0], values[207], values[281], values[2]) == ("tench", "golden retriever",
                                                                "tabby", "2")  # fmt: skip
    assert (values[134], values[517]) == ("crane (134)", "crane (517)")
    for given, label in {"Tinca tinca": 0, "tabby cat": 281, "tabby": 281, "517": 517,
                         "crane (134)": 134, "2": 2}.items():  # fmt: skip
        assert labels.label({"class": given}) == label, given
        assert labels.validate({"class": given}) == {"class": values[label]}
    assert labels.label({}) == NUM_CLASSES and labels.decode(NUM_CLASSES) == {}
    assert labels.decode(281) == {"class": "tabby"}
    pipe_labels = {"tench": 0, "Tinca tinca": 0, "goldfish": 1, "golden retriever": 207,
                   "tabby": 281, "tabby cat": 281}  # fmt: skip
    for name, label in pipe_labels.items():  # the pipeline's `labels`, but for "crane"
        assert labels.label({"class": name}) == label


@pytest.mark.parametrize(
    "args, message",
    [
        (["--condition", "class=crane"],
         "class 'crane' names 2 classes, 134 ('crane (134)'), 517 ('crane (517)')"),
        (["--condition", "class=Golden retriever"],
         "the model has no class 'Golden retriever'; close: 'golden retriever'"),
        (["--condition", "class=1000"], "the model has no class '1000'"),
        (["--condition", "breed=tabby"], "the model has no attribute 'breed'"),
        (["--prompt", "a dog"], "takes no --prompt: DiT is class-conditional"),
        (["--condition", "class=tabby", "--attention-slicing"],
         "the DiT transformer has no sliced attention"),
        (["--guidance", "cfg"], "needs a condition to guide towards"),
    ],
)  # fmt: skip
def test_what_dit_cannot_do_is_one_line(folders, tmp_path, args, message):
    result = dtk("generate", "--model", folders["ddim"], "-n", 1, "--steps", 2, *args,
                 "--out", tmp_path / "out", "-q")  # fmt: skip
    assert result.exit_code == 2, result.output
    [line] = result.stderr.splitlines()
    assert message in line, line
    assert not (tmp_path / "out").exists()


def test_a_legacy_transformer2dmodel_folder_is_dit(folders, tmp_path, decoded):
    """The published DiT folders name their transformer Transformer2DModel (norm_type
    ada_norm_zero), which diffusers loads as DiTTransformer2DModel."""
    folder = tmp_path / "legacy"
    shutil.copytree(folders["ddim"], folder)
    edit_json(folder / "transformer" / "config.json", _class_name="Transformer2DModel")
    edit_json(folder / "model_index.json", transformer=["diffusers", "Transformer2DModel"])
    assert detect_family(folder) == DIT
    result = dtk("generate", "--model", folder, "--condition", "class=goldfish", "-n", 1,
                 "--steps", 3, "--out", tmp_path / "out", "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    [ours] = decoded
    theirs = pipeline(folder, [1], 0, num_inference_steps=3, output_type="latent")
    assert relative(ours, theirs) <= LATENT_TOL


def test_a_folder_without_id2label_takes_class_numbers(folders, tmp_path):
    folder = tmp_path / "numbers"
    shutil.copytree(folders["ddim"], folder)
    index = json.loads((folder / "model_index.json").read_text())
    del index["id2label"]
    (folder / "model_index.json").write_text(json.dumps(index))
    labels = open_model(folder).labels
    assert labels.attributes[0].values[:3] == ("0", "1", "2")
    assert labels.label({"class": "207"}) == 207


BROKEN = {
    "no vae": (lambda f: shutil.rmtree(f / "vae"), "needs vae/config.json"),
    "latent channels": (lambda f: edit_json(f / "vae" / "config.json", latent_channels=8),
                        "the transformer takes 4 latent channels but the VAE gives 8"),
    "a PixArt transformer": (lambda f: edit_json(f / "transformer" / "config.json",
                                             _class_name="Transformer2DModel",
                                             norm_type="ada_norm_single"),
                             "Transformer2DModel with norm_type 'ada_norm_single'; a DiT "
                             "folder needs DiTTransformer2DModel"),
    "id2label out of range": (lambda f: edit_json(f / "model_index.json",
                                              id2label={"1000": "ghost"}),
                              "id2label names class '1000', but the model's classes are "
                              "0..999"),
    "a flow scheduler": (lambda f: edit_json(f / "scheduler" / "scheduler_config.json",
                                         _class_name="FlowMatchEulerDiscreteScheduler"),
                         "rectified-flow"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_folder_is_one_line_before_any_weights(folders, tmp_path, case):
    assert_damaged_copy_refused(folders["ddim"], tmp_path, *BROKEN[case], "--condition", "class=1")


def test_detection_and_the_folders_configs(folders):
    assert detect_family(folders["ddim"]) == DIT
    folder = open_model(folders["ddim"])
    assert folder.sample_shape == LATENT and folder.image_shape == (3, 16, 16)
    assert folder.default_sampling() == ("ddim", "leading", 50)
    # a DPM-Solver folder: dpmpp_2m on the toolkit's karras (its exact twin needs an option)
    assert open_model(folders["dpm"]).default_sampling() == ("dpmpp_2m", "linspace", 50)
    assert open_model(folders["dpm"]).default_schedule_options() == {"variant": "dpmsolver"}
    assert folder.default_guidance(True) == ("cfg", {"scale": 4.0})
    assert folder.default_guidance(False) == ("none", {})
    assert folder.learned_sigma and not folder.learned_variance
