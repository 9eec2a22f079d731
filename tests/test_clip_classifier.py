"""The `clip` attribute classifier: zero-shot CLIP over a local model folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from tiny_clip import reference_proba, reference_text, save_clip

import toolkit
from toolkit.cli import cli
from toolkit.registry.manager import get_registry

LABELS = ["light", "dark"]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return save_clip(tmp_path_factory.mktemp("clip") / "model")


@pytest.fixture(scope="module")
def images():
    # 8-bit values, as in PNGs, so the processor's PIL resizing loses nothing; not 32 x 32,
    # so resizing and cropping both happen
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (5, 3, 40, 36), generator=generator).float() / 255


def make(clip_folder, **options):
    return toolkit.attribute_classifier(
        "clip", path=clip_folder, attribute="group", labels=LABELS, **options
    )


# -- registry ------------------------------------------------------------------------------


def test_is_registered_as_an_attribute_classifier(clip_folder):
    classifier = make(clip_folder)
    assert isinstance(classifier, toolkit.AttributeClassifier)
    assert (classifier.name, classifier.attribute, classifier.labels) == ("clip", "group", LABELS)
    rows = toolkit.plugins("attribute_classifier").set_index("name")
    assert rows.loc["clip", "kind"] == "attribute_classifier"
    assert rows.loc["clip", "status"] == "ok"


def test_dtk_plugins_lists_it():
    result = CliRunner().invoke(cli, ["plugins", "--kind", "attribute_classifier", "--json"])
    assert result.exit_code == 0, result.output
    assert "clip" in [row["name"] for row in json.loads(result.stdout)]


def test_command_line_strings_are_converted(clip_folder):
    options = {
        "path": str(clip_folder),
        "attribute": "group",
        "labels": "light,dark",
        "templates": "a photo of a {label},a drawing of the {label}",
        "margin": "0.25",
        "batch_size": "2",
    }
    classifier = get_registry().create("attribute_classifier", "clip", options, from_strings=True)
    assert classifier.labels == LABELS
    assert classifier.prompts[1] == ["a photo of a dark", "a drawing of the dark"]
    assert (classifier.margin, classifier.batch_size) == (0.25, 2)


def test_importing_the_plugin_does_not_import_torch():
    code = "import sys, plugins.clip_classifier; print('torch' in sys.modules)"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


# -- probabilities -------------------------------------------------------------------------


def test_predict_proba_matches_transformers(clip_folder, images):
    probabilities = make(clip_folder).predict_proba(images)
    text = reference_text(clip_folder, [f"a photo of a {label}" for label in LABELS])
    expected = reference_proba(clip_folder, images, text)
    assert probabilities.shape == (len(images), len(LABELS))
    assert probabilities.dtype == torch.float32
    torch.testing.assert_close(probabilities, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(len(images)))


def test_batches_and_channels_do_not_change_the_result(clip_folder, images):
    whole = make(clip_folder).predict_proba(images)
    torch.testing.assert_close(make(clip_folder, batch_size=2).predict_proba(images), whole)
    gray = images[:, :1]
    classifier = make(clip_folder)
    torch.testing.assert_close(
        classifier.predict_proba(gray), classifier.predict_proba(gray.expand(-1, 3, -1, -1))
    )
    assert classifier.predict_proba(images[:0]).shape == (0, len(LABELS))


def test_identical_templates_change_nothing(clip_folder, images):
    single = make(clip_folder).predict_proba(images)
    repeated = make(clip_folder, templates=["a photo of a {label}"] * 3).predict_proba(images)
    torch.testing.assert_close(repeated, single, atol=1e-6, rtol=0)


def test_different_templates_average_their_normalized_embeddings(clip_folder, images):
    templates = ["a photo of a {label}", "a drawing of the {label}"]
    ensembled = make(clip_folder, templates=templates).predict_proba(images)
    single = make(clip_folder).predict_proba(images)
    assert (ensembled - single).abs().max() > 1e-4
    per_template = torch.stack(
        [reference_text(clip_folder, [t.format(label=x) for x in LABELS]) for t in templates]
    )
    mean = per_template.mean(0)
    expected = reference_proba(clip_folder, images, mean / mean.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(ensembled, expected, atol=1e-5, rtol=0)


def test_label_prompts_override_the_template(clip_folder, images):
    prompts = ["a light digit", "a dark picture"]
    classifier = make(clip_folder, label_prompts=prompts, template="the {label}")
    expected = reference_proba(clip_folder, images, reference_text(clip_folder, prompts))
    torch.testing.assert_close(classifier.predict_proba(images), expected, atol=1e-5, rtol=0)


# -- abstention ----------------------------------------------------------------------------


def test_margin_one_abstains_on_everything(clip_folder, images):
    assert make(clip_folder, margin=1.0).predict(images) == [None] * len(images)


def test_margin_zero_never_abstains(clip_folder, images):
    classifier = make(clip_folder)
    best = classifier.predict_proba(images).argmax(1).tolist()
    assert classifier.predict(images) == [LABELS[i] for i in best]


def test_margin_abstains_only_on_close_calls(clip_folder, images):
    probabilities = make(clip_folder).predict_proba(images)
    lead = (probabilities.max(1).values - probabilities.min(1).values).sort().values
    margin = float(lead[len(lead) // 2])  # half the images lead by less, the rest by more
    predicted = make(clip_folder, margin=margin).predict(images)
    leads = (probabilities.max(1).values - probabilities.min(1).values).tolist()
    assert [p is None for p in predicted] == [gap < margin for gap in leads]
    assert 0 < predicted.count(None) < len(images)


# -- errors ---------------------------------------------------------------------------------


def bad_folder(tmp_path, config=None):
    folder = tmp_path / "folder"
    folder.mkdir()
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("setup", "options", "message"),
    [
        ("missing", {}, "does not exist"),
        ("empty", {}, "not a CLIP model folder"),
        ("unet", {}, "not a CLIP model"),
        ("bert", {}, "holds a bert model"),
        ("clip", {"labels": []}, "at least two labels"),
        ("clip", {"labels": ["dark", "light", "dark"]}, "repeated: dark"),
        ("clip", {"template": "a photo"}, "does not contain {label}"),
        ("clip", {"templates": []}, "templates must not be empty"),
        ("clip", {"label_prompts": ["one"]}, "one prompt per label"),
        ("clip", {"margin": 1.5}, "margin must be in [0, 1]"),
        ("clip", {"batch_size": 0}, "batch_size must be at least 1"),
    ],
)
def test_bad_options_fail_with_one_line(clip_folder, tmp_path, setup, options, message):
    folder = {
        "missing": lambda: tmp_path / "nowhere",
        "empty": lambda: bad_folder(tmp_path),
        "unet": lambda: bad_folder(tmp_path, {"_class_name": "UNet2DModel"}),
        "bert": lambda: bad_folder(tmp_path, {"model_type": "bert"}),
        "clip": lambda: clip_folder,
    }[setup]()
    with pytest.raises(toolkit.DtkError) as caught:
        toolkit.attribute_classifier(
            "clip", **{"path": folder, "attribute": "group", "labels": LABELS, **options}
        )
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("kept", "missing"),
    [
        (["config.json", "model.safetensors"], "tokenizer"),
        (["config.json", "model.safetensors", "tokenizer.json"], "image processor"),
    ],
)
def test_a_folder_without_its_processor_is_a_one_line_error(clip_folder, tmp_path, kept, missing):
    folder = bad_folder(tmp_path)
    for name in kept:
        (folder / name).write_bytes((clip_folder / name).read_bytes())
    with pytest.raises(toolkit.OptionError, match=f"has no {missing};") as caught:
        make(folder)
    assert "\n" not in str(caught.value)


def test_pickled_weights_need_trust_pickle(clip_folder, tmp_path):
    folder = bad_folder(tmp_path)
    for name in ("config.json", "tokenizer.json", "processor_config.json"):
        (folder / name).write_bytes((clip_folder / name).read_bytes())
    with pytest.raises(toolkit.OptionError, match="trust_pickle=true"):
        make(folder)
