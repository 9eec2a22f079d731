"""`dtk eval bias`: planted truth, the results contract, breakdowns, corrections, errors."""

from __future__ import annotations

import json

import pandas
import pytest
from folders import copy_subset
from invoke import dtk

import toolkit
from evaluations import metrics
from evaluations.bias import audit_bias
from toolkit import defaults


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bias-data")
    folders = {}
    for name, split, share in (("train05", "train", 0.05), ("train20", "train", 0.2),
                               ("test", "test", None)):  # fmt: skip
        kwargs = {"minority_share": share} if share is not None else {}
        toolkit.write_colored_digits(root / name, split, **kwargs)
        folders[name] = root / name
    return folders


@pytest.mark.parametrize("name", ["train05", "train20"])
def test_planted_minority_share_is_recovered(data, tmp_path, name):
    truth = (toolkit.read_metadata(data[name])["group"] == "dark").mean()
    result = dtk("eval", "bias", "--images", data[name], "--out", tmp_path / "audit", "-q")
    assert result.exit_code == 0, result.output
    dark = json.loads((tmp_path / "audit" / "results.json").read_text())["attributes"]["group"]
    dark = dark["groups"]["dark"]
    assert abs(dark["share"] - truth) <= 0.03
    assert dark["ci_low"] <= truth <= dark["ci_high"]
    # the gallery shows 16 of each predicted group and says how many there were
    predictions = pandas.read_csv(tmp_path / "audit" / "predictions.csv")
    light = int((predictions["group_predicted"] == "light").sum())
    assert f"**light** (16 of {light} shown)" in (tmp_path / "audit" / "report.md").read_text()


def test_results_contract_and_files(data, tmp_path):
    result = audit_bias(tmp_path, images=data["train05"], by="digit", reference=data["train05"],
                        calibration=data["test"], progress=False)  # fmt: skip
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(result.to_json()))
    # the typed result and results.json say the same
    assert saved["attributes"]["group"]["groups"]["dark"]["share"] == (
        result.attributes["group"].groups["dark"].share
    )
    assert result.attributes["group"].by["3"].total == saved["attributes"]["group"]["by"]["3"][
        "total"]  # fmt: skip
    group = saved["attributes"]["group"]
    assert set(group["groups"]) == {"light", "dark"}
    for entry in group["groups"].values():
        assert {"count", "share", "ci_low", "ci_high", "target"} <= set(entry)
        assert entry["ci_low"] <= entry["share"] <= entry["ci_high"]
    known = sum(g["count"] for g in group["groups"].values())
    assert known + group["unknown"]["count"] == group["total"] == 1367
    for name in ("fairness_discrepancy", "kl_divergence", "total_variation",
                 "mean_absolute_deviation", "bias_amplification"):  # fmt: skip
        value = group["metrics"][name]
        assert value["ci_low"] is not None and value["value"] is not None
    # the metrics are views of the same counts
    p = [group["groups"][k]["share"] for k in ("dark", "light")]
    assert group["metrics"]["fairness_discrepancy"]["value"] == pytest.approx(
        metrics.fairness_discrepancy(p, [0.5, 0.5])
    )
    # the reference is the same folder: its own labels vs the classifier's reading of them
    reference = [group["reference"][k] for k in ("dark", "light")]
    expected = metrics.mean_absolute_deviation(p, [0.5, 0.5]) - metrics.mean_absolute_deviation(
        reference, [0.5, 0.5]
    )
    assert group["metrics"]["bias_amplification"]["value"] == pytest.approx(expected)
    assert abs(expected) < 0.01
    # a nearly perfect classifier: corrected shares are close to the raw ones
    assert group["corrected"]["groups"]["dark"]["share"] == pytest.approx(p[0], abs=0.01)
    assert set(group["by"]) == {str(d) for d in range(10)}
    assert saved["plugins"][0]["name"] == "cnn" and saved["plugins"][0]["version"]
    assert saved["config"]["by"] == "digit"
    for name in ("predictions.csv", "counts_group.csv", "shares_group.csv", "report.html",
                 "report.md"):  # fmt: skip
        assert (tmp_path / name).is_file()
    predictions = pandas.read_csv(tmp_path / "predictions.csv")
    assert len(predictions) == 1367 and "group_predicted" in predictions


