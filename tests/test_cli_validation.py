"""Hostile input to `dtk eval bias`, `dtk synthesize`, `dtk eval downstream` and `dtk demo`.

Each mistake is one line on stderr with exit status 2, found before anything is generated or
written: no --out folder, no default data, no plan, no half-made report.
(`dtk train`, `train-classifier` and `data` have theirs beside their other tests.)
"""

from __future__ import annotations

import numpy as np
import pandas
import pytest
from invoke import dtk
from PIL import Image

MAX_SEED = 2**64 - 1


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """Four random images with the shipped model's attributes (digit, group)."""
    folder = tmp_path_factory.mktemp("labelled")
    rng = np.random.default_rng(0)
    rows = []
    for i, (digit, group) in enumerate([("0", "light"), ("0", "dark"), ("1", "light"),
                                        ("1", "dark")]):  # fmt: skip
        name = f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / name)
        rows.append({"file_name": name, "digit": digit, "group": group})
    pandas.DataFrame(rows).to_csv(folder / "metadata.csv", index=False)
    return folder


def refused(result, message, folder):
    """Exit 2, one line holding `message`, no traceback, and `folder` left empty but for
    a file named FILE the test may have put there."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert sorted(p.name for p in folder.iterdir() if p.name != "FILE") == []
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def run(tmp_path, monkeypatch, *args):
    """``dtk ARGS`` in an empty folder, FILE there an existing regular file."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "FILE").write_text("mine")
    return dtk(*args)


# a few samples and one step each: if a check were missing, the test would still be quick
BIAS = ("eval", "bias", "-n", "10", "--steps", "1", "--bootstrap", "100", "-q")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seed", str(MAX_SEED)], f"--seed {MAX_SEED} is too large"),
        (["--seed", str(MAX_SEED - 8)], f"--seed {MAX_SEED - 8} is too large"),
        (["--out", "FILE"], "--out FILE exists and is not a folder"),
        (["--out", "FILE/audit"], "--out FILE/audit is not writable"),
    ],
)
def test_eval_bias(tmp_path, monkeypatch, args, message):
    refused(run(tmp_path, monkeypatch, *BIAS, *args), message, tmp_path)


def test_eval_bias_of_an_image_folder_into_a_file(tmp_path, monkeypatch, labelled):
    result = run(tmp_path, monkeypatch, "eval", "bias", "--images", labelled, "--out", "FILE",
                 "-q")  # fmt: skip
    refused(result, "--out FILE exists and is not a folder", tmp_path)
    assert (tmp_path / "FILE").read_text() == "mine"


SYNTHESIZE = ("synthesize", "--budget", "2", "--max-rounds", "1", "--steps", "1", "-q")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seed", str(MAX_SEED)], f"--seed {MAX_SEED} is too large"),
        (["--seed", "-1"], "--seed must be a whole number >= 0"),
        (["--consistency-threshold", "2"], "--consistency-threshold must be in [0, 1]"),
        (["--memorization-threshold", "nan"], "--memorization-threshold must be a finite "),
        (["--memorization-threshold", "-1"], "--memorization-threshold must be a finite "),
        (["--steps", "0"], "--steps must be a whole number >= 1"),
        (["--batch-size", "0"], "--batch-size must be a whole number >= 1"),
        (["--device", "bogus"], "--device 'bogus'"),
        (["--sampler", "bogus"], "unknown sampler 'bogus'"),
        (["--classifier", "bogus"], "unknown attribute classifier 'bogus'"),
        (["--out", "FILE"], "--out FILE exists and is not a folder"),
    ],
)
def test_synthesize(tmp_path, monkeypatch, labelled, args, message):
    """Found before the plan is printed or plan.csv written (the default data too)."""
    result = run(tmp_path, monkeypatch, *SYNTHESIZE, "--data", labelled, *args)
    refused(result, message, tmp_path)
    result = run(tmp_path, monkeypatch, *SYNTHESIZE, *args)  # would write OUT/real first
    refused(result, message, tmp_path)


DOWNSTREAM = ("eval", "downstream", "--models", "logreg", "--steps", "4", "-q")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seeds", "0"], "--seeds must be a whole number >= 1"),
        (["--steps", "1"], "--steps must be at least 2"),
        (["--threads", "-1"], "--threads must be a whole number >= 1"),
        (["--models", "resnet"], "--models: unknown model 'resnet'"),
        (["--methods", ","], "--methods: none given"),
        (["--device", "bogus"], "--device 'bogus'"),
        (["--out", "FILE"], "--out FILE exists and is not a folder"),
    ],
)
def test_eval_downstream(tmp_path, monkeypatch, args, message):
    """Found before the default colored-digits data is written to OUT/data."""
    refused(run(tmp_path, monkeypatch, *DOWNSTREAM, *args), message, tmp_path)


DEMO = ("demo", "-n", "10", "--steps", "1", "--seeds", "1", "--budget", "2", "-q")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seeds", "0"], "--seeds must be a whole number >= 1"),
        (["--budget", "0"], "--budget must be a whole number >= 1"),
        (["--sampler", "bogus"], "unknown sampler 'bogus'"),
        (["--device", "bogus"], "--device 'bogus'"),
        (["--out", "FILE"], "--out FILE exists and is not a folder"),
    ],
)
def test_demo(tmp_path, monkeypatch, args, message):
    """Found before the first stage writes its data."""
    refused(run(tmp_path, monkeypatch, *DEMO, *args), message, tmp_path)
