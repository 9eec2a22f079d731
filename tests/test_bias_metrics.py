"""Bias-audit statistics against pandas, scipy, closed forms and planted ground truth."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import entropy, norm

from evaluations import metrics as m
from toolkit import DtkError

LABELS = ["light", "medium", "dark"]


def wilson_reference(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    # The other common arrangement of the Wilson formula, so a slip in one shows up.
    z = norm.ppf(1 - (1 - confidence) / 2)
    p = k / n
    root = z * math.sqrt(z**2 + 4 * n * p * (1 - p))
    denominator = 2 * (n + z**2)
    return (2 * n * p + z**2 - root) / denominator, (2 * n * p + z**2 + root) / denominator


# --------------------------------------------------------------------------------------------
# count_table


def test_count_table_keeps_zero_labels_and_unknown():
    table = m.count_table(["light", None, "light", "unknown", "medium"], LABELS)
    assert list(table.index) == [*LABELS, "unknown"]
    assert list(table.columns) == ["count"]
    assert table["count"].tolist() == [2, 1, 0, 2]


def test_count_table_custom_unknown_name():
    table = m.count_table(["light", None, "?"], ["light", "dark"], unknown="?")
    assert table["count"].to_dict() == {"light": 1, "dark": 0, "?": 2}


def test_count_table_by_columns_sorted_numerically_with_all():
    predicted = ["light", "dark", None, "light", "dark", "light"]
    by = [10, 2, 2, 1, 10, 10]
    table = m.count_table(predicted, LABELS, by=by)
    assert list(table.columns) == ["1", "2", "10", "all"]
    assert table.loc["light"].tolist() == [1, 0, 2, 3]
    assert table.loc["medium"].tolist() == [0, 0, 0, 0]
    assert table.loc["dark"].tolist() == [0, 1, 1, 2]
    assert table.loc["unknown"].tolist() == [0, 1, 0, 1]


def test_count_table_matches_crosstab_on_random_data():
    rng = np.random.default_rng(1)
    labels = ["a", "b", "c", "never"]
    predicted = rng.choice(["a", "b", "c", None], size=500, p=[0.5, 0.3, 0.1, 0.1]).tolist()
    by = rng.integers(0, 12, size=500)

    plain = m.count_table(predicted, labels)
    filled = pd.Series(["unknown" if v is None else v for v in predicted])
    expected = filled.value_counts().reindex([*labels, "unknown"], fill_value=0)
    assert plain["count"].tolist() == expected.tolist()

    table = m.count_table(predicted, labels, by=by)
    cross = pd.crosstab(filled, pd.Series(by)).reindex([*labels, "unknown"], fill_value=0)
    cross = cross.reindex(columns=sorted(set(by.tolist())), fill_value=0)
    assert table.drop(columns="all").to_numpy().tolist() == cross.to_numpy().tolist()
    assert table["all"].tolist() == expected.tolist()


def test_count_table_empty():
    table = m.count_table([], LABELS)
    assert table["count"].tolist() == [0, 0, 0, 0]


def test_count_table_rejects_stray_prediction_and_bad_by():
    with pytest.raises(DtkError, match="purple"):
        m.count_table(["light", "purple"], LABELS)
    with pytest.raises(DtkError, match="by"):
        m.count_table(["light", "dark"], LABELS, by=[1])
    with pytest.raises(DtkError, match="reserved"):
        m.count_table(["light"], ["light", "unknown"])


# --------------------------------------------------------------------------------------------
# Wilson interval


@pytest.mark.parametrize(("k", "n"), [(81, 263), (1, 10), (37, 50), (5, 400), (0, 20), (20, 20)])
def test_wilson_matches_closed_form(k, n):
    low, high = m.wilson_interval(k, n)
    ref_low, ref_high = wilson_reference(k, n)
    assert low == pytest.approx(ref_low, abs=1e-12)
    assert high == pytest.approx(ref_high, abs=1e-12)


def test_wilson_textbook_example_and_edges():
    low, high = m.wilson_interval(81, 263)
    assert (round(low, 4), round(high, 4)) == (0.2553, 0.3662)
    assert m.wilson_interval(0, 20)[0] == 0.0
    assert m.wilson_interval(20, 20)[1] == 1.0
    assert m.wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(DtkError, match="whole samples"):
        m.wilson_interval(1.5, 10)


def test_wilson_vectorized_and_confidence():
    k = np.array([0, 81, 20, 0])
    n = np.array([20, 263, 20, 0])
    low, high = m.wilson_interval(k, n, confidence=0.9)
    for i in range(3):
        assert (low[i], high[i]) == pytest.approx(wilson_reference(k[i], n[i], 0.9), abs=1e-12)
    assert (low[3], high[3]) == (0.0, 1.0)
    assert m.wilson_interval(81, 263, 0.99)[0] < m.wilson_interval(81, 263, 0.9)[0]


def test_wilson_coverage():
    rng = np.random.default_rng(0)
    draws = rng.binomial(400, 0.05, size=2000)
    low, high = m.wilson_interval(draws, 400)
    coverage = np.mean((low <= 0.05) & (high >= 0.05))
    assert 0.93 <= coverage <= 0.97


# --------------------------------------------------------------------------------------------
# Distribution metrics


P = np.array([0.6, 0.3, 0.1])
T = np.array([0.4, 0.4, 0.2])


def test_metrics_against_references():
    assert m.fairness_discrepancy(P, T) == pytest.approx(np.linalg.norm(P - T))
    assert m.kl_divergence(P, T) == pytest.approx(entropy(P, T))
    assert m.total_variation(P, T) == pytest.approx(0.2)
    assert m.mean_absolute_deviation(P, T) == pytest.approx(np.linalg.norm(P - T, 1) / 3)


def test_metrics_zero_for_equal_shares():
    for name in m.METRICS:
        assert getattr(m, name)(T, T) == 0.0


def test_kl_edge_cases():
    assert m.kl_divergence([0.5, 0.5, 0.0], [0.5, 0.25, 0.25]) == pytest.approx(
        entropy([0.5, 0.5, 0.0], [0.5, 0.25, 0.25])
    )
    assert m.kl_divergence([0.5, 0.5], [1.0, 0.0]) == math.inf
    assert m.kl_divergence([1.0, 0.0], [1.0, 0.0]) == 0.0


def test_metrics_vectorized_over_replicates():
    stack = np.stack([P, T, P[::-1]])
    for name in m.METRICS:
        values = getattr(m, name)(stack, T)
        assert values.shape == (3,)
        assert values[1] == 0.0
        assert values[0] == pytest.approx(getattr(m, name)(P, T))


def test_bias_amplification():
    ref = np.array([0.5, 0.35, 0.15])
    per_label, aggregate = m.bias_amplification(P, ref, T)
    np.testing.assert_allclose(per_label, [0.1, 0.05, 0.05])
    assert aggregate == pytest.approx(
        m.mean_absolute_deviation(P, T) - m.mean_absolute_deviation(ref, T)
    )
    assert m.bias_amplification(ref, P, T)[1] == pytest.approx(-aggregate)


# --------------------------------------------------------------------------------------------
# Bootstrap


def test_bootstrap_contains_estimate_and_is_deterministic():
    counts = np.array([60, 30, 10])
    intervals = m.bootstrap_intervals(counts, T, n_boot=1000, seed=3)
    assert set(intervals) == set(m.METRICS)
    for name, (low, high) in intervals.items():
        assert low <= getattr(m, name)(P, T) <= high, name
    assert m.bootstrap_intervals(counts, T, n_boot=1000, seed=3) == intervals
    assert m.bootstrap_intervals(counts, T, n_boot=1000, seed=4) != intervals


def test_bootstrap_is_scipys_bca_on_the_predictions():
    """The interval is scipy.stats.bootstrap's BCa over the predictions as label indices."""
    from scipy.stats import bootstrap

    counts = np.array([60, 30, 10])
    data = np.repeat(np.arange(3), counts)

    def tv(sample, axis=-1):
        shares = np.stack([(sample == j).mean(axis=axis) for j in range(3)], axis=-1)
        return 0.5 * np.abs(shares - T).sum(axis=-1)

    theirs = bootstrap((data,), tv, n_resamples=500, method="BCa", vectorized=True,
                       rng=np.random.default_rng(9)).confidence_interval  # fmt: skip
    ours = m.bootstrap_intervals(counts, T, n_boot=500, seed=9)["total_variation"]
    assert ours == pytest.approx((theirs.low, theirs.high), abs=1e-12)