def test_a_label_with_no_images_still_counts(data, tmp_path):
    metadata = toolkit.read_metadata(data["test"])
    metadata = metadata[metadata["group"] == "light"].head(60)
    light = copy_subset(data["test"], metadata, tmp_path / "light")
    result = audit_bias(tmp_path / "audit", images=light, progress=False, report=False)
    dark = result.attributes["group"].groups["dark"]
    assert dark.count == 0 and dark.share == 0.0 and dark.ci_high > 0
    counts = pandas.read_csv(tmp_path / "audit" / "counts_group.csv", index_col=0)
    assert counts.loc["dark", "count"] == 0 and "unknown" in counts.index


def test_a_plain_image_folder_is_audited(data, tmp_path):
    plain = tmp_path / "plain" / "nested"
    plain.mkdir(parents=True)
    for name in toolkit.read_metadata(data["test"])["file_name"].head(30):
        (plain / name.replace("/", "-")).write_bytes((data["test"] / name).read_bytes())
    result = audit_bias(tmp_path / "audit", images=tmp_path / "plain", progress=False)
    assert result.attributes["group"].total == 30
    assert result.config.images == str(tmp_path / "plain") and not result.config.generated


def test_generated_audit_spreads_the_by_attribute(tmp_path):
    result = dtk("eval", "bias", "-n", 20, "--steps", 4, "--by", "digit", "--out", tmp_path, "-q")
    assert result.exit_code == 0, result.output
    samples = pandas.read_csv(tmp_path / "samples" / "metadata.csv", dtype=str)
    assert samples.sort_values("file_name")["digit"].value_counts().to_dict() == {
        str(d): 2 for d in range(10)
    }
    assert set(samples["group"].fillna("")) == {""}  # the audited attribute is left free
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"]["n"] == 20 and saved["attributes"]["group"]["total"] == 20
    assert {p["kind"] for p in saved["plugins"]} >= {"attribute_classifier", "sampler"}
    # what generation really used, the implicit default guidance included
    used = {p["kind"]: p["name"] for p in saved["plugins"]}
    assert (used["sampler"], used["schedule"], used["guidance"]) == (defaults.LABEL_SAMPLER,
                                                                     "karras", "cfg")  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--condition", "group=dark"], "leave it unspecified"),
        (["--target", "light=0.5,blue=0.5"], "unknown value 'blue'"),
        (["--target", "reference"], "needs --reference"),
        (["--attribute", "colour"], "no shipped classifier for attribute 'colour'"),
        (["--images", ".", "--model", "."], "not both"),
        (["--images", ".", "--by", "digit"], "no metadata.csv"),
        (["--min-confidence", "2"], "min-confidence"),
    ],
)
def test_user_mistakes_are_one_line_and_exit_2(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = dtk("eval", "bias", *args, "--out", tmp_path / "audit", "-q")
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "audit" / "samples").exists()


