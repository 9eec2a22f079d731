"""`fair` guidance on text-to-image models (Fair Diffusion) against diffusers'
SemanticStableDiffusionPipeline, run sample by sample with each sample's edit directions."""

from __future__ import annotations

import json

import numpy as np
import pandas
import pytest
import torch
from click.testing import CliRunner
from diffusers.pipelines.deprecated.semantic_stable_diffusion import (
    SemanticStableDiffusionPipeline,
)
from folders import pixels
from tiny_models import save_pipeline
from tiny_sd import pipeline_parts, save_sd_pipeline, spy_forwards

from plugins.fair import FairGuidance
from toolkit.cli import cli
from toolkit.errors import DtkError, OptionError
from toolkit.generation.generate import generate

CAT = "a photo of a cat"
VALUES = ["red", "blue"]
DDIM = dict(sampler="ddim", schedule="leading", schedule_options={"offset": 1}, progress=False)
DDIM_CLI = ["--sampler", "ddim", "--schedule", "leading", "--schedule-option", "offset=1"]
STEPS = 10


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "sd": save_sd_pipeline(root / "sd"),
        "cond": save_pipeline(root / "c", conditional=True),
    }


def semantic_reference(model_dir, seed, drawn, edit_prompts, **edit) -> np.ndarray:
    """diffusers' SEGA pipeline for one sample: towards `drawn`'s edit prompt, away from
    the others' (Fair Diffusion's use of it)."""
    pipe = SemanticStableDiffusionPipeline(**pipeline_parts(model_dir))
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(seed))
    image = pipe(
        CAT, num_inference_steps=STEPS, guidance_scale=7.5, latents=latents, output_type="np",
        editing_prompt=list(edit_prompts.values()),
        reverse_editing_direction=[value != drawn for value in edit_prompts], **edit,
    ).images[0]  # fmt: skip
    return np.round(image * 255).astype(np.int16)


# our options -> diffusers' arguments, and whether the images must differ from plain cfg
# beyond the tolerance: the paper's script's values barely move the random tiny model (its
# prompts are close), stronger and earlier edits do
CASES = {
    "paper defaults": ([], dict(edit_guidance_scale=4.0, edit_warmup_steps=5,
                                edit_threshold=0.95, edit_momentum_scale=0.5,
                                edit_mom_beta=0.6), False),
    "strong, early": (["edit_scale=40", "warmup_steps=1", "threshold=0.5"],
                      dict(edit_guidance_scale=40.0, edit_warmup_steps=1, edit_threshold=0.5,
                           edit_momentum_scale=0.5, edit_mom_beta=0.6), True),
}  # fmt: skip


