"""``dtk eval compare`` (`evaluations.compare`): Fair Diffusion's published figure recomputed
from its counts, the statistics against textbook values, a planted change found where it is
and nowhere else, two suite audits compared end to end, and the refusals."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pandas
import pytest
from invoke import dtk

from evaluations import compare
from evaluations.results import MetricValue

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "examples" / "fair-diffusion"


def test_fair_diffusions_published_figure_is_recomputed(tmp_path):
    """Mean |p_female - 1/2| over 153 occupations: 0.311 for Stable Diffusion 1.5, 0.105 with
    Fair Diffusion (Friedrich et al. 2023), from the counts its authors published."""
    result = compare.compare_audits(EXAMPLE / "stable-diffusion.csv",
                                    EXAMPLE / "fair-diffusion.csv", tmp_path,
                                    counts_attribute="gender", n_boot=300)  # fmt: skip
    gender = result.attributes["gender"]
    assert len(gender.rows) == 153 and gender.focus == "female"
    assert gender.mean_skew_a.value == pytest.approx(0.311436, abs=1e-6)
    assert gender.mean_skew_b.value == pytest.approx(0.104835, abs=1e-6)
    change = gender.mean_skew_change
    assert change.value == pytest.approx(0.104835 - 0.311436, abs=1e-6)
    assert change.ci_low < change.value < change.ci_high < 0
    assert len(gender.significant()) == 108
    saved = json.loads((tmp_path / "comparison.json").read_text())
    skew = saved["attributes"]["gender"]["mean_skew"]
    assert skew["a"]["value"] == pytest.approx(0.311436, abs=1e-6)
    table = pandas.read_csv(tmp_path / "comparison_gender.csv")
    nurse = table.set_index("row").loc["nurse"]
    assert nurse["share_female_a"] > 0.9 and nurse["p_corrected"] < 0.05
    assert "**108 of 153** row(s) differ" in (tmp_path / "report.md").read_text()


def test_holm_and_newcombe_give_the_textbook_values():
    # Holm: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1, made non-decreasing
    assert compare.holm([0.01, 0.04, 0.03, 0.005]).tolist() == pytest.approx(
        [0.03, 0.06, 0.06, 0.02])  # fmt: skip
    # Newcombe (1998), table II, example (a): 56/70 against 48/80, method 10
    a = compare.focus_share(48, 80, 0.5)
    b = compare.focus_share(56, 70, 0.5)
    d = compare.newcombe(a, b)
    assert (d.value, round(d.ci_low, 4), round(d.ci_high, 4)) == (pytest.approx(0.2), 0.0524,
                                                                 0.3339)  # fmt: skip
    assert compare.newcombe(compare.focus_share(0, 0, 0.5), b) == MetricValue(None, None, None)
    assert compare.homogeneity_p([5, 0], [5, 0]) == 1.0  # one value seen: nothing differs
    assert compare.homogeneity_p([0, 0], [5, 3]) is None


def counts_file(path: pathlib.Path, rows: dict[str, tuple[int, int]]) -> pathlib.Path:
    pandas.DataFrame([{"prompt": p, "dark": d, "light": n} for p, (d, n) in rows.items()]
                     ).to_csv(path, index=False)  # fmt: skip
    return path


@pytest.mark.parametrize("correction", ["holm", "fdr_bh"])
def test_a_planted_change_is_found_where_it_is_and_nowhere_else(tmp_path, correction):
    rng = np.random.default_rng(0)
    a, b = {}, {}
    for k in range(12):  # every prompt 20% dark in A; in B the first is 50% dark
        a[f"p{k}"] = (d := int(rng.binomial(200, 0.2)), 200 - d)
        b[f"p{k}"] = (d := int(rng.binomial(200, 0.5 if k == 0 else 0.2)), 200 - d)
    result = compare.compare_audits(counts_file(tmp_path / "a.csv", a),
                                    counts_file(tmp_path / "b.csv", b), tmp_path / "out",
                                    correction=correction, n_boot=300, report=False)  # fmt: skip
    value = result.attributes["value"]
    assert [r.row for r in value.significant()] == ["p0"]
    first = value.rows[0]
    assert first.difference.ci_low <= 0.3 <= first.difference.ci_high
    assert first.p_corrected >= first.p_value


@pytest.fixture(scope="module")
def two_audits(tmp_path_factory):
    """Suite audits of two prompted folders of real colored digits: A with the suite test's
    planted shares, B with every prompt at 50% dark."""
    from test_suites import PLANTED, prompted_folder

    root = tmp_path_factory.mktemp("compare")
    folders = {"a": prompted_folder(root / "a", PLANTED),
               "b": prompted_folder(root / "b", np.full(len(PLANTED), 0.5))}  # fmt: skip
    audits = {}
    for name, (images, suite) in folders.items():
        out = root / f"audit-{name}"
        result = dtk("eval", "bias", "--images", images, "--prompts-file", suite,
                     "--bootstrap", 200, "--out", out, "-q")  # fmt: skip
        assert result.exit_code == 0, result.output
        audits[name] = out
    return audits


def test_two_suite_audits_are_compared_prompt_by_prompt(two_audits, tmp_path):
    from test_suites import PLANTED

    out = tmp_path / "compare"
    result = dtk("eval", "compare", two_audits["a"], two_audits["b"], "--name", "skewed",
                 "--name", "balanced", "--bootstrap", 300, "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "group: mean skew" in result.stderr
    saved = json.loads((out / "comparison.json").read_text())
    group = saved["attributes"]["group"]
    planted = np.round(40 * PLANTED) / 40
    truth = float(np.abs(planted - 0.5).mean())
    skew = group["mean_skew"]
    assert skew["a"]["ci_low"] <= truth <= skew["a"]["ci_high"]
    assert skew["b"]["value"] <= 0.05
    assert skew["change"]["ci_high"] < 0
    # B sits on the target, where the replicates pile up against 0: every interval still
    # holds its point (BCa alone can carry it past)
    for figure in skew.values():
        assert figure["ci_low"] <= figure["value"] <= figure["ci_high"], figure
    # the extreme prompts (5% and 95% dark against 50%) differ; the 30%/70% ones may not
    assert {"prompt 0", "prompt 5"} <= set(group["significant"])
    report = (out / "report.md").read_text()
    assert "Comparison: skewed against balanced" in report
    assert "prompt 0 — skewed" in report and "prompt 0 — balanced" in report


def test_refusals_are_one_line(two_audits, tmp_path):
    other = tmp_path / "not-an-audit"
    other.mkdir()
    cases = [
        ((two_audits["a"], other), "is not a bias audit (no results.json"),
        ((two_audits["a"], two_audits["b"], "--name", "x"), "--name takes two different"),
        ((two_audits["a"], two_audits["b"], "--label", "purple"), "--label 'purple' is not"),
        ((two_audits["a"], two_audits["b"], "--attribute", "digit"), "did not audit 'digit'"),
    ]
    for args, message in cases:
        result = dtk("eval", "compare", *args, "--out", tmp_path / "out")
        assert result.exit_code == 2, result.output
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
