"""Words files: `toolkit.read_words`, the ``clip`` classifier's ``words`` option, ``dtk eval
bias`` over several attributes with one file, and ``dtk synthesize --words``."""

from __future__ import annotations

import json

import numpy as np
import pandas
import pytest
import torch
from invoke import dtk
from PIL import Image
from tiny_clip import reference_proba, reference_text, save_clip

import toolkit
from evaluations.common import load_images

# male first: the values keep the file's order, not an alphabetical one
WORDS = """\
[gender]
male = "man"
female = " woman "

[skin_tone]
light = "light-skinned"
dark = "dark-skinned"
"""


def synthesize(folders, out, *args):
    """``dtk synthesize`` on the tiny photos: gender within occupation, from a template."""
    return dtk("synthesize", "--model", folders["sd"], "--data", folders["data"],
               "--attribute", "gender", "--by", "occupation", "--prompt-template",
               "a photo of a {gender} {occupation}", "--steps", 2, "--out", out, "-q",
               *args)  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from tiny_sd import save_sd_pipeline

    root = tmp_path_factory.mktemp("words")
    (root / "words.toml").write_text(WORDS)
    # a tiny photo dataset: doctors are all men, nurses mostly women
    data = root / "photos"
    rows = []
    rng = np.random.default_rng(0)
    for occupation, gender, count in (("doctor", "male", 2), ("nurse", "female", 2),
                                      ("nurse", "male", 1)):  # fmt: skip
        for i in range(count):
            name = f"{occupation}/{gender}-{i}.png"
            (data / occupation).mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(data / name)
            rows.append({"file_name": name, "occupation": occupation, "gender": gender})
    pandas.DataFrame(rows).to_csv(data / "metadata.csv", index=False)
    return {
        "words": root / "words.toml",
        "clip": save_clip(root / "clip"),
        "sd": save_sd_pipeline(root / "sd"),
        "data": data,
    }


def write(path, text):
    path.write_text(text)
    return path


# -- read_words ----------------------------------------------------------------------------


def test_read_words_keeps_the_file_order_and_trims_the_words(folders):
    words = toolkit.read_words(folders["words"])
    assert list(words) == ["gender", "skin_tone"]
    assert list(words["gender"].items()) == [("male", "man"), ("female", "woman")]
    assert toolkit.attribute_words(words, "skin_tone") == {
        "light": "light-skinned",
        "dark": "dark-skinned",
    }
    with pytest.raises(toolkit.DtkError, match="no attribute 'age'; it has: gender, skin_tone"):
        toolkit.attribute_words(words, "age")


BAD_FILES = [
    (None, "cannot read the words file"),
    ("[gender\nfemale = 'woman'", "is not a valid TOML words file"),
    ('gender = "woman"', "'gender' must be a table"),
    ("[gender]\n", "attribute 'gender' lists no values"),
    ("[gender]\nfemale = 1\nmale = 'man'", "gender.female must be non-empty text"),
    ("[gender]\nfemale = ' '\nmale = 'man'", "gender.female must be non-empty text"),
    ("", "holds no attributes"),
]


@pytest.mark.parametrize(("text", "message"), BAD_FILES)
def test_a_bad_words_file_is_a_one_line_error_before_synthesis_starts(
    folders, tmp_path, text, message
):
    path = tmp_path / "words.toml"
    if text is not None:
        path.write_text(text)
    out = tmp_path / "synth"
    result = synthesize(folders, out, "--words", path)
    assert result.exit_code == 2, result.output
    assert message in result.output and str(path) in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()


# -- the clip classifier -------------------------------------------------------------------


@pytest.fixture(scope="module")
def images():
    generator = torch.Generator().manual_seed(2)
    return torch.randint(0, 256, (4, 3, 40, 36), generator=generator).float() / 255


def clip(folders, **options):
    return toolkit.attribute_classifier("clip", path=folders["clip"], **options)


