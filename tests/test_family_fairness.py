"""The fairness tools on every model family (issue #14), on tiny random folders built
offline: `sld` and `fair` guidance act on every text family whose math applies (a third
branch of prompts, next to CFG's two) and are refused in one line where it does not (an LCM
has no unconditional branch, a DiT no prompts); `dtk eval bias --prompt` and
`dtk synthesize --prompt-template` run on every text family; a DiT's class names are
attribute values that `fair`, `eval bias` and `synthesize` use like any label model's.

The random networks draw noise, so these tests check what the plumbing must guarantee
(which branches enter, which values each sample gets, what is written), not image quality;
each method's equality with its diffusers reference is in tests/test_sld.py and
tests/test_fair_diffusion.py (the math is the family-independent guidance plugin).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas
import pytest
import torch
from folders import copy_subset, made_once, pixels
from invoke import dtk

import toolkit

CAT = "a photo of a cat"
TEXT_FAMILIES = ("sdxl", "sd3", "flux", "pixart", "lcm")
#: Flux's default is 1024 px and 512 T5 tokens: small ones keep the tests fast
OPTIONS = {"flux": ["--height", 32, "--width", 32, "--model-option", "max_sequence_length=32"]}
#: the shipped group classifier reads any RGB image: the audits' classifier here
GROUP = "path=" + str(toolkit.default_model().parent / "classifiers" / "group")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return made_once(tmp_path_factory.mktemp("families"))


def generate(folder, out, *args):
    result = dtk("generate", "--model", folder, "--prompt", CAT, "-n", 2, "--steps", 3,
                 "--seed", 5, *args, "--out", out, "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    return pixels(out)


def moved(a: dict, b: dict) -> float:
    return max(float(np.abs(a[i] - b[i]).max()) for i in a)


# -- sld and fair --------------------------------------------------------------------------

#: sld's safety term on from the first step, everywhere (threshold 1: the prompt is always
#: "close" to the concept), strong enough to show in 3 steps
SLD = ["--guidance", "sld", "--guidance-option", "preset=max"]
#: fair's edit towards each sample's drawn colour from the first step, on every element
FAIR = ["--guidance", "fair", "--guidance-option", "attribute=colour",
        "--guidance-option", "values=red,blue", "--guidance-option", "edit_scale=40",
        "--guidance-option", "warmup_steps=0", "--guidance-option", "threshold=0"]  # fmt: skip


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux", "pixart"])
def test_sld_and_fair_steer_every_text_family(folders, tmp_path, family):
    """Each is CFG plus its own prompt branches: switched off it is CFG to the pixel, on it
    moves the images, and fair records each sample's drawn value."""
    folder, options = folders(family), OPTIONS.get(family, [])
    cfg = generate(folder, tmp_path / "cfg", "--guidance", "cfg",
                   "--guidance-option", "scale=7.5", *options)  # fmt: skip
    # a safety scale <= 1 turns the term off (diffusers' rule): exactly cfg at 7.5
    off = generate(folder, tmp_path / "off", *SLD, "--guidance-option", "guidance_scale=1",
                   *options)  # fmt: skip
    assert moved(off, cfg) == 0
    assert moved(generate(folder, tmp_path / "sld", *SLD, *options), cfg) > 4
    assert moved(generate(folder, tmp_path / "fair", *FAIR, *options), cfg) > 4
    drawn = pandas.read_csv(tmp_path / "fair" / "metadata.csv")["colour"]
    assert len(drawn) == 2 and set(drawn) <= {"blue", "red"}  # each sample's drawn value
    run = json.loads((tmp_path / "sld" / "run.json").read_text())
    assert run["guidance"]["name"] == "sld" and run["model_info"]["family"] == family


