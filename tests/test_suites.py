"""Prompt suites (`evaluations.suites`, ``dtk eval bias --prompts-file``): the file's checks,
the suite figures against a hand computation, a planted truth recovered within the
intervals, and an audit of a folder of prompted images end to end."""

from __future__ import annotations

import json

import numpy as np
import pandas
import pytest
from folders import copy_subset
from invoke import dtk

import toolkit
from evaluations import suites

LABELS = ["dark", "light"]
UNIFORM = {"dark": 0.5, "light": 0.5}
#: planted dark shares of eight prompts: two beyond 90/10, all far from the target
PLANTED = np.array([0.05, 0.2, 0.3, 0.7, 0.8, 0.95, 0.25, 0.75])


def draw(shares: np.ndarray, n: int, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """`n` predictions per prompt, dark with each prompt's planted probability."""
    predicted, prompts = [], []
    for k, p in enumerate(shares):
        predicted += ["dark" if u < p else "light" for u in rng.random(n)]
        prompts += [f"prompt {k}"] * n
    return predicted, prompts


def suite_of(count: int, **groupings: list[str]) -> suites.Suite:
    return suites.Suite("suite.csv", [f"prompt {k}" for k in range(count)], groupings)


def test_the_figures_are_the_hand_computed_ones():
    predicted = ["dark"] * 9 + ["light"] + ["dark", "light"] * 5 + ["unknown"] * 3 + ["light"] * 4
    prompts = ["prompt 0"] * 10 + ["prompt 1"] * 10 + ["prompt 2"] * 7
    summary = suites.summarize_suite(suite_of(3, kind=["x", "x", "y"]), "group", predicted,
                                     prompts, LABELS, UNIFORM, n_boot=200)  # fmt: skip
    skews = [p.skew for p in summary.prompts]
    assert skews == pytest.approx([0.4, 0.0, 0.5])  # |0.9-0.5|, |0.5-0.5|, |0-0.5|
    assert [p.known for p in summary.prompts] == [10, 10, 4]  # unknown left out
    assert summary.overall.mean_skew.value == pytest.approx(0.3)
    assert summary.overall.skewed_share.value == pytest.approx(2 / 3)  # 90% and 100% light
    assert summary.by_grouping["kind"]["x"].mean_skew.value == pytest.approx(0.2)
    assert summary.by_grouping["kind"]["y"].prompts == 1
    assert [p.prompt for p in summary.most_skewed()] == ["prompt 2", "prompt 0", "prompt 1"]
    assert summary.least_skewed()[0].prompt == "prompt 1"
    frame = summary.frame()
    assert list(frame.columns) == ["prompt", "kind", "known", "share_dark", "share_light",
                                   "skew", "skewed"]  # fmt: skip
    assert frame["skewed"].tolist() == [True, False, True]
    saved = summary.to_json()
    assert saved["mean_skew"]["value"] == pytest.approx(0.3) and saved["skewed_at"] == 0.9


def test_a_planted_truth_is_recovered_within_the_intervals():
    """Over 100 planted suites of 8 prompts x 200 images, the mean skew's interval holds the
    planted mean skew about 95% of the time, and the skewed share's holds the planted one
    (2 of 8) as often (every planted share is far from 90/10)."""
    truth_skew = float(np.abs(PLANTED - 0.5).mean())
    truth_skewed = float((np.maximum(PLANTED, 1 - PLANTED) >= 0.9).mean())
    rng = np.random.default_rng(0)
    held_skew = held_skewed = 0
    reps = 100
    for rep in range(reps):
        predicted, prompts = draw(PLANTED, 200, rng)
        summary = suites.summarize_suite(suite_of(len(PLANTED)), "group", predicted, prompts,
                                         LABELS, UNIFORM, n_boot=500, seed=rep)  # fmt: skip
        mean, skewed = summary.overall.mean_skew, summary.overall.skewed_share
        held_skew += mean.ci_low <= truth_skew <= mean.ci_high
        held_skewed += skewed.ci_low <= truth_skewed <= skewed.ci_high
        assert abs(mean.value - truth_skew) < 0.05
    assert 0.88 <= held_skew / reps <= 1.0, held_skew
    assert held_skewed / reps >= 0.88, held_skewed


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("text,kind\na,b\n", "has no 'prompt' column"),
        ("prompt\n", "lists no prompts"),
        ("prompt,kind\na seven,x\n ,y\n", "row 3: the prompt is empty"),
        ("prompt\na seven\na three\na seven\n", "row 4: 'a seven' is listed twice (row 2)"),
    ],
)
def test_a_bad_suite_file_is_one_clear_error(tmp_path, text, message):
    path = tmp_path / "suite.csv"
    path.write_text(text)
    with pytest.raises(toolkit.DtkError, match=message.replace("(", r"\(").replace(")", r"\)")):
        suites.read_suite(path)