def test_clip_words_fill_the_template_and_the_labels_stay_values(folders, images):
    classifier = clip(folders, attribute="gender", words=folders["words"])
    assert classifier.labels == ["male", "female"]  # the file's order
    assert classifier.prompts == [["a photo of a man"], ["a photo of a woman"]]
    assert classifier.label_words == {"male": "man", "female": "woman"}
    # the same as spelling the prompts out by hand, and as transformers computes it
    prompts = ["a photo of a woman", "a photo of a man"]
    by_hand = clip(folders, attribute="gender", labels=["female", "male"], label_prompts=prompts)
    with_words = clip(folders, attribute="gender", labels=["female", "male"],
                      words=folders["words"])  # fmt: skip
    assert with_words.labels == ["female", "male"]
    got = with_words.predict_proba(images)
    torch.testing.assert_close(got, by_hand.predict_proba(images), atol=1e-6, rtol=0)
    expected = reference_proba(folders["clip"], images, reference_text(folders["clip"], prompts))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # the words matter: the values themselves as prompt text give other probabilities
    plain = clip(folders, attribute="gender", labels=["female", "male"]).predict_proba(images)
    assert (got - plain).abs().max() > 1e-4


def test_clip_words_from_command_line_strings_and_with_several_templates(folders):
    options = {"path": str(folders["clip"]), "attribute": "skin_tone",
               "words": str(folders["words"]),
               "templates": "a photo of a {label} person,{label}"}  # fmt: skip
    classifier = toolkit.create_plugin("attribute_classifier", "clip", options, from_strings=True)
    assert classifier.labels == ["light", "dark"]
    assert classifier.prompts[1] == ["a photo of a dark-skinned person", "dark-skinned"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "clip: give labels=VALUE,VALUE,... or words=FILE"),
        ({"words": "missing.toml"}, "clip: cannot read the words file missing.toml"),
        ({"words": "WORDS", "attribute": "age"}, "has no attribute 'age'; it has: gender, "),
        ({"words": "WORDS", "labels": "female,nonbinary"}, "no words for gender value 'nonbinary'"),
        ({"words": "WORDS", "label_prompts": "a,b"}, "give words or label_prompts, not both"),
        ({"words": "ONE"}, "lists one gender value (female)"),
    ],
)
def test_clip_words_mistakes_stop_eval_bias_with_one_line(
    folders, tmp_path, monkeypatch, options, message
):
    monkeypatch.chdir(tmp_path)  # "missing.toml" is missing here
    write(tmp_path / "one.toml", '[gender]\nfemale = "woman"\n')
    files = {"WORDS": str(folders["words"]), "ONE": str(tmp_path / "one.toml")}
    options = {"attribute": "gender", **options}
    args = [f"{k}={files.get(v, v)}" for k, v in options.items() if k != "attribute"]
    result = dtk("eval", "bias", "--images", folders["data"], "--attribute", options["attribute"],
                 "--classifier", "clip", "--classifier-option", f"path={folders['clip']}",
                 *[a for arg in args for a in ("--classifier-option", arg)],
                 "--out", tmp_path / "audit", "-q")  # fmt: skip
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_eval_bias_audits_two_attributes_with_one_words_file(folders, tmp_path):
    out = tmp_path / "audit"
    result = dtk("eval", "bias", "--model", folders["sd"], "--prompt", "a photo of a person",
                 "-n", 4, "--steps", 2, "--attribute", "gender", "--attribute", "skin_tone",
                 "--classifier", "clip", "--classifier-option", f"path={folders['clip']}",
                 "--classifier-option", f"words={folders['words']}", "--min-confidence", 0,
                 "--bootstrap", 100, "--out", out, "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["attributes"]) == ["gender", "skin_tone"]
    assert list(saved["attributes"]["gender"]["groups"])[:2] == ["male", "female"]
    assert list(saved["attributes"]["skin_tone"]["groups"])[:2] == ["light", "dark"]
    assert saved["attributes"]["gender"]["total"] == saved["attributes"]["skin_tone"]["total"] == 4
    # each attribute's classifier prompted with its own words: redo it by hand
    pixels, table = load_images(out / "samples")
    predictions = pandas.read_csv(out / "predictions.csv", dtype={"file_name": str})
    predictions = predictions.set_index("file_name").loc[table["file_name"]]
    expected_words = {
        "gender": {"male": "man", "female": "woman"},
        "skin_tone": {"light": "light-skinned", "dark": "dark-skinned"},
    }
    for attribute, said in expected_words.items():
        labels, prompts = list(said), [f"a photo of a {text}" for text in said.values()]
        by_hand = clip(folders, attribute=attribute, labels=labels, label_prompts=prompts)
        confidence, index = by_hand.predict_proba(pixels).max(dim=1)
        assert list(predictions[f"{attribute}_predicted"]) == [labels[i] for i in index.tolist()]
        np.testing.assert_allclose(predictions[f"{attribute}_confidence"], confidence, atol=1e-5)


# -- dtk synthesize --words ----------------------------------------------------------------


def test_synthesize_prompts_say_the_words_and_metadata_keeps_the_values(folders, tmp_path):
    out = tmp_path / "synth"
    # the same words file drives the prompts and the clip classifier of label_consistency;
    # threshold 0 keeps the filter's plumbing, not its bar (the tiny models draw noise)
    result = synthesize(folders, out, "--words", folders["words"], "--classifier", "clip",
                        "--classifier-option", f"path={folders['clip']}",
                        "--classifier-option", f"words={folders['words']}",
                        "--consistency-threshold", 0, "--memorization-threshold", 0)  # fmt: skip
    assert result.exit_code == 0, result.output
    generated = pandas.read_csv(out / "rounds" / "round-0" / "metadata.csv", dtype=str)
    # doctors lack women and nurses a man; occupation is not in the file: it stays as is
    cells = sorted(zip(generated["prompt"], generated["gender"], generated["occupation"]))
    assert cells == [("a photo of a man nurse", "male", "nurse"),
                     ("a photo of a woman doctor", "female", "doctor"),
                     ("a photo of a woman doctor", "female", "doctor")]  # fmt: skip
    assert generated["filter_label_consistency_score"].astype(float).between(0, 1).all()
    synthetic = pandas.read_csv(out / "synthetic" / "metadata.csv", dtype=str)
    assert sorted(synthetic["gender"]) == ["female", "female", "male"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["words"] == {
        "path": str(folders["words"]),
        "words": {"gender": {"male": "man", "female": "woman"}},
    }


def test_synthesize_words_for_the_by_column_and_only_for_generated_values(folders, tmp_path):
    words = write(tmp_path / "words.toml",
                  '[gender]\nfemale = "woman"\n[occupation]\ndoctor = "physician"\n')  # fmt: skip
    out = tmp_path / "synth"
    # a budget of one image goes to the doctors' missing woman: no man or nurse is said
    result = synthesize(folders, out, "--words", words, "--budget", 1, "--filters", "")
    assert result.exit_code == 0, result.output
    generated = pandas.read_csv(out / "rounds" / "round-0" / "metadata.csv", dtype=str)
    assert generated[["prompt", "gender", "occupation"]].values.tolist() == [
        ["a photo of a woman physician", "female", "doctor"]
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--words", "WORDS"], "--words needs --prompt-template"),
        (["--prompt-template", "a {group}", "--words", "WORDS", "--attribute", "group"],
         "--words WORDS has no attribute 'group'; it has: gender, skin_tone"),
        (["--prompt-template", "a {gender}", "--words", "FEMALE", "--attribute", "gender"],
         "has no words for gender value 'male', which the plan generates"),
        (["--prompt-template", "a {gender} {occupation}", "--words", "DOCTOR",
          "--attribute", "gender"], "has no words for occupation value 'nurse'"),
    ],
)  # fmt: skip
def test_synthesize_words_mistakes_stop_before_anything_is_written(
    folders, tmp_path, args, message
):
    files = {
        "WORDS": str(folders["words"]),
        "FEMALE": str(write(tmp_path / "female.toml", '[gender]\nfemale = "woman"\n')),
        "DOCTOR": str(write(tmp_path / "doctor.toml", '[gender]\nfemale = "woman"\nmale = "man"\n'
                            '[occupation]\ndoctor = "physician"\n')),
    }  # fmt: skip
    out = tmp_path / "synth"
    args = [files.get(a, a) for a in args]
    result = dtk("synthesize", "--model", folders["sd"], "--data", folders["data"],
                 "--by", "occupation", *args, "--out", out, "-q")  # fmt: skip
    assert result.exit_code == 2, result.output
    for name, path in files.items():
        message = message.replace(name, path)
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()