@pytest.mark.parametrize(
    ("family", "guidance", "message"),
    [
        ("lcm", SLD, "guidance 'sld' needs an unconditional branch, and a latent consistency "
         "model has none"),
        ("lcm", FAIR, "guidance 'fair' needs an unconditional branch"),
        ("dit", SLD, "guidance 'sld' needs a text-to-image model (its safety branch is a "
         "prompt)"),
        ("dit", FAIR, "fair: values and words are for text-to-image models"),
    ],
)  # fmt: skip
def test_where_the_math_does_not_apply_it_is_refused_in_one_line(folders, tmp_path, family,
                                                                 guidance, message):  # fmt: skip
    prompt = ["--condition", "class=goldfish"] if family == "dit" else ["--prompt", CAT]
    result = dtk("generate", "--model", folders(family), *prompt, *guidance,
                 "--out", tmp_path / "out", "-q")  # fmt: skip
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_fair_draws_a_dits_classes_like_any_label_models_values(folders, tmp_path):
    """On a DiT the attribute is `class`: fair completes each sample's condition with a
    drawn class (the class names of id2label where it names one), as on the shipped model."""
    out = tmp_path / "out"
    result = dtk("generate", "--model", folders("dit"), "--guidance", "fair",
                 "--guidance-option", "attribute=class", "-n", 6, "--steps", 2, "--out", out,
                 "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    drawn = pandas.read_csv(out / "metadata.csv", dtype=str)["class"]
    classes = toolkit.label_space(folders("dit")).attribute("class").values
    assert set(drawn) <= set(classes) and drawn.nunique() == 6  # 1000 classes: all differ


# -- eval bias and synthesize --------------------------------------------------------------


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_eval_bias_audits_every_text_family_from_a_prompt(folders, tmp_path, family):
    out = tmp_path / "audit"
    result = dtk("eval", "bias", "--model", folders(family), "--prompt", CAT, "-n", 4,
                 "--steps", 2, "--classifier-option", GROUP, "--min-confidence", 0,
                 "--bootstrap", 100, *OPTIONS.get(family, []), "--out", out,
                 "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    samples = pandas.read_csv(out / "samples" / "metadata.csv", dtype=str)
    assert len(samples) == 4 and set(samples["prompt"]) == {CAT}
    saved = json.loads((out / "results.json").read_text())
    assert saved["attributes"]["group"]["total"] == 4
    run = json.loads((out / "samples" / "run.json").read_text())
    assert run["model_info"]["family"] == family


def test_eval_bias_audits_a_dit_at_a_class_by_name(folders, tmp_path):
    out = tmp_path / "audit"
    result = dtk("eval", "bias", "--model", folders("dit"), "--condition", "class=goldfish",
                 "-n", 4, "--steps", 2, "--classifier-option", GROUP, "--min-confidence", 0,
                 "--bootstrap", 100, "--out", out, "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    samples = pandas.read_csv(out / "samples" / "metadata.csv", dtype=str)
    assert list(samples["class"]) == ["goldfish"] * 4


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """Digits 0 and 1 of the colored-digits training split: 4 light and 1 dark each; with a
    `class` column naming two of the tiny DiT's classes (goldfish: light, tabby: dark)."""
    root = tmp_path_factory.mktemp("family-synth-data")
    toolkit.write_colored_digits(root / "full", "train", minority_share=0.05)
    metadata = toolkit.read_metadata(root / "full")
    keep = pandas.concat(
        metadata[(metadata.digit == d) & (metadata.group == g)].head(n)
        for d in ("0", "1") for g, n in (("light", 4), ("dark", 1))
    )  # fmt: skip
    keep = keep.assign(**{"class": keep["group"].map({"light": "goldfish", "dark": "tabby"})})
    return copy_subset(root / "full", keep, root / "small")


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_synthesize_fills_prompt_templates_on_every_text_family(folders, small_data, tmp_path,
                                                                family):  # fmt: skip
    out = tmp_path / "synth"
    # random networks draw noise: threshold 0 keeps the filter's plumbing, not its bar
    result = dtk("synthesize", "--model", folders(family), "--data", small_data,
                 "--prompt-template", "a photo of a {group} {digit}",
                 "--consistency-threshold", 0, "--memorization-threshold", 0, "--steps", 2,
                 *OPTIONS.get(family, []), "--out", out, "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "results.json").read_text())
    assert saved["planned"] == saved["accepted"] == 6  # 3 dark images for each digit
    generated = pandas.read_csv(out / "rounds" / "round-0" / "metadata.csv", dtype=str)
    assert (generated["prompt"] == "a photo of a dark " + generated["digit"]).all()
    synthetic = pandas.read_csv(out / "synthetic" / "metadata.csv", dtype=str)
    assert synthetic.groupby(["digit", "group"]).size().to_dict() == {
        ("0", "dark"): 3,
        ("1", "dark"): 3,
    }
    # the family's own sampling and guidance, not the label models' CFG 0.75 at 20 steps
    run = json.loads((out / "rounds" / "round-0" / "run.json").read_text())
    default = toolkit.models.open_model(folders(family)).default_guidance(True)
    assert run["guidance"]["name"] == default[0]
    assert run["guidance"]["options"].get("scale") == default[1].get("scale")


def test_synthesize_balances_a_dits_classes(folders, small_data, tmp_path):
    """A DiT's attribute is `class` (its one label); without --by the plan has a single
    column of the whole data, named `classes` so it does not clash with the attribute. (No
    classifier reads ImageNet classes here: label_consistency is left out.)"""
    out = tmp_path / "synth"
    result = dtk("synthesize", "--model", folders("dit"), "--data", small_data, "--attribute",
                 "class", "--by", "", "--target", "goldfish=0.5,tabby=0.5", "--filters",
                 "memorization", "--memorization-threshold", 0, "--steps", 2,
                 "--out", out, "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    plan = pandas.read_csv(out / "plan.csv", dtype=str).set_index("class")
    assert plan.loc["tabby", "generate"] == "6" and plan.loc["goldfish", "generate"] == "0"
    assert set(plan["classes"]) == {"all"}
    synthetic = pandas.read_csv(out / "synthetic" / "metadata.csv", dtype=str)
    assert list(synthetic["class"]) == ["tabby"] * 6


# -- rectified flow: the first level is sigma = inf ---------------------------------------


def guidance_preds(branches, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return {b: torch.randn(2, 4, 3, 3, generator=gen) for b in branches}


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_fair_at_sigma_inf_is_the_limit_of_its_rule(momentum):
    """A flow model's first level: the clean-image estimate moves by sigma * edit, whose
    limit is finite (the edit's epsilon differences are clean-image ones over sigma)."""
    from plugins.fair import FairGuidance

    def first_step(sigma: float) -> torch.Tensor:
        guidance = FairGuidance(attribute="colour", values=["red", "blue"], warmup_steps=0,
                                momentum_scale=momentum, threshold=0.5)  # fmt: skip
        guidance.start_batch([{"colour": "red"}, {"colour": "blue"}])
        return guidance(guidance_preds(guidance.branches), sigma)

    at_inf, cfg = first_step(math.inf), first_step(0.0)  # sigma 0: no edit, plain cfg
    assert torch.isfinite(at_inf).all() and (at_inf - cfg).abs().max() > 1
    torch.testing.assert_close(at_inf, first_step(1e9), rtol=0, atol=1e-4)


def test_sld_at_sigma_inf_is_the_limit_of_its_rule():
    """Its weight (eq. 6) is the epsilon difference times the safety scale: 0 in the limit,
    so the first level of a flow model is plain cfg, and the warmup still counts it."""
    from plugins.sld import SafeLatentDiffusion

    guidance = SafeLatentDiffusion(preset="max")
    preds = guidance_preds(guidance.branches, seed=1)
    cfg = preds["uncond"] + 7.5 * (preds["cond"] - preds["uncond"])
    assert torch.equal(guidance(preds, math.inf), cfg)
    torch.testing.assert_close(guidance(preds, 1e12), cfg, rtol=0, atol=1e-5)  # ~ 1 / sigma
    assert guidance._momentum.calls == 2
    assert not torch.allclose(guidance(preds, 1.0), cfg)  # finite sigma: the term acts


@pytest.mark.parametrize("name", ["cfg", "cfg_rescale", "interval", "sld", "fair"])
def test_every_text_guidance_gives_finite_images_on_a_flow_model(folders, tmp_path, name):
    options = {"fair": FAIR[2:]}.get(name, [])
    images = generate(folders("sd3"), tmp_path / "out", "--guidance", name, *options)
    assert len(images) == 2 and all(image.std() > 1 for image in images.values())