def test_a_text_to_image_model_is_audited_from_a_prompt(tmp_path):
    from tiny_sd import save_sd_pipeline

    model = save_sd_pipeline(tmp_path / "sd")
    result = dtk("eval", "bias", "--model", model, "--prompt", "a photo of a cat",
                 "--negative-prompt", "dog", "-n", 6, "--steps", 2, "--classifier-option",
                 "path=" + str(toolkit.default_model().parent / "classifiers" / "group"),
                 "--min-confidence", 0, "--out", tmp_path / "audit", "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    samples = pandas.read_csv(tmp_path / "audit" / "samples" / "metadata.csv", dtype=str)
    assert set(samples["prompt"]) == {"a photo of a cat"}
    assert set(samples["negative_prompt"]) == {"dog"}
    saved = json.loads((tmp_path / "audit" / "results.json").read_text())
    assert saved["attributes"]["group"]["total"] == 6
    assert saved["config"]["generation"]["prompt"] == "a photo of a cat"
    assert saved["config"]["classifier_options"]["path"].endswith("group")


def test_by_reads_the_values_fair_guidance_draws(tmp_path):
    # --by usually spreads its values over the samples; when the guidance draws them itself
    # (fair), the audit breaks the predictions down by what each sample was steered towards
    result = dtk("eval", "bias", "--guidance", "fair", "--by", "group", "-n", 20, "--steps", 6,
                 "--bootstrap", 100, "--out", tmp_path / "audit", "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    metadata = pandas.read_csv(tmp_path / "audit" / "samples" / "metadata.csv",
                               keep_default_na=False)  # fmt: skip
    assert set(metadata["group"]) == {"light", "dark"}
    assert set(metadata["digit"]) == {""}  # not spread over the digits: left free
    counts = pandas.read_csv(tmp_path / "audit" / "counts_group.csv", keep_default_na=False)
    counts = counts.set_index("group")
    drawn = metadata["group"].value_counts()
    assert {v: int(counts[v].sum()) for v in drawn.index} == drawn.to_dict()
    # the shipped classifier mostly agrees with what fair guidance asked for
    agree = sum(int(counts.loc[v, v]) for v in drawn.index)
    assert agree >= 0.8 * len(metadata)


def test_by_still_spreads_an_attribute_fair_guidance_leaves_alone(tmp_path):
    # fair draws the group; --by digit must still spread the samples over the digits
    result = dtk("eval", "bias", "--guidance", "fair", "--by", "digit", "-n", 20, "--steps", 2,
                 "--bootstrap", 100, "--out", tmp_path / "audit", "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    metadata = pandas.read_csv(tmp_path / "audit" / "samples" / "metadata.csv",
                               keep_default_na=False, dtype=str)  # fmt: skip
    assert list(metadata.sort_values("index", key=lambda c: c.astype(int))["digit"]) == [
        str(i % 10) for i in range(20)
    ]
    assert set(metadata["group"]) == {"light", "dark"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--classifier-option", "nonsense"], "--classifier-option 'nonsense' is not of the form"),
        (["--condition", "digit=1", "--condition", "digit=2"], "'digit' is given twice"),
    ],
)
def test_malformed_key_values_are_one_line(tmp_path, args, message):
    result = dtk("eval", "bias", *args, "--out", tmp_path / "audit", "-q")
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "audit").exists()


def subset(source, folder, per_group, groups=("dark", "light"), relabel=0):
    """A dataset folder of `per_group` images of each group of `source`, digits mixed; the
    first `relabel` light images are labeled dark, as a calibration folder with errors."""
    metadata = toolkit.read_metadata(source)
    parts = [metadata[metadata["group"] == g].iloc[::7].head(per_group) for g in groups]
    chosen = pandas.concat(parts, ignore_index=True)
    light = chosen.index[chosen["group"] == "light"][:relabel]
    chosen.loc[light, "group"] = "dark"
    return copy_subset(source, chosen, folder)


def test_calibration_without_errors_explains_why_correction_changes_nothing(data, tmp_path):
    images = subset(data["test"], tmp_path / "images", 20)
    result = audit_bias(tmp_path / "audit", images=images, calibration=data["test"],
                        n_boot=100, progress=False)  # fmt: skip
    group = result.attributes["group"]
    checked = group.calibration
    assert checked.images == 860
    counts = checked.counts
    assert sum(sum(row.values()) for row in counts.values()) == 860
    assert counts["dark"]["light"] == counts["light"]["dark"] == 0  # the shipped one is exact
    assert checked.errors == 0 and checked.accuracy == 1.0 and checked.identity
    assert checked.unknown == counts["dark"]["unknown"] + counts["light"]["unknown"]
    assert checked.confusion == {"dark": {"dark": 1.0, "light": 0.0},
                                 "light": {"dark": 0.0, "light": 1.0}}  # fmt: skip
    for label in ("dark", "light"):
        assert group.corrected.shares[label] == group.groups[label].share
    assert json.loads((tmp_path / "audit" / "results.json").read_text())["attributes"][
        "group"]["calibration"] == json.loads(json.dumps(checked.to_json()))  # fmt: skip
    report = (tmp_path / "audit" / "report.md").read_text()
    assert "| true group | predicted dark | predicted light | predicted unknown |" in report
    assert f"| dark | {counts['dark']['dark']} | 0 | {counts['dark']['unknown']} |" in report
    assert "labels 100.0% of the other" in report
    assert "so `C` is the identity and the corrected shares equal the raw ones" in report