def test_a_metric_at_zero_keeps_the_point_in_its_interval():
    """Shares exactly on the target: every replicate is at or above 0, so a percentile
    interval would sit above the point; the interval holds it and says how far it may be."""
    intervals = m.bootstrap_intervals([50, 50], [0.5, 0.5], n_boot=500)
    for name in m.METRICS:
        low, high = intervals[name]
        assert low == 0.0 < high < 0.3, name
    # a single prediction, or one label throughout, resamples to itself
    assert m.bootstrap_intervals([1, 0], [0.5, 0.5])["total_variation"] == (0.5, 0.5)
    assert m.bootstrap_intervals([40, 0], [0.5, 0.5])["total_variation"] == (0.5, 0.5)


def test_bootstrap_shrinks_with_more_samples():
    small = m.bootstrap_intervals([60, 30, 10], T, n_boot=1000)
    large = m.bootstrap_intervals([600, 300, 100], T, n_boot=1000)
    for name in m.METRICS:
        assert large[name][1] - large[name][0] < 0.6 * (small[name][1] - small[name][0]), name


def test_bootstrap_bias_amplification_and_edge_cases():
    intervals = m.bootstrap_intervals(
        [60, 30, 10], T, n_boot=1000, reference_counts=[400, 400, 200]
    )
    _, value = m.bias_amplification(P, [0.4, 0.4, 0.2], T)
    low, high = intervals["bias_amplification"]
    assert low <= value <= high
    assert low > 0  # 100 images 0.13 from the target against a reference on it
    # A zero target share makes some KL replicates infinite; the interval must not be nan.
    kl = m.bootstrap_intervals([90, 10], [1.0, 0.0], n_boot=200)["kl_divergence"]
    assert kl == (math.inf, math.inf)
    assert all(math.isnan(v) for v in m.bootstrap_intervals([0, 0], [0.5, 0.5])["total_variation"])


