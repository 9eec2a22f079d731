"""Independent judges: the `mlp` family and its shipped judges, synthetic fidelity measured
by a judge that is not the filter, and the refusal to audit synthetic images with the
classifier that filtered them."""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np
import pandas
import pytest
import torch
from folders import copy_subset
from invoke import dtk

import toolkit
from evaluations import fidelity
from evaluations.compare import newcombe
from evaluations.metrics import wilson_interval
from toolkit.data.dataset_folder import ImageDataset, load_image_folder
from toolkit.recipes import colored_digits as cd


@pytest.fixture(scope="module")
def test_split(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data") / "test"
    cd.write(folder, "test")
    return load_image_folder(folder, ["digit", "group"])


# -- the mlp family and the shipped judges --------------------------------------------------


@pytest.mark.parametrize("attribute", ["digit", "group"])
def test_shipped_judges_read_real_images_alike_in_both_groups(test_split, attribute):
    judge = toolkit.attribute_classifier("mlp", attribute=attribute)
    assert judge.attribute == attribute
    truth = test_split.codes(attribute, judge.labels)
    correct = (judge.predict_proba(test_split.images).argmax(1) == truth).numpy()
    groups = test_split.metadata["group"].to_numpy()
    by_group = {g: correct[groups == g].mean() for g in ("light", "dark")}
    assert correct.mean() >= 0.98, by_group
    # no worse on one group: a judge that is cannot tell synthesizer from itself
    assert abs(by_group["light"] - by_group["dark"]) <= 0.01, by_group


@pytest.mark.parametrize("attribute", ["digit", "group"])
def test_the_judges_are_another_family_trained_another_way(attribute):
    judge = json.loads((toolkit.judge_path(attribute) / "config.json").read_text())
    cnn = json.loads((toolkit.classifier_path(attribute) / "config.json").read_text())
    assert judge["architecture"]["name"] == "small-mlp"
    assert cnn["architecture"]["name"] == "small-cnn"
    assert judge["training"]["seed"] != cnn["training"]["seed"]
    assert judge["training"]["augment"] != cnn["training"]["augment"]
    assert judge["training"]["data_description"]["split"] == "train-balanced"
    assert judge["training"]["command"] in (toolkit.judge_path(attribute) / "README.md").read_text()


def test_train_classifier_mlp_writes_a_folder_only_the_mlp_plugin_serves(test_split, tmp_path):
    out = tmp_path / "judge"
    result = dtk("train-classifier", test_split.root, "--attribute", "group", "--out", out,
                 "--architecture", "mlp", "--hidden", "32", "--epochs", "2", "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == {
        "name": "small-mlp",
        "in_channels": 3,
        "image_size": 16,
        "hidden": [32],
        "dropout": 0.3,
        "num_labels": 2,
    }
    assert "--architecture mlp --hidden 32" in config["training"]["command"]
    judge = toolkit.attribute_classifier("mlp", path=out)
    linear = [m for m in judge._classifier.network if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(768, 32), (32, 2)]
    assert judge.predict_proba(test_split.images[:4]).shape == (4, 2)
    with pytest.raises(toolkit.OptionError, match="holds a small-mlp, not a small-cnn"):
        toolkit.attribute_classifier("cnn", path=out)
    with pytest.raises(toolkit.OptionError, match="holds a small-cnn, not a small-mlp"):
        toolkit.attribute_classifier("mlp", path=toolkit.classifier_path("digit"))
    with pytest.raises(toolkit.DtkError, match="no shipped judge for attribute 'color'"):
        toolkit.attribute_classifier("mlp", attribute="color")


@pytest.mark.parametrize(("args", "message"), [
    (["--architecture", "rnn"], "'rnn' is not one of 'cnn', 'mlp'"),
    (["--architecture", "mlp", "--hidden", "32,x"], "--hidden takes widths like 512,128"),
    (["--architecture", "mlp", "--hidden", "0"], "each of hidden"),
    (["--architecture", "mlp", "--image-size", "6", "--hidden", "8"], None),
    (["--image-size", "6"], "--image-size must be a positive multiple of 4"),
])  # fmt: skip
def test_train_classifier_architecture_mistakes(test_split, tmp_path, args, message):
    out = tmp_path / "clf"
    result = dtk("train-classifier", test_split.root, "--attribute", "group", "--out", out,
                 "--epochs", "1", "-q", *args)  # fmt: skip
    if message is None:  # an MLP has no pooling: any size of 4 or more
        assert result.exit_code == 0, result.output
        return
    assert result.exit_code == 2, result.output
    assert message in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "Traceback" not in result.output
    assert not out.exists()


# -- fidelity on a planted truth -------------------------------------------------------------


class PixelJudge:
    """Reads the label a pixel holds: image value k/10 in the first pixel means label k."""

    attribute = "digit"
    labels = tuple(str(k) for k in range(10))

    def predict_proba(self, images):
        read = (images[:, 0, 0, 0] * 10).round().long()
        return torch.nn.functional.one_hot(read, 10).float()


def dataset(labels, shown, groups):
    """Images whose first pixel shows `shown`, labeled (requested) `labels`."""
    images = torch.zeros(len(labels), 3, 4, 4)
    images[:, 0, 0, 0] = torch.tensor(shown, dtype=torch.float32) / 10
    metadata = pandas.DataFrame({"file_name": [f"{i}.png" for i in range(len(labels))],
                                 "digit": [str(v) for v in labels], "group": groups})  # fmt: skip
    return ImageDataset(pathlib.Path("planted"), images, metadata)


def test_fidelity_recovers_planted_shares_per_attribute_and_cell():
    rng = np.random.default_rng(0)
    # synthetic: 300 dark images of digits 0-2, 45 of them drawn as another digit
    labels = np.repeat([0, 1, 2], 100)
    shown = labels.copy()
    wrong = rng.choice(300, 45, replace=False)
    shown[wrong] = (labels[wrong] + 1) % 3
    synthetic = dataset(labels, shown, ["dark"] * 300)
    # real: digits 0-3 in both groups, 6 dark images of digit 0 mislabeled; the light ones and
    # digit 3 are in no synthetic cell, so they must not count
    real_labels = np.repeat(np.arange(4), 100)
    real_shown = real_labels.copy()
    dark = np.array(["dark", "light"] * 200)
    zero_dark = np.flatnonzero((real_labels == 0) & (dark == "dark"))[:6]
    real_shown[zero_dark] = 5
    real_shown[(dark == "light")] = 9  # the judge misreads every light image
    real = dataset(real_labels, real_shown, dark.tolist())

    result = fidelity.measure_fidelity(
        synthetic, real, {"digit": PixelJudge()}, judge="pixel", judge_options={},
        identities={"digit": "pixel {}"}, cells=["digit", "group"],
    )  # fmt: skip
    overall = result.overall()[0]
    assert (overall.synthetic_n, overall.synthetic.count) == (300, 255)
    real_dark = int(((real_labels < 3) & (dark == "dark")).sum())  # 150, 6 misread
    assert (overall.real_n, overall.real.count) == (real_dark, real_dark - 6)
    assert overall.synthetic.share == pytest.approx(255 / 300)
    low, high = wilson_interval(255, 300)
    assert (overall.synthetic.ci_low, overall.synthetic.ci_high) == pytest.approx((low, high))
    expected = newcombe(overall.real, overall.synthetic)
    assert overall.difference.value == pytest.approx(255 / 300 - 144 / 150)
    assert (overall.difference.ci_low, overall.difference.ci_high) == pytest.approx(
        (expected.ci_low, expected.ci_high)
    )
    assert overall.difference.ci_high < 0  # a planted 11-point gap is found
    assert not result.matched
    cells = {r.cell: r for r in result.rows if r.cell != "all"}
    assert set(cells) == {f"digit={d} group=dark" for d in range(3)}
    for d in range(3):
        row = cells[f"digit={d} group=dark"]
        planted = int((shown[labels == d] == d).sum())
        assert (row.synthetic_n, row.synthetic.count) == (100, planted)
    assert cells["digit=0 group=dark"].real.count == 50 - 6
    table = result.frame()
    assert list(table["cell"]) == ["all", *sorted(cells)]
    saved = result.to_json()
    assert saved["matched"] is False and saved["tolerance"] == 0.03
    assert json.loads(json.dumps(saved)) == saved


def test_a_faithful_synthesizer_matches_and_a_missing_cell_is_refused():
    labels = np.repeat([0, 1], 50)
    synthetic = dataset(labels, labels, ["dark"] * 100)
    real = dataset(labels, labels, ["dark"] * 100)
    result = fidelity.measure_fidelity(
        synthetic, real, {"digit": PixelJudge()}, judge="pixel", judge_options={},
        identities={}, cells=["digit", "group"],
    )  # fmt: skip
    assert result.matched and result.overall()[0].difference.value == 0
    elsewhere = dataset(labels, labels, ["light"] * 100)
    with pytest.raises(toolkit.DtkError, match="no real images in the synthetic data's cells"):
        fidelity.measure_fidelity(
            synthetic,
            elsewhere,
            {"digit": PixelJudge()},
            judge="pixel",
            judge_options={},
            identities={},
            cells=["digit", "group"],
        )


# -- judges and filters stay apart -----------------------------------------------------------


def test_identity_names_the_folder_whatever_way_it_was_given(tmp_path, monkeypatch):
    shipped = "toolkit/assets/classifiers/digit"  # the same on every machine
    assert fidelity.identity("cnn", {}, "digit") == shipped
    assert fidelity.identity("cnn", {"path": toolkit.classifier_path("digit")}, "digit") == shipped
    assert fidelity.identity("mlp", {}, "digit") == "toolkit/assets/judges/digit"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    assert fidelity.identity("cnn", {"path": "mine"}, "x") == str((tmp_path / "mine").resolve())
    assert fidelity.identity("cnn", {}, "colour").startswith("cnn ")
    clip = fidelity.identity("clip", {"labels": "a,b"}, "gender")
    assert clip == fidelity.identity("clip", {"labels": "a,b", "attribute": "x"}, "gender")
    assert clip != fidelity.identity("clip", {"labels": "a,c"}, "gender")


@pytest.fixture(scope="module")
def colored_data(tmp_path_factory):
    """Digits 0 and 1 of the colored-digits training split (8 light, 2 dark each), with its
    dataset.json: synthesis knows it for colored digits."""
    root = tmp_path_factory.mktemp("fidelity-data")
    full = root / "full"
    toolkit.write_colored_digits(full, "train", minority_share=0.05, seed=3)
    metadata = toolkit.read_metadata(full)
    keep = pandas.concat(
        metadata[(metadata.digit == d) & (metadata.group == g)].head(n)
        for d in ("0", "1") for g, n in (("light", 8), ("dark", 2))
    )  # fmt: skip
    small = copy_subset(full, keep, root / "small")
    (small / "dataset.json").write_text((full / "dataset.json").read_text())
    return small


def test_synthesize_judges_what_it_accepted_with_the_shipped_mlp(colored_data, tmp_path):
    out = tmp_path / "synth"
    result = dtk("synthesize", "--data", colored_data, "--steps", 8, "--out", out, "-q")
    assert result.exit_code == 0, result.output
    assert "judged by mlp as requested: group " in result.output
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["judge"] == "mlp"
    judged = saved["fidelity"]
    assert judged["judges"] == {a: f"toolkit/assets/judges/{a}" for a in ("group", "digit")}
    overall = {r["attribute"]: r for r in judged["rows"] if r["cell"] == "all"}
    assert set(overall) == {"group", "digit"}
    synthetic = toolkit.load_image_folder(out / "synthetic", ["digit", "group"])
    # the judge's figures, recomputed here from the images
    for attribute, row in overall.items():
        judge = toolkit.attribute_classifier("mlp", attribute=attribute)
        read = judge.predict_proba(synthetic.images).argmax(1).numpy()
        requested = synthetic.metadata[attribute].to_numpy()
        assert row["synthetic_n"] == len(synthetic)
        assert row["synthetic"] == pytest.approx((np.array(judge.labels)[read] == requested).mean())
    # the reference: the held-out test split of the data's seed, dark cells of digits 0 and 1
    reference = json.loads((out / "judge-reference" / "dataset.json").read_text())
    assert (reference["split"], reference["seed"]) == ("test", 3)
    assert overall["digit"]["real_n"] == 2 * cd.TEST_PER_DIGIT
    assert math.isclose(
        overall["digit"]["difference"], overall["digit"]["synthetic"] - overall["digit"]["real"]
    )
    # the folder says who filtered it, and the report shows the judge's reading
    filtered = json.loads((out / "synthetic" / "dataset.json").read_text())["filtered_by"]
    assert filtered == {a: f"toolkit/assets/classifiers/{a}" for a in ("group", "digit")}
    assert "Fidelity, read by an independent judge" in (out / "report.md").read_text()

    # auditing these images with the filter's classifier is refused, in one line
    audit = dtk("eval", "bias", "--images", out / "synthetic", "--out", tmp_path / "a", "-q")
    assert audit.exit_code == 2, audit.output
    assert "is the classifier that filtered these images" in audit.output
    assert "--classifier mlp" in audit.output
    assert not (tmp_path / "a").exists()
    audit = dtk("eval", "bias", "--images", out / "synthetic", "--classifier", "mlp",
                "--out", tmp_path / "b", "-q")  # fmt: skip
    assert audit.exit_code == 0, audit.output


def test_a_judge_that_is_the_filter_is_refused_before_anything_is_written(colored_data, tmp_path):
    out = tmp_path / "synth"
    for args in (["--judge", "cnn"], ["--classifier", "mlp", "--judge", "mlp"]):
        result = dtk("synthesize", "--data", colored_data, "--out", out, "-q", *args)
        assert result.exit_code == 2, result.output
        assert "--judge for 'group' is the classifier that filtered these images" in result.output
        assert not out.exists()


def test_no_judge_when_asked_for_none_or_when_none_is_shipped(colored_data, tmp_path):
    out = tmp_path / "none"
    result = dtk("synthesize", "--data", colored_data, "--steps", 4, "--budget", 2,
                 "--judge", "none", "--out", out, "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "results.json").read_text())
    assert saved["fidelity"] is None and saved["config"]["judge"] is None
    assert not (out / "judge-reference").exists()
    result = dtk("synthesize", "--data", colored_data, "--judge", "none", "--judge-data",
                 colored_data, "--out", tmp_path / "x", "-q")  # fmt: skip
    assert result.exit_code == 2
    assert "--judge-data and --judge-option need a --judge" in result.output