def test_calibration_errors_move_the_corrected_shares(data, tmp_path):
    images = subset(data["test"], tmp_path / "images", 20)
    calibration = subset(data["test"], tmp_path / "calibration", 40, relabel=10)
    result = audit_bias(tmp_path / "audit", images=images, calibration=calibration,
                        n_boot=100, progress=False)  # fmt: skip
    group = result.attributes["group"]
    checked = group.calibration
    counts = checked.counts
    # the ten relabeled light images are "true dark" images the classifier calls light
    assert counts["dark"]["light"] >= 9 and counts["light"]["dark"] == 0
    known = checked.images - checked.unknown
    assert checked.errors == counts["dark"]["light"] and not checked.identity
    assert checked.accuracy == pytest.approx(1 - checked.errors / known)
    # the correction reads the same confusion the report shows: C[pred, true]
    labels = ["dark", "light"]
    confusion = [[checked.confusion[t][p] for t in labels] for p in labels]
    raw = [group.groups[label].count for label in labels]
    expected = metrics.corrected_shares(raw, confusion)
    corrected = [group.corrected.shares[label] for label in labels]
    assert corrected == pytest.approx(list(expected))
    assert corrected[0] > group.groups["dark"].share + 0.05
    report = (tmp_path / "audit" / "report.md").read_text()
    assert "Its errors there move the shares: `dark`" in report
    assert "is the identity" not in report


def test_gallery_captions_show_each_images_label_and_probability(data, tmp_path):
    images = subset(data["test"], tmp_path / "images", 6)
    # a threshold few images reach: the unknown group shows which label each one leaned to
    audit_bias(tmp_path / "audit", images=images, min_confidence=0.999, n_boot=100,
               progress=False)  # fmt: skip
    predictions = pandas.read_csv(tmp_path / "audit" / "predictions.csv")
    assert predictions["group_top"].tolist() == ["dark"] * 6 + ["light"] * 6
    report = (tmp_path / "audit" / "report.md").read_text()
    page = (tmp_path / "audit" / "report.html").read_text()
    lines = [line for line in report.splitlines() if line.startswith("*Under the images")]
    shown = sorted(c for line in lines for c in line.split(":* ", 1)[1].split("; "))
    tops, confidences = predictions["group_top"], predictions["group_confidence"]
    expected = sorted(f"{t} ({c:.2f})" for t, c in zip(tops, confidences))
    assert shown == expected
    assert "unknown" in set(predictions["group_predicted"])
    for caption in expected:
        assert f"<figcaption>{caption}</figcaption>" in page
    assert "most probable label" in report


def test_the_report_says_what_the_classifier_cannot_judge(data, tmp_path):
    images = subset(data["test"], tmp_path / "images", 5)
    audit_bias(tmp_path / "shipped", images=images, n_boot=100, progress=False)
    report = (tmp_path / "shipped" / "report.md").read_text()
    limits = report.split("## Limitations", 1)[1].split("### Configuration", 1)[0]
    assert "shipped `cnn` classifiers learned from the shipped colored-digits images" in limits
    assert "by stroke width and paper grain" in limits
    assert "(`group`: `dark`, `light`)" in limits
    assert "below 0.7 counts as `unknown`" in limits
    assert "No `--calibration` folder was given" in limits
    # a classifier of the user's: nothing is claimed about how it was trained
    folder = toolkit.default_model().parent / "classifiers" / "group"
    audit_bias(tmp_path / "own", images=images, classifier_options={"path": str(folder)},
               min_confidence=0.5, calibration=images, n_boot=100, progress=False)  # fmt: skip
    limits = (tmp_path / "own" / "report.md").read_text().split("## Limitations", 1)[1]
    assert "shipped" not in limits.split("### Configuration", 1)[0]
    assert "below 0.5 counts as `unknown`" in limits
    assert "on the labeled images of" in limits