# --------------------------------------------------------------------------------------------
# Black-box shift estimation

C_TRUE = np.array([[0.85, 0.10, 0.05], [0.10, 0.75, 0.15], [0.05, 0.15, 0.80]])
Q_TRUE = np.array([0.2, 0.5, 0.3])


def test_confusion_matrix_from_calibration():
    true = ["a", "a", "a", "b", "b", "c"]
    predicted = ["a", "b", None, "b", "b", "a"]
    confusion = m.confusion_matrix(true, predicted, ["a", "b", "c"])
    np.testing.assert_allclose(confusion, [[0.5, 0, 1], [0.5, 1, 0], [0, 0, 0]])
    with pytest.raises(DtkError, match=r"\['c'\]"):
        m.confusion_matrix(["a", "b", "c"], ["a", "b", "unknown"], ["a", "b", "c"])
    with pytest.raises(DtkError, match="z"):
        m.confusion_matrix(["a", "z"], ["a", "a"], ["a", "b"])


def test_corrected_shares_recovers_exact_shift():
    mu = C_TRUE @ Q_TRUE
    np.testing.assert_allclose(m.corrected_shares(1000 * mu, C_TRUE), Q_TRUE, atol=1e-12)


def test_corrected_shares_from_sampled_calibration():
    rng = np.random.default_rng(7)
    k = len(Q_TRUE)

    def classify(true: np.ndarray) -> np.ndarray:
        # Each image's prediction is drawn from its true label's confusion column.
        return np.array([rng.choice(k, p=C_TRUE[:, j]) for j in true])

    calibration_true = np.repeat(np.arange(k), 2000)
    confusion = m.confusion_matrix(
        calibration_true.astype(str), classify(calibration_true).astype(str), ["0", "1", "2"]
    )
    audit_true = rng.choice(k, p=Q_TRUE, size=5000)
    counts = np.bincount(classify(audit_true), minlength=k)
    naive = counts / counts.sum()
    corrected = m.corrected_shares(counts, confusion)
    assert np.abs(corrected - Q_TRUE).max() < 0.03
    assert np.abs(corrected - Q_TRUE).max() < np.abs(naive - Q_TRUE).max()


def test_corrected_shares_projects_negative_solution():
    confusion = np.array([[0.8, 0.3], [0.2, 0.7]])
    mu = np.array([0.85, 0.15])
    assert np.linalg.solve(confusion, mu)[1] < 0
    np.testing.assert_allclose(m.corrected_shares(mu, confusion), [1.0, 0.0], atol=1e-12)


def test_corrected_shares_singular_confusion():
    # Labels b and c are indistinguishable: any split between them explains mu.
    confusion = np.array([[0.9, 0.1, 0.1], [0.1, 0.9, 0.9], [0.0, 0.0, 0.0]])
    q = m.corrected_shares([30, 70, 0], confusion)
    assert q.min() >= 0 and q.sum() == pytest.approx(1)
    np.testing.assert_allclose(confusion @ q, [0.3, 0.7, 0.0], atol=1e-9)
    assert np.isnan(m.corrected_shares([0, 0, 0], confusion)).all()


@pytest.mark.parametrize(
    "v", [[0.5, 0.4, 0.3], [1.2, -0.3, 0.1], [-0.2, -0.1, 0.05], [0.2, 0.3, 0.5], [2, 2, -5]]
)
def test_projection_is_the_closest_simplex_point(v):
    v = np.asarray(v, dtype=float)
    q = m.project_to_simplex(v)
    assert q.min() >= 0 and q.sum() == pytest.approx(1)
    step = 0.005
    grid = np.array(
        [
            (i * step, j * step, 1 - (i + j) * step)
            for i, j in itertools.product(range(201), repeat=2)
            if i + j <= 200
        ]
    )
    distances = np.linalg.norm(grid - v, axis=1)
    assert np.linalg.norm(q - v) <= distances.min() + 1e-12
    assert np.abs(grid[distances.argmin()] - q).max() <= step


