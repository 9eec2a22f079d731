"""The shipped text-to-image model `text-digits` (toolkit/assets/text-generator): loaded by
name, by dtk and by diffusers' own pipeline; it answers prompts (digit and group read back
by the shipped classifiers); `fair` completes its prompts per sample."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from invoke import dtk
from PIL import Image
from threads import torch_threads

import toolkit
from toolkit.assets import MODELS, TEXT_GENERATOR


@pytest.fixture(autouse=True)
def two_threads():
    with torch_threads(2):
        yield


def read(folder, attribute: str) -> list[str]:
    data = toolkit.load_image_folder(folder)
    classifier = toolkit.attribute_classifier("cnn", attribute=attribute)
    index = classifier.predict_proba(data.images).argmax(1).tolist()
    return [classifier.labels[i] for i in index]


def test_the_shipped_text_model_is_a_small_standard_sd3_folder():
    assert MODELS["text-digits"] == TEXT_GENERATOR
    index = json.loads((TEXT_GENERATOR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    weights = sum(f.stat().st_size for f in TEXT_GENERATOR.rglob("*.safetensors"))
    assert weights < 20 * 2**20
    assert (TEXT_GENERATOR / "README.md").is_file()
    record = json.loads((TEXT_GENERATOR / "training.json").read_text())
    assert record["config"]["caption"] == "text" and record["steps_done"] == 12000


def test_it_answers_prompts_with_the_digit_and_the_group_asked_for(tmp_path):
    """32 images each: "a seven" is read as a 7, "a three on dark paper" as a dark 3."""
    for prompt, digit, group in (("a seven", "7", None), ("a three on dark paper", "3", "dark")):
        out = tmp_path / prompt.replace(" ", "-")
        result = dtk("generate", "--model", "text-digits", "--prompt", prompt, "-n", 32,
                     "--steps", 12, "--out", out, "-q")  # fmt: skip
        assert result.exit_code == 0, result.output
        assert np.mean([d == digit for d in read(out, "digit")]) >= 0.9
        if group is not None:
            assert np.mean([g == group for g in read(out, "group")]) >= 0.9


def test_diffusers_pipeline_loads_it_and_gives_dtks_images(tmp_path):
    """The pipeline's own sampling (FlowMatchEulerDiscreteScheduler, CFG 7) against dtk's
    default (euler on the flow schedule, CFG 7) on the same starting noise."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(TEXT_GENERATOR, text_encoder_3=None,
                                                    tokenizer_3=None)  # fmt: skip
    noise = torch.stack([torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(s))
                         for s in (0, 1)])  # fmt: skip
    theirs = pipe(["a handwritten five"] * 2, latents=noise, num_inference_steps=10,
                  guidance_scale=7.0, height=16, width=16, output_type="np").images  # fmt: skip
    result = dtk("generate", "--model", "text-digits", "--prompt", "a handwritten five", "-n", 2,
                 "--steps", 10, "--out", tmp_path / "ours", "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    ours = [np.asarray(Image.open(p), dtype=np.int16)
            for p in sorted((tmp_path / "ours").rglob("*.png"))]  # fmt: skip
    pipeline = np.round(theirs * 255).astype(np.int16)
    assert max(int(np.abs(a - b).max()) for a, b in zip(ours, pipeline)) <= 1


def test_fair_prompt_mode_asks_each_sample_for_its_drawn_value(tmp_path):
    """``mode=prompt`` with ``"{prompt} on {value} paper"``: each sample's image is the one
    the completed prompt gives on its own, at the same seed and scale."""
    fair = tmp_path / "fair"
    result = dtk("generate", "--model", "text-digits", "--prompt", "a four", "-n", 6,
                 "--steps", 8, "--guidance", "fair", "--guidance-option", "values=dark,light",
                 "--guidance-option", "edit_prompt={prompt} on {value} paper",
                 "--guidance-option", "mode=prompt", "--guidance-option", "scale=7",
                 "--out", fair, "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    metadata = toolkit.read_metadata(fair)
    assert set(metadata["group"]) == {"dark", "light"}  # six seeds draw both
    assert set(metadata["prompt"]) == {"a four"}
    for group in ("dark", "light"):
        alone = tmp_path / group
        result = dtk("generate", "--model", "text-digits", "--prompt", f"a four on {group} paper",
                     "-n", 6, "--steps", 8, "--guidance", "cfg", "--guidance-option", "scale=7",
                     "--out", alone, "-q")  # fmt: skip
        assert result.exit_code == 0, result.output
        plain = toolkit.read_metadata(alone).set_index("index")
        for row in metadata[metadata["group"] == group].itertuples():
            ours = np.asarray(Image.open(fair / row.file_name), dtype=np.int16)
            theirs = np.asarray(Image.open(alone / plain.loc[row.index, "file_name"]),
                                dtype=np.int16)  # fmt: skip
            assert int(np.abs(ours - theirs).max()) <= 1, (group, row.index)


def test_fair_refuses_an_unknown_mode():
    result = dtk("generate", "--model", "text-digits", "--prompt", "a four", "--guidance",
                 "fair", "--guidance-option", "values=dark,light", "--guidance-option",
                 "mode=loud", "--out", "unused")  # fmt: skip
    assert result.exit_code == 2 and "mode must be one of edit, prompt" in result.output
