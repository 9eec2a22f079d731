"""``dtk eval label-sheet`` and ``dtk eval bias --human-labels``: the stratified sample, the
sheet labeled in headless Chromium, and its answers back as the audit's calibration."""

from __future__ import annotations

import csv
import html
import io
import json
import re

import pandas
import pytest
from browser import chromium
from folders import copy_subset
from invoke import dtk

import toolkit
from evaluations.label_sheet import _stratified


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """An audit of 150 light and 12 dark real colored digits (the shipped group classifier
    reads them all right)."""
    root = tmp_path_factory.mktemp("label-sheet")
    toolkit.write_colored_digits(root / "source", "test")
    metadata = toolkit.read_metadata(root / "source")
    chosen = pandas.concat([metadata[metadata["group"] == "light"].head(150),
                            metadata[metadata["group"] == "dark"].head(12)])  # fmt: skip
    images = copy_subset(root / "source", chosen.reset_index(drop=True), root / "images")
    result = dtk("eval", "bias", "--images", images, "--bootstrap", 100, "--out",
                 root / "audit", "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    return images, root / "audit", dict(zip(chosen["file_name"], chosen["group"]))


def test_the_sample_is_stratified_by_prediction_and_seeded():
    predictions = pandas.DataFrame({"file_name": [f"{i}.png" for i in range(105)],
                                    "g_predicted": ["dark"] * 5 + ["light"] * 100})  # fmt: skip
    sample, strata = _stratified(predictions, "g_predicted", 40, seed=3)
    assert strata == {"dark": 5, "light": 35} and len(sample) == 40
    assert sample["file_name"].is_unique
    again, _ = _stratified(predictions, "g_predicted", 40, seed=3)
    assert again["file_name"].tolist() == sample["file_name"].tolist()
    other, _ = _stratified(predictions, "g_predicted", 40, seed=4)
    assert other["file_name"].tolist() != sample["file_name"].tolist()
    everything, strata = _stratified(predictions, "g_predicted", 500, seed=0)
    assert strata == {"dark": 5, "light": 100} and len(everything) == 105


def label_in_browser(sheet, tmp_path, answers: dict[str, str]) -> str:
    """Open the sheet in headless Chromium, choose `answers[file]` under each image as a
    person would, and return the answers text box's CSV."""
    page = sheet.read_text()
    script = ("<script>addEventListener('load', () => { const answers = "
              + json.dumps(answers) + "; for (const f of document.querySelectorAll("
              "'figure[data-file]')) { f.querySelector(`input[value=\"${answers[f.dataset.file]}"
              "\"]`).checked = true; } document.dispatchEvent(new Event('change')); });"
              "</script>")  # fmt: skip
    probe = sheet.with_name("probe.html")
    probe.write_text(page.replace("</head>", script + "</head>", 1))
    dom = chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()).stdout
    box = re.search(r'<textarea id="answers"[^>]*>(.*?)</textarea>', dom, re.S)
    assert box is not None, dom[-2000:]
    assert f"{len(answers)} of {len(answers)} answered" in dom
    return html.unescape(box.group(1))


def test_the_label_sheet_round_trip_in_headless_chromium(audited, tmp_path):
    images, audit, truth = audited
    result = dtk("eval", "label-sheet", audit, "--n", 20, "--out", tmp_path / "sheet")
    assert result.exit_code == 0, result.output
    sheet = tmp_path / "sheet" / "label-sheet.html"
    info = json.loads((tmp_path / "sheet" / "label-sheet.json").read_text())
    # the rare predicted value gets an equal share, however few images it has in the audit
    strata = info["strata"]
    assert sum(strata.values()) == 20 and strata["dark"] >= 9 and strata["light"] >= 9
    assert f"20 images ({strata['dark']} dark" in result.stderr
    files = info["files"]
    assert len(set(files)) == 20 and set(files) <= set(truth)
    # labelers must not be anchored: under each image only its number and the choices
    figures = re.findall(r"<figure.*?</figure>", sheet.read_text(), re.S)
    assert len(figures) == 20
    for k, figure in enumerate(figures, start=1):
        words = html.unescape(re.sub(r"<[^>]+>", " ", figure)).split()
        assert words == [str(k), "dark", "light", "can't", "tell"], words
    blank = pandas.read_csv(tmp_path / "sheet" / "label-sheet.csv", keep_default_na=False)
    assert blank["file_name"].tolist() == files and set(blank["group"]) == {""}
    # a person answers: right on all but two, "can't tell" on one and wrong on another
    answers = {f: truth[f] for f in files}
    answers[files[0]] = ""
    answers[files[1]] = "light" if truth[files[1]] == "dark" else "dark"
    text = label_in_browser(sheet, tmp_path, answers)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert {r["file_name"]: r["group"] for r in rows} == answers
    saved = tmp_path / "answers.csv"
    saved.write_text(text)
    out = tmp_path / "checked"
    result = dtk("eval", "bias", "--images", images, "--human-labels", saved, "--bootstrap",
                 100, "--out", out, "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    saved_json = json.loads((out / "results.json").read_text())
    calibration = saved_json["attributes"]["group"]["calibration"]
    assert calibration["folder"] == f"human labels {saved}"
    assert calibration["images"] == 19 and calibration["errors"] == 1
    wrong = answers[files[1]]
    right = "light" if wrong == "dark" else "dark"
    assert calibration["counts"][wrong][right] == 1
    assert calibration["accuracy_by_value"][right] == 1.0
    assert saved_json["config"]["human_labels"] == str(saved)
    report = (out / "report.md").read_text()
    assert "**The classifier's accuracy per true group value**" in report


def test_human_labels_are_checked(audited, tmp_path):
    images, _, truth = audited
    name = next(iter(truth))
    cases = [
        ("file_name,group\nnot-there.png,dark\n", "'not-there.png' is not one of the audited"),
        ("file_name,digit\n" + name + ",3\n", "has no 'group' column"),
        ("file_name,group\n" + name + ",purple\n", "value 'purple' is not one of"),
    ]
    for text, message in cases:
        labels = tmp_path / "labels.csv"
        labels.write_text(text)
        result = dtk("eval", "bias", "--images", images, "--human-labels", labels, "--out",
                     tmp_path / "out")  # fmt: skip
        assert result.exit_code == 2, result.output
        assert message in result.stderr and "Traceback" not in result.output
    result = dtk("eval", "bias", "--images", images, "--human-labels", labels,
                 "--calibration", images, "--out", tmp_path / "out")  # fmt: skip
    assert result.exit_code == 2 and "not both" in result.stderr
    result = dtk("eval", "label-sheet", tmp_path, "--out", tmp_path / "sheet")
    assert result.exit_code == 2 and "is not a bias audit" in result.stderr