# --------------------------------------------------------------------------------------------
# summarize


def test_summary_is_json_and_consistent():
    predicted = ["light"] * 50 + ["medium"] * 30 + ["dark"] * 20 + [None] * 10
    counts = m.count_table(predicted, LABELS)["count"]
    target = {"light": 0.4, "medium": 0.4, "dark": 0.2}
    summary = m.summarize(
        counts,
        target,
        reference_counts=pd.Series({"light": 40, "medium": 40, "dark": 20, "unknown": 3}),
        confusion=C_TRUE,
        n_boot=500,
    )
    data = summary.to_json()
    assert json.loads(json.dumps(data, allow_nan=False)) == data
    assert summary.labels == LABELS
    assert summary.total == 110
    assert (summary.unknown, summary.unknown_share) == (10, 10 / 110)
    assert data["unknown"] == {"count": 10, "share": 10 / 110}
    groups = summary.groups
    assert sum(g.share for g in groups.values()) == pytest.approx(1)
    assert groups["light"].share == 0.5
    assert (groups["light"].ci_low, groups["light"].ci_high) == m.wilson_interval(50, 100)
    assert groups["dark"].target == 0.2
    assert data["groups"]["dark"] == {"count": 20, "share": 0.2, "ci_low": groups["dark"].ci_low,
                                      "ci_high": groups["dark"].ci_high, "target": 0.2}  # fmt: skip
    shares = np.array([0.5, 0.3, 0.2])
    t = np.array([0.4, 0.4, 0.2])
    for name in m.METRICS:
        assert summary.metrics[name].value == pytest.approx(getattr(m, name)(shares, t))
    assert summary.metrics["bias_amplification"].value == pytest.approx(
        m.mean_absolute_deviation(shares, t)
    )
    assert summary.reference == {"light": 0.4, "medium": 0.4, "dark": 0.2}
    corrected = np.array([summary.corrected.shares[label] for label in LABELS])
    np.testing.assert_allclose(corrected, m.corrected_shares([50, 30, 20], C_TRUE))
    assert summary.corrected.metrics["total_variation"] == pytest.approx(
        m.total_variation(corrected, t)
    )
    assert data["corrected"]["groups"]["dark"] == {"share": summary.corrected.shares["dark"]}


def test_summary_optional_sections_absent():
    counts = pd.Series({"light": 5, "dark": 5, "unknown": 0})
    summary = m.summarize(counts, {"light": 0.5, "dark": 0.5}, n_boot=100)
    assert summary.reference is None and summary.corrected is None
    assert set(summary.to_json()) == {"labels", "total", "unknown", "groups", "metrics"}
    assert "bias_amplification" not in summary.metrics


def test_summary_planted_truth():
    rng = np.random.default_rng(11)
    predicted = rng.choice(["dark", "light"], size=1000, p=[0.05, 0.95]).tolist()
    counts = m.count_table(predicted, ["light", "dark"])["count"]
    summary = m.summarize(counts, {"light": 0.5, "dark": 0.5}, n_boot=500)
    dark = summary.groups["dark"]
    assert dark.ci_low <= 0.05 <= dark.ci_high
    assert abs(dark.share - 0.05) < 0.03
    tv = summary.metrics["total_variation"]
    assert tv.ci_low <= 0.45 <= tv.ci_high


def test_summary_undefined_values_are_none():
    all_unknown = pd.Series({"light": 0, "dark": 0, "unknown": 4})
    summary = m.summarize(all_unknown, {"light": 0.5, "dark": 0.5}, confusion=np.eye(2))
    json.dumps(summary.to_json(), allow_nan=False)
    assert summary.groups["light"].share is None
    assert (summary.groups["light"].ci_low, summary.groups["light"].ci_high) == (0, 1)
    assert summary.to_json()["metrics"]["kl_divergence"] == {"value": None, "ci_low": None,
                                                             "ci_high": None}  # fmt: skip
    assert summary.corrected.shares["dark"] is None

    infinite = m.summarize(pd.Series({"light": 3, "dark": 1}), {"light": 1.0, "dark": 0.0})
    json.dumps(infinite.to_json(), allow_nan=False)
    assert infinite.metrics["kl_divergence"].value is None
    assert infinite.to_json()["unknown"] == {"count": 0, "share": 0.0}


def test_summary_rejects_mismatched_target():
    counts = pd.Series({"light": 5, "dark": 5, "unknown": 0})
    with pytest.raises(DtkError, match="target"):
        m.summarize(counts, {"light": 1.0})
    with pytest.raises(DtkError, match="sum to 1"):
        m.summarize(counts, {"light": 0.6, "dark": 0.6})
    with pytest.raises(DtkError, match="reference_counts"):
        m.summarize(counts, {"light": 0.5, "dark": 0.5}, reference_counts={"light": 3})