def test_the_shipped_suites_are_read_by_name():
    assert suites.shipped_suites() == ["digits-neutral", "occupations"]
    neutral = suites.read_suite("digits-neutral")
    assert len(neutral.prompts) == 20 and neutral.prompts[7] == "a seven"
    assert set(neutral.groupings) == {"digit", "template"}
    occupations = suites.read_suite("occupations")
    assert len(occupations.prompts) == 73
    assert len(set(occupations.groupings["soc_major_group"])) == 22
    with pytest.raises(toolkit.DtkError, match="nor is it a shipped suite"):
        suites.read_suite("no-such-suite")


def prompted_folder(root, planted) -> tuple:
    """A folder of real colored digits with a prompt per image: prompt k has 40 images,
    ``round(40 * planted[k])`` of them dark; and the suite file naming the prompts."""
    toolkit.write_colored_digits(root / "source", "test")
    metadata = toolkit.read_metadata(root / "source")
    dark = metadata[metadata["group"] == "dark"].reset_index(drop=True)
    light = metadata[metadata["group"] == "light"].reset_index(drop=True)
    parts, used = [], {"dark": 0, "light": 0}
    for k, share in enumerate(planted):
        m = round(40 * share)
        for rows, count, group in ((dark, m, "dark"), (light, 40 - m, "light")):
            part = rows.iloc[used[group] : used[group] + count].copy()
            used[group] += count
            part["prompt"] = f"prompt {k}"
            parts.append(part)
    folder = copy_subset(root / "source", pandas.concat(parts, ignore_index=True),
                         root / "images")  # fmt: skip
    suite = root / "suite.csv"
    pandas.DataFrame({"prompt": [f"prompt {k}" for k in range(len(planted))],
                      "side": ["dark" if s > 0.5 else "light" for s in planted]}
                     ).to_csv(suite, index=False)  # fmt: skip
    return folder, suite


@pytest.fixture(scope="module")
def prompted(tmp_path_factory):
    return prompted_folder(tmp_path_factory.mktemp("suite"), PLANTED)


def test_an_audit_of_prompted_images_recovers_each_prompts_share(prompted, tmp_path):
    folder, suite = prompted
    out = tmp_path / "audit"
    result = dtk("eval", "bias", "--images", folder, "--prompts-file", suite, "--bootstrap",
                 200, "--out", out, "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "results.json").read_text())
    group = saved["attributes"]["group"]
    planted = np.round(40 * PLANTED) / 40
    for k, share in enumerate(planted):
        part = group["by"][f"prompt {k}"]["groups"]["dark"]
        assert part["ci_low"] <= share <= part["ci_high"]
        assert abs(part["share"] - share) <= 0.03
    figures = group["suite"]
    truth = float(np.abs(planted - 0.5).mean())
    assert figures["mean_skew"]["ci_low"] <= truth <= figures["mean_skew"]["ci_high"]
    assert figures["skewed_share"]["value"] == pytest.approx(0.25)
    assert figures["most_skewed"][:2] == ["prompt 0", "prompt 5"]
    assert set(figures["by_grouping"]["side"]) == {"dark", "light"}
    assert saved["config"]["prompts_file"] == str(suite) and saved["config"]["prompts"] == 8
    table = pandas.read_csv(out / "suite_group.csv")
    assert table["prompt"].tolist() == [f"prompt {k}" for k in range(8)]
    report = (out / "report.md").read_text()
    assert "### Prompt suite: `group`" in report
    assert "### The most skewed prompts (group)" in report
    assert (out / "figures" / "suite-group.png").is_file()


def test_suite_options_are_checked_before_any_work(prompted, tmp_path):
    folder, suite = prompted
    out = tmp_path / "audit"
    for extra, message in ((["--prompt", "a seven"], "--prompt or --prompts-file"),
                           (["--by", "digit"], "leave out --by")):  # fmt: skip
        result = dtk("eval", "bias", "--images", folder, "--prompts-file", suite, *extra,
                     "--out", out)  # fmt: skip
        assert result.exit_code == 2 and message in result.stderr, result.output
        assert not out.exists()
    other = tmp_path / "other.csv"
    other.write_text("prompt\nprompt 0\n")
    result = dtk("eval", "bias", "--images", folder, "--prompts-file", other, "--out", out)
    assert result.exit_code == 2 and "'prompt 1' is not in" in result.stderr
