"""Hostile input to `dtk eval bias`, `dtk synthesize`, `dtk eval downstream` and `dtk demo`.

Each mistake is one line on stderr with exit status 2, found before anything is generated or
written: no --out folder, no default data, no plan, no half-made report.
(`dtk train`, `train-classifier` and `data` have theirs beside their other tests.)
"""

from __future__ import annotations

import re

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
        (["--steps", "0"], "steps must be a whole number >= 1"),
        (["--batch-size", "0"], "batch size must be a whole number >= 1"),
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


# -- one set of generation options --------------------------------------------------------

#: the generation options `toolkit.generation_options` adds without its filters
FILTER_OPTIONS = {"safety_filters", "filter_option", "on_flag"}


def command(*path):
    """The click command at ``dtk PATH...``."""
    import click

    from toolkit.cli import cli

    found = cli
    for name in path:
        found = found.get_command(click.Context(found), name)
    return found


def generation_params(cmd, with_filters):
    """Each generation option of `cmd`, as everything click knows of it but its help."""
    from toolkit.cli.options import KEYS

    names = set(KEYS) - (set() if with_filters else FILTER_OPTIONS)
    return {
        p.name: (tuple(p.opts), p.type.name, p.multiple, getattr(p, "is_flag", False),
                 p.default, p.show_default, p.metavar)
        for p in cmd.params if p.name in names
    }  # fmt: skip


@pytest.mark.parametrize(
    ("path", "with_filters", "steps", "shown"),
    [(("eval", "bias"), True, None, r"Default: the model's"),
     # a label model's 20 (synthesis's own), a text-to-image model's own: None at the CLI
     (("synthesize",), False, None, r"Default: 20 with a label-\s*conditioned\s+model;"
      r"\s+a\s+text-to-image\s+model's\s+own"),
     (("demo",), False, 10, r"\[default: 10\]")],
)  # fmt: skip
def test_commands_that_generate_take_exactly_dtk_generates_options(path, with_filters, steps,
                                                                   shown):  # fmt: skip
    """The same options, types and defaults as ``dtk generate`` (but --steps, whose default
    is the command's own or, as dtk generate's, the model's (None), and the safety filters
    where the command has none)."""
    cmd = command(*path)
    ours = generation_params(cmd, with_filters)
    theirs = generation_params(command("generate"), with_filters)
    assert ours.keys() == theirs.keys()
    assert ours.pop("steps")[4] == steps
    theirs.pop("steps")
    assert ours == theirs
    if not with_filters:  # synthesize's --filters names its own filters, not --filter
        assert not {"filter_option", "on_flag"} & {p.name for p in cmd.params}
        assert all("--filter" not in p.opts for p in cmd.params)
    # the command's default steps is shown in --help
    result = dtk(*path, "--help")
    assert result.exit_code == 0, result.output
    assert re.search(rf"\n\s+--steps INTEGER\s+Sampling steps\.\s+{shown}",
                     result.output), result.output  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sampler-option", "nonsense=1"], "nonsense"),
        (["--schedule-option", "rho=lots"], "rho"),
        (["--guidance-option", "scale=2"], "--guidance-option needs --guidance NAME"),
    ],
)
def test_new_generation_options_are_checked_before_anything_is_written(
    tmp_path, monkeypatch, labelled, args, message
):
    result = run(tmp_path, monkeypatch, *SYNTHESIZE, *args)
    refused(result, message, tmp_path)
    refused(run(tmp_path, monkeypatch, *DEMO, *args), message, tmp_path)