def test_a_generated_audit_shows_no_path_of_this_machine(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = dtk("eval", "bias", "-n", 10, "--steps", 2, "--bootstrap", 100, "--out", "audit",
                 "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "audit" / "results.json").read_text())
    assert saved["config"]["model"] == "toolkit/assets/generator"  # the shipped generator
    assert saved["config"]["out"] == "audit"
    package = str(toolkit.default_model().parent.parent)
    for name in ("results.json", "report.md", "report.html"):
        text = (tmp_path / "audit" / name).read_text()
        assert package not in text and str(tmp_path) not in text, name


def test_every_generation_option_reaches_the_generated_folder(tmp_path):
    # eval bias takes dtk generate's options and hands them on as one GenerationSettings
    result = dtk("eval", "bias", "-n", 4, "--steps", 2, "--sampler", "euler", "--sampler-option",
                 "s_noise=0.9", "--schedule-option", "rho=5", "--dtype", "bfloat16",
                 "--batch-size", 3, "--bootstrap", 100, "--out", tmp_path / "audit",
                 "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "audit" / "samples" / "run.json").read_text())
    assert run["sampler"] == {"name": "euler", "options": {"s_noise": 0.9}}
    assert run["schedule"]["options"] == {"rho": 5.0}
    assert (run["dtype"], run["steps"]) == ("bfloat16", 2)
    generation = json.loads((tmp_path / "audit" / "results.json").read_text())["config"][
        "generation"]  # fmt: skip
    assert generation["sampler_options"] == {"s_noise": "0.9"}  # as given, converted by the run
    assert (generation["dtype"], generation["batch_size"]) == ("bfloat16", 3)


def test_two_attributes_give_their_intersections(data, tmp_path):
    """digit x group on a real split with 20% dark: every cell counted, the cells' shares
    recover the folder's joint shares within their intervals (the shipped classifiers read
    nearly every image right), the smallest cell named, the tables written and reported."""
    out = tmp_path / "audit"
    result = dtk("eval", "bias", "--images", data["train20"], "--attribute", "digit",
                 "--attribute", "group", "--bootstrap", 200, "--out", out, "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "results.json").read_text())
    joint = saved["intersection"]["joint"]
    assert saved["intersection"]["attributes"] == ["digit", "group"]
    assert len(saved["intersection"]["table"]) == 20 and len(joint["groups"]) == 20
    truth = toolkit.read_metadata(data["train20"]).astype({"digit": str})
    shares = truth.groupby(["digit", "group"]).size() / len(truth)
    held = [joint["groups"][f"digit={d}, group={g}"]["ci_low"] <= share
            <= joint["groups"][f"digit={d}, group={g}"]["ci_high"]
            for (d, g), share in shares.items()]  # fmt: skip
    assert sum(held) >= 18, held
    alone = {k: v for k, v in saved["attributes"]["group"].items() if k != "classifier"}
    assert saved["intersection"]["marginals"]["group"] == alone
    smallest = saved["intersection"]["smallest_cell"]
    assert smallest["count"] == min(row["count"] for row in saved["intersection"]["table"])
    cell = ", ".join(f"{k}={v}" for k, v in smallest["cell"].items())
    report = (out / "report.md").read_text()
    assert "## Intersections: `digit` × `group`" in report
    assert f"The smallest cell is `{cell}`" in report
    counts = pandas.read_csv(out / "counts_intersection.csv")
    assert list(counts.columns) == ["digit", "group", "count"]
    assert counts["count"].sum() == joint["total"] - joint["unknown"]["count"]


def test_every_report_states_the_classifiers_accuracy_per_group(data, tmp_path):
    """With labeled calibration images: the accuracy per true value, in results.json, beside
    each share and in words; without: the report says it was not measured."""
    audit_bias(tmp_path / "checked", images=data["train05"], calibration=data["test"],
               n_boot=100, progress=False)  # fmt: skip
    saved = json.loads((tmp_path / "checked" / "results.json").read_text())
    calibration = saved["attributes"]["group"]["calibration"]
    for value, predicted in calibration["counts"].items():
        confident = sum(n for label, n in predicted.items() if label != "unknown")
        assert calibration["accuracy_by_value"][value] == predicted[value] / confident
    report = (tmp_path / "checked" / "report.md").read_text()
    assert "**The classifier's accuracy per true group value** on the labeled" in report
    assert "classifier\\_accuracy" in report  # the shares table's column, escaped
    audit_bias(tmp_path / "unchecked", images=data["train05"], n_boot=100, progress=False)
    report = (tmp_path / "unchecked" / "report.md").read_text()
    assert "**The classifier's accuracy per group value was not measured**" in report
