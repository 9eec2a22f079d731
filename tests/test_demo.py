"""`dtk demo` end to end through the installed `dtk` executable, and its report in Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess

import pandas
from browser import check_renders


def test_demo_runs_every_stage_and_writes_one_report(tmp_path):
    out = tmp_path / "demo"
    command = [shutil.which("dtk"), "demo", "--out", str(out), "-n", "40", "--seeds", "2",
               "--steps", "5", "--budget", "60", "-q"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "minority share: training 0.050" in result.stderr
    assert f"report: {out / 'report.html'}" in result.stderr

    saved = json.loads((out / "results.json").read_text())
    head = saved["headline"]
    assert head["training_minority_share"] == 68 / 1367
    # fair guidance towards uniform asks for each group in half of the 40 samples (how well
    # the model obeys is measured by benchmarks/fairness.py, at full quality)
    asked = pandas.read_csv(out / "audit-fair" / "samples" / "metadata.csv", dtype=str)
    assert asked["group"].value_counts().to_dict() == {"light": 20, "dark": 20}
    assert head["fair_guidance_minority_share"]["share"] is not None
    assert head["synthetic_images"] + head["synthesis_shortfall"] == 60
    for method in ("real", "oversample", "jitter", "synthetic", "pretrain_finetune"):
        assert head[f"cnn_{method}"]["gap"] is not None, method
    assert set(saved["seconds"]) == {"data", "audit", "fair guidance", "synthesis", "downstream"}
    for stage in saved["stages"].values():
        assert json.loads((out / stage).read_text())["command"]
    for stage in ("audit", "audit-fair", "synthesize", "downstream"):
        assert (out / stage / "report.html").is_file()

    page = (out / "report.html").read_text()
    for heading in ("Audit of the generator", "Fair guidance", "Synthetic minority data",
                    "Downstream fairness"):  # fmt: skip
        assert heading in page
    assert check_renders(out / "report.html", tmp_path) >= 5  # plots and galleries