@pytest.mark.filterwarnings("ignore:The decode_latents method is deprecated:FutureWarning")
@pytest.mark.parametrize("case", list(CASES))
def test_cli_equals_semantic_stable_diffusion_per_sample(models, tmp_path, case):
    extra, settings, visible = CASES[case]
    out = tmp_path / "out"
    options = ["attribute=colour", "values=red,blue", "edit_prompt={value} painting", *extra]
    # batch size 3: each sample's directions differ inside one batch, unlike diffusers' call
    result = CliRunner().invoke(cli, [
        "generate", "--model", str(models["sd"]), "--prompt", CAT, "-n", "4", "--seed", "3",
        "--steps", str(STEPS), *DDIM_CLI, "--guidance", "fair",
        *[arg for option in options for arg in ("--guidance-option", option)],
        "--batch-size", "3", "--out", str(out), "-q",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    metadata = pandas.read_csv(out / "metadata.csv", keep_default_na=False).set_index("index")
    drawn = metadata["colour"].to_dict()
    assert set(drawn.values()) == set(VALUES)  # both directions inside one batch
    assert set(metadata["prompt"]) == {CAT}
    assert json.loads(metadata["guidance_options"][0])["values"] == VALUES
    ours = pixels(out)
    cfg = tmp_path / "cfg"
    generate(models["sd"], out=cfg, prompt=CAT, n=4, seed=3, steps=STEPS, guidance="cfg",
             guidance_options={"scale": 7.5}, **DDIM)  # fmt: skip
    plain = pixels(cfg)
    edits = {v: f"{v} painting" for v in VALUES}
    for i in range(4):
        theirs = semantic_reference(models["sd"], 3 + i, drawn[i], edits, **settings)
        assert np.abs(ours[i] - theirs).max() <= 1, f"sample {i}"
        if visible:  # the edit moved the image: the comparison is not cfg against cfg
            assert np.abs(ours[i] - plain[i]).max() > 4, f"sample {i}"


def test_directions_follow_each_samples_draw():
    guidance = FairGuidance(attribute="colour", values=VALUES, warmup_steps=0,
                            momentum_scale=0.0, threshold=0.0)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    preds = {b: torch.randn(2, 4, 3, 3, generator=gen) for b in guidance.branches}
    guidance.start_batch([{"colour": "red"}, {"colour": "blue"}])
    sigma = 2.0
    got = guidance(preds, sigma)
    cfg = preds["uncond"] + 7.5 * (preds["cond"] - preds["uncond"])
    # threshold 0 keeps every element: eps moves by 4 * (towards - away) edit directions
    eps = {b: -p / sigma for b, p in preds.items()}  # x fixed at 0: eps = (x - x0) / sigma
    red = eps["edit:red"] - eps["uncond"]
    blue = eps["edit:blue"] - eps["uncond"]
    expected_eps = torch.stack([4 * (red[0] - blue[0]), 4 * (blue[1] - red[1])])
    assert torch.allclose(got, cfg - sigma * expected_eps, atol=1e-5)


def test_warmup_gathers_momentum_and_each_batch_starts_afresh():
    guidance = FairGuidance(attribute="colour", values=VALUES, warmup_steps=2)
    gen = torch.Generator().manual_seed(1)
    preds = {b: torch.randn(1, 4, 4, 4, generator=gen) for b in guidance.branches}
    cfg = preds["uncond"] + 7.5 * (preds["cond"] - preds["uncond"])
    runs = []
    for _ in range(2):
        guidance.start_batch([{"colour": "blue"}])
        runs.append([guidance(preds, s) for s in (8.0, 4.0, 2.0, 1.0)])
    first, second = runs
    assert torch.equal(first[0], cfg) and torch.equal(first[1], cfg)
    assert not torch.equal(first[2], cfg)
    # the third step carries the momentum of the two warmup steps: not the bare edit
    bare = FairGuidance(attribute="colour", values=VALUES, warmup_steps=0, momentum_scale=0.0)
    bare.start_batch([{"colour": "blue"}])
    assert not torch.allclose(first[2], bare(preds, 2.0))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_words_file_gives_values_and_edit_prompts(tmp_path):
    words = tmp_path / "words.toml"
    words.write_text('[colour]\nblue = "blue"\nred = "red"\n\n[size]\nbig = "large"\n')
    guidance = FairGuidance(attribute="colour", words=words, edit_prompt="a {value} car")
    assert guidance.values == ["blue", "red"]  # the file's order
    assert guidance.text_branches == {"edit:blue": "a blue car", "edit:red": "a red car"}
    assert guidance.scale == 7.5 and FairGuidance().scale == 2.0
    chosen = FairGuidance(attribute="colour", words=words, values=["red", "blue"])
    assert chosen.values == ["red", "blue"]
    for kwargs, message in (
        ({"attribute": "size"}, "at least two different values"),
        ({"attribute": "shape"}, "has no attribute 'shape'"),
        ({"attribute": "colour", "values": ["red", "green"]}, "no words for colour value 'green'"),
        ({"attribute": "colour", "edit_prompt": "a car"}, "must contain {value}"),
    ):
        with pytest.raises(OptionError, match=message):
            FairGuidance(words=words, **kwargs)
    with pytest.raises(OptionError, match="at least two different values"):
        FairGuidance(values=["red", "red"])


def test_one_forward_per_step_with_every_edit_prompt(models, tmp_path, monkeypatch):
    encoded, unet_batches = spy_forwards(monkeypatch)
    generate(models["sd"], out=tmp_path / "out", prompt=CAT, n=3, steps=2, batch_size=2,
             guidance="fair", guidance_options={"attribute": "colour", "values": VALUES},
             **DDIM)  # fmt: skip
    # the prompt, the empty prompt and two edit prompts: each through the encoder once
    assert len(encoded) == len(set(encoded)) == 4
    # cond, uncond and two edit branches in one forward per step
    assert unet_batches == [8] * 2 + [4] * 2


@pytest.mark.parametrize(
    ("model", "options", "message"),
    [
        ("sd", ["attribute=colour"], "give the values of 'colour'"),
        ("cond", ["values=red,blue"], "values and words are for text-to-image models"),
        ("sd", ["values=red,blue", "target=red=2"], "sum to 1"),
    ],
)
def test_mistakes_are_one_line_and_write_nothing(models, tmp_path, model, options, message):
    out = tmp_path / "out"
    args = ["--prompt", CAT] if model == "sd" else ["--condition", "digit=1"]
    result = CliRunner().invoke(cli, [
        "generate", "--model", str(models[model]), *args, "--guidance", "fair", "--steps", "2",
        *[arg for option in options for arg in ("--guidance-option", option)],
        "--out", str(out), "-q",
    ])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists()


def test_a_request_that_fixes_the_attribute_is_refused(models, tmp_path):
    with pytest.raises(DtkError, match="already fixes colour=red"):
        generate(models["sd"], out=tmp_path / "x", prompt=CAT, conditions={"colour": "red"},
                 n=1, steps=2, guidance="fair",
                 guidance_options={"attribute": "colour", "values": VALUES}, **DDIM)  # fmt: skip
    assert not (tmp_path / "x").exists()


def test_audit_of_fair_guidance_breaks_predictions_down_by_drawn_value(models, tmp_path):
    # the audit recipe of docs/text-to-image.md on tiny random models: its plumbing, not its
    # findings (a random CLIP cannot tell colours apart)
    from tiny_clip import save_clip

    words = tmp_path / "words.toml"
    words.write_text('[colour]\nred = "red"\nblue = "blue"\n')
    clip = save_clip(tmp_path / "clip")
    out = tmp_path / "audit"
    result = CliRunner().invoke(cli, [
        "eval", "bias", "--model", str(models["sd"]), "--prompt", CAT, "-n", "6",
        "--steps", "2", "--guidance", "fair", "--guidance-option", "attribute=colour",
        "--guidance-option", f"words={words}", "--attribute", "colour", "--by", "colour",
        "--classifier", "clip", "--classifier-option", f"path={clip}",
        "--classifier-option", f"words={words}", "--min-confidence", "0",
        "--bootstrap", "100", "--out", str(out), "-q",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    metadata = pandas.read_csv(out / "samples" / "metadata.csv", keep_default_na=False)
    assert set(metadata["colour"]) == set(VALUES)  # the drawn values, one per sample
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["generation"]["guidance"] == "fair"
    # rows: the predicted colour; columns: the drawn colour, each counting its samples
    counts = pandas.read_csv(out / "counts_colour.csv", keep_default_na=False)
    drawn = metadata["colour"].value_counts().to_dict()
    assert {v: int(counts[v].sum()) for v in drawn} == drawn
    assert int(counts["all"].sum()) == 6
