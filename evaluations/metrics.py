"""Statistics of a bias audit: prediction counts, share intervals and distribution metrics.

An audit classifies generated images for one attribute and compares the distribution of the
confident predictions (its *shares*) with a target distribution. Shares are always taken over
known predictions; low-confidence predictions are counted in a separate ``unknown`` bucket.
Share arrays are indexed by label along their last axis, so every metric also evaluates a
whole stack of bootstrap replicates at once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import fairlearn.metrics
import numpy as np
import pandas as pd
from scipy.stats import binomtest

from evaluations.results import Corrected, GroupShare, MetricValue, ShareSummary
from toolkit import DtkError, natural_key

__all__ = [
    "bca_interval",
    "bias_amplification",
    "bootstrap_intervals",
    "confusion_matrix",
    "corrected_shares",
    "count_table",
    "fairness_discrepancy",
    "kl_divergence",
    "known_or_unknown",
    "mean_absolute_deviation",
    "project_to_simplex",
    "summarize",
    "total_variation",
    "wilson_interval",
]

METRICS = ("fairness_discrepancy", "kl_divergence", "total_variation", "mean_absolute_deviation")


# --------------------------------------------------------------------------------------------
# Counting


def _check_labels(labels: Sequence[str], unknown: str) -> list[str]:
    labels = list(labels)
    if len(set(labels)) != len(labels):
        raise DtkError(f"duplicate labels in {labels}")
    if unknown in labels:
        raise DtkError(f"{unknown!r} is reserved for low-confidence predictions, not a label")
    return labels


def known_or_unknown(predicted: Sequence[Any], labels: list[str], unknown: str = "unknown"
                     ) -> np.ndarray:  # fmt: skip
    """`predicted` with every missing value (None, NaN) as `unknown`; a value that is
    neither a label nor `unknown` is refused."""
    _check_labels(labels, unknown)
    values = np.array([unknown if _missing(v) else v for v in predicted], dtype=object)
    allowed = {*labels, unknown}
    stray = sorted({str(v) for v in values if v not in allowed})
    if stray:
        raise DtkError(f"predictions {stray} are not among the labels {labels}")
    return values


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def count_table(
    predicted: Sequence[str | None],
    labels: Sequence[str],
    *,
    by: Sequence[Any] | None = None,
    unknown: str = "unknown",
) -> pd.DataFrame:
    """Count predictions per label, optionally broken down by a second per-image variable.

    ``predicted`` holds a label or ``None``/``unknown`` (low confidence) per image. The result
    has one row per label in ``labels`` order, zero counts included, then the ``unknown`` row.
    Without ``by`` it has the single column ``count``; with ``by`` one column per distinct
    value (as a string, numbers in numeric order) followed by ``all``.
    """
    labels = _check_labels(labels, unknown)
    values = known_or_unknown(predicted, labels, unknown)
    rows = pd.Index([*labels, unknown], name="label")
    if by is not None:
        by = np.array([str(b) for b in by], dtype=object)
        if len(by) != len(values):
            raise DtkError(f"`by` has {len(by)} values for {len(values)} predictions")
    if len(values) == 0:
        # MetricFrame cannot group an empty sample.
        columns = ["all"] if by is not None else ["count"]
        return pd.DataFrame(0, index=rows, columns=columns)

    # The metric ignores y_true/y_pred: only the group sizes matter.
    dummy = np.zeros(len(values))
    frame = fairlearn.metrics.MetricFrame(
        metrics={"count": fairlearn.metrics.count},
        y_true=dummy,
        y_pred=dummy,
        sensitive_features=pd.Series(values, name="label"),
        control_features=None if by is None else pd.Series(by, name="by"),
    )
    return _count_columns(frame.by_group["count"], rows, by)


def _count_columns(counts: pd.Series, rows: pd.Index, by: np.ndarray | None) -> pd.DataFrame:
    """MetricFrame's group sizes as `count_table`'s table: every label, zeros included."""
    if by is None:
        table = counts.reindex(rows).fillna(0).astype(int).to_frame("count")
    else:
        columns = sorted(set(by), key=natural_key)
        table = counts.unstack(level="by").reindex(index=rows, columns=columns)
        table = table.fillna(0).astype(int)
        table["all"] = table.sum(axis=1)
    table.index.name = "label"
    table.columns.name = None
    return table


# --------------------------------------------------------------------------------------------
# Share intervals and distribution metrics


def wilson_interval(count: Any, total: Any, confidence: float = 0.95) -> tuple[Any, Any]:
    """Wilson score interval for the proportion ``count / total`` (whole numbers), scipy's
    ``binomtest(count, total).proportion_ci(confidence, method="wilson")``; elementwise over
    arrays.

    A zero total carries no information and gets the whole range ``(0, 1)``; at ``0/n`` and
    ``n/n`` the bound on that side is exactly 0 or 1.
    """
    count, total = np.broadcast_arrays(np.asarray(count), np.asarray(total))
    low, high = np.zeros(count.shape), np.ones(count.shape)
    for index in np.ndindex(count.shape):
        k, n = _whole(count[index]), _whole(total[index])
        if n <= 0:
            continue
        interval = binomtest(k, n).proportion_ci(confidence, method="wilson")
        low[index] = 0.0 if k <= 0 else interval.low
        high[index] = 1.0 if k >= n else interval.high
    if low.ndim == 0:
        return float(low), float(high)
    return low, high


def _whole(value: Any) -> int:
    if value != round(value):
        raise DtkError(f"a Wilson interval counts whole samples, not {value}")
    return int(value)


def _pair(p: Any, t: Any) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(p, dtype=float)
    t = np.asarray(t, dtype=float)
    if p.shape[-1:] != t.shape[-1:]:
        raise ValueError(f"shares over {p.shape[-1:]} labels against a target over {t.shape[-1:]}")
    return p, t


def fairness_discrepancy(p: Any, t: Any) -> Any:
    """Euclidean distance ‖p − t‖₂ between shares and target (Choi et al. 2020)."""
    p, t = _pair(p, t)
    return np.linalg.norm(p - t, axis=-1)


def kl_divergence(p: Any, t: Any) -> Any:
    """KL(p ‖ t) = Σ p log(p / t) in nats, 0 log 0 = 0; infinite where t = 0 < p."""
    p, t = _pair(p, t)
    with np.errstate(divide="ignore", invalid="ignore"):
        # Testing p == 0 rather than p > 0 lets nan shares propagate instead of counting as 0.
        terms = np.where(p == 0, 0.0, p * np.log(p / t))
    return terms.sum(axis=-1)


def total_variation(p: Any, t: Any) -> Any:
    """Total variation distance ½ Σ |p − t|."""
    p, t = _pair(p, t)
    return 0.5 * np.abs(p - t).sum(axis=-1)


def mean_absolute_deviation(p: Any, t: Any) -> Any:
    """Mean over labels of |p − t| (the DALL-Eval / HEIM bias measure)."""
    p, t = _pair(p, t)
    return np.abs(p - t).mean(axis=-1)


def bias_amplification(p_gen: Any, p_ref: Any, t: Any) -> tuple[Any, Any]:
    """Return ``(per_label, aggregate)``: |p_gen − t| − |p_ref − t| and its mean over labels.

    The aggregate equals MAD(p_gen, t) − MAD(p_ref, t); positive means the generator's shares
    lie further from the target than the reference (training-data) shares.
    """
    p_gen, t = _pair(p_gen, t)
    p_ref, _ = _pair(p_ref, t)
    per_label = np.abs(p_gen - t) - np.abs(p_ref - t)
    return per_label, per_label.mean(axis=-1)


def _all_metrics(p: np.ndarray, t: np.ndarray, p_ref: np.ndarray | None) -> dict[str, Any]:
    values = {
        "fairness_discrepancy": fairness_discrepancy(p, t),
        "kl_divergence": kl_divergence(p, t),
        "total_variation": total_variation(p, t),
        "mean_absolute_deviation": mean_absolute_deviation(p, t),
    }
    if p_ref is not None:
        values["bias_amplification"] = bias_amplification(p, p_ref, t)[1]
    return values


def bootstrap_intervals(
    counts: Any,
    target: Any,
    *,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    reference_counts: Any | None = None,
) -> dict[str, tuple[float, float]]:
    """BCa intervals of every aggregate metric, ``scipy.stats.bootstrap`` resampling the
    predictions (a multinomial bootstrap of ``counts``, the known predictions per label).

    For ``bias_amplification`` the ``reference_counts`` are a second sample, resampled
    independently with their own total. The result is the same for the same ``seed``. The
    metrics are non-negative and their plug-in estimates biased upwards near 0, where a
    percentile interval can sit entirely above the point value; BCa's bias correction keeps
    the point inside. Where the bootstrap distribution is degenerate (every prediction one
    label, a single prediction; a metric infinite in every replicate, as KL with a zero
    target share) the interval is the point itself; an empty count vector gives
    ``(nan, nan)``. Where no replicate falls below the point (a metric of 0: the target met
    exactly), or BCa's interval would not hold the point, the percentile interval widened
    to hold the point is given.
    """
    counts = np.asarray(counts, dtype=float)
    target = np.asarray(target, dtype=float)
    names = [*METRICS, *(["bias_amplification"] if reference_counts is not None else [])]
    ref = None if reference_counts is None else np.asarray(reference_counts, dtype=float)
    if counts.sum() <= 0 or (ref is not None and ref.sum() <= 0):
        return {name: (math.nan, math.nan) for name in names}
    samples = [_predictions(counts)] + ([] if ref is None else [_predictions(ref)])
    labels = len(counts)
    point = _all_metrics(counts / counts.sum(), target,
                         None if ref is None else ref / ref.sum())  # fmt: skip
    intervals = {}
    for name in names:

        def statistic(*resampled: np.ndarray, axis: int = -1, name: str = name) -> np.ndarray:
            shares = [_shares(sample, labels, axis) for sample in resampled]
            return _all_metrics(shares[0], target, shares[1] if len(shares) > 1 else None)[name]

        intervals[name] = bca_interval(statistic, samples, float(point[name]), n_boot, confidence,
                               seed)  # fmt: skip
    return intervals


def _predictions(counts: np.ndarray) -> np.ndarray:
    """The known predictions as label indices, one per prediction."""
    return np.repeat(np.arange(len(counts)), counts.astype(int))


def _shares(sample: np.ndarray, labels: int, axis: int) -> np.ndarray:
    """Each label's share in `sample` along `axis`, labels on the last axis."""
    return np.stack([(sample == j).mean(axis=axis) for j in range(labels)], axis=-1)


def bca_interval(statistic: Any, samples: list[np.ndarray], point: float, n_boot: int,
         confidence: float, seed: int) -> tuple[float, float]:  # fmt: skip
    """`statistic`'s BCa interval over `samples`; the point itself where the bootstrap
    distribution is degenerate (no interval can be computed), (inf, inf) where it is
    infinite throughout."""
    import warnings

    from scipy.stats import DegenerateDataWarning, bootstrap

    if math.isinf(point) or min(len(sample) for sample in samples) < 2:
        return point, point  # one prediction resamples to itself
    with warnings.catch_warnings():
        # degenerate distributions: handled below
        warnings.simplefilter("ignore", DegenerateDataWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        result = bootstrap(samples, statistic, n_resamples=n_boot, confidence_level=confidence,
                           method="BCa", rng=np.random.default_rng(seed), vectorized=True,
                           batch=max(1, 2**22 // max(len(s) for s in samples)))  # fmt: skip
    low, high = result.confidence_interval
    replicates = result.bootstrap_distribution
    if np.ptp(replicates) == 0:  # every replicate the same: no interval to draw
        return point, point
    if math.isfinite(low) and math.isfinite(high) and low <= point <= high and high > low:
        return float(low), float(high)
    # BCa cannot correct a point at the edge of every replicate (a metric of 0 where the
    # target is met exactly: no replicate falls below it), and where the replicates pile up
    # against a bound (a mean skew near 0, and a change of it) its correction can carry the
    # interval past the point; the percentile interval, widened to hold the point, says how
    # far the figure may be
    alpha = (1 - confidence) / 2
    low, high = np.quantile(replicates, [alpha, 1 - alpha], method="inverted_cdf")
    return float(min(low, point)), float(max(high, point))


# --------------------------------------------------------------------------------------------
# Classifier-error correction (black-box shift estimation, Lipton et al. 2018)


def confusion_matrix(
    true: Sequence[str],
    predicted: Sequence[str | None],
    labels: Sequence[str],
    *,
    unknown: str = "unknown",
) -> np.ndarray:
    """Estimate ``C[i, j] = P(pred = labels[i] | true = labels[j])`` from calibration images.

    Low-confidence (``None``/``unknown``) calibration predictions are dropped, matching the
    audit shares, which are taken over known predictions only; each column sums to 1.
    """
    labels = _check_labels(labels, unknown)
    true = list(true)
    predicted = known_or_unknown(predicted, labels, unknown)
    if len(true) != len(predicted):
        raise DtkError(f"{len(true)} true labels for {len(predicted)} calibration predictions")
    stray = sorted({str(v) for v in true if v not in labels})
    if stray:
        raise DtkError(f"calibration labels {stray} are not among the labels {labels}")

    index = {label: i for i, label in enumerate(labels)}
    tallies = np.zeros((len(labels), len(labels)))
    for t, p in zip(true, predicted):
        if p != unknown:
            tallies[index[p], index[t]] += 1
    column_totals = tallies.sum(axis=0)
    uncovered = [label for label, n in zip(labels, column_totals) if n == 0]
    if uncovered:
        raise DtkError(
            f"no confidently classified calibration images of true label(s) {uncovered}: "
            "the confusion matrix cannot be estimated"
        )
    return tallies / column_totals


def project_to_simplex(v: Any) -> np.ndarray:
    """Euclidean projection of a vector onto the probability simplex {q ≥ 0, Σ q = 1}.

    Sort-based algorithm (Duchi et al. 2008; Wang & Carreira-Perpiñán 2013).
    """
    v = np.asarray(v, dtype=float)
    u = np.sort(v)[::-1]
    cumulative = np.cumsum(u) - 1
    ranks = np.arange(1, len(v) + 1)
    # The largest rank whose component stays positive after the shift fixes the threshold.
    rho = ranks[u - cumulative / ranks > 0][-1]
    theta = cumulative[rho - 1] / rho
    return np.maximum(v - theta, 0.0)


def corrected_shares(predicted_counts: Any, confusion: Any) -> np.ndarray:
    """True label shares q solving ``C q = mu``, projected onto the probability simplex.

    ``predicted_counts`` are the known predictions per label, in the confusion matrix's label
    order (unknown predictions excluded); ``mu`` is their normalisation. Least squares keeps a
    singular or ill-conditioned C solvable. No known predictions give all-nan shares.
    """
    counts = np.asarray(predicted_counts, dtype=float)
    confusion = np.asarray(confusion, dtype=float)
    if confusion.shape != (len(counts), len(counts)):
        raise DtkError(
            f"a {confusion.shape} confusion matrix does not fit counts over {len(counts)} labels"
        )
    if counts.sum() <= 0:
        return np.full(len(counts), np.nan)
    mu = counts / counts.sum()
    q, *_ = np.linalg.lstsq(confusion, mu, rcond=None)
    # Sampling noise in C and mu can push the solution off the simplex (negative shares).
    return project_to_simplex(q)


# --------------------------------------------------------------------------------------------
# Summary


def _finite(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _label_counts(counts: Any, labels: list[str], what: str, unknown: str) -> np.ndarray:
    series = pd.Series(counts, dtype=float) if isinstance(counts, Mapping) else counts
    if not isinstance(series, pd.Series):
        raise DtkError(f"{what} must be a pandas Series or mapping indexed by label")
    series = series.drop(unknown, errors="ignore")
    if set(series.index) != set(labels):
        raise DtkError(f"{what} has labels {sorted(map(str, series.index))}, expected {labels}")
    values = series.reindex(labels).to_numpy(dtype=float)
    if (values < 0).any() or not np.isfinite(values).all():
        raise DtkError(f"{what} must be non-negative finite counts")
    return values


def _target_shares(target: Mapping[str, float], labels: list[str]) -> np.ndarray:
    if set(target) != set(labels):
        raise DtkError(f"target has labels {sorted(target)}, expected {labels}")
    shares = np.array([float(target[label]) for label in labels])
    if (shares < 0).any() or not math.isclose(shares.sum(), 1.0, abs_tol=1e-6):
        raise DtkError(f"target shares must be non-negative and sum to 1, got {dict(target)}")
    return shares


def summarize(
    counts: pd.Series,
    target: Mapping[str, float],
    *,
    reference_counts: pd.Series | Mapping[str, float] | None = None,
    confusion: Any | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
    unknown: str = "unknown",
) -> ShareSummary:
    """The figures of one attribute's audit.

    ``counts`` is indexed by label plus ``unknown`` (e.g. a column of `count_table`); its
    order fixes the label order. ``target`` maps every label to its target share.
    ``reference_counts`` (training-data counts per label) adds bias amplification and the
    reference shares; ``confusion`` (`confusion_matrix` in label order) adds BBSE-corrected
    shares and metrics. Undefined or infinite values (no known predictions, an infinite KL
    divergence) are ``None``.
    """
    if not isinstance(counts, pd.Series):
        raise DtkError("counts must be a pandas Series indexed by label and unknown")
    labels = [label for label in counts.index if label != unknown]
    known = _label_counts(counts, labels, "counts", unknown)
    t = _target_shares(target, labels)
    ref = _reference(reference_counts, labels, unknown)
    shares = known / known.sum() if known.sum() else np.full(len(labels), np.nan)
    ref_shares = None if ref is None else ref / ref.sum()
    n_unknown = int(counts.get(unknown, 0))
    return ShareSummary(
        labels=[str(label) for label in labels],
        total=int(known.sum()) + n_unknown,
        unknown=n_unknown,
        groups=_group_shares(labels, known, shares, t, confidence),
        metrics=_metric_values(known, shares, t, ref, n_boot=n_boot, seed=seed,
                               confidence=confidence),
        reference=None if ref is None else dict(zip(map(str, labels), map(float, ref_shares))),
        corrected=None if confusion is None else _corrected(labels, known, confusion, t,
                                                            ref_shares),
    )  # fmt: skip


def _reference(
    reference_counts: pd.Series | Mapping[str, float] | None, labels: list[str], unknown: str
) -> np.ndarray | None:
    if reference_counts is None:
        return None
    ref = _label_counts(reference_counts, labels, "reference_counts", unknown)
    if ref.sum() <= 0:
        raise DtkError("reference_counts hold no known prediction")
    return ref


def _group_shares(
    labels: list[str], known: np.ndarray, shares: np.ndarray, t: np.ndarray, confidence: float
) -> dict[str, GroupShare]:
    low, high = wilson_interval(known, known.sum(), confidence)
    return {
        str(label): GroupShare(count=int(known[i]), share=_finite(shares[i]),
                               ci_low=float(low[i]), ci_high=float(high[i]), target=float(t[i]))
        for i, label in enumerate(labels)
    }  # fmt: skip


def _metric_values(
    known: np.ndarray, shares: np.ndarray, t: np.ndarray, ref: np.ndarray | None, **bootstrap: Any
) -> dict[str, MetricValue]:
    """Each metric at the observed shares, with its bootstrap interval."""
    values = _all_metrics(shares, t, None if ref is None else ref / ref.sum())
    intervals = bootstrap_intervals(known, t, reference_counts=ref, **bootstrap)
    return {
        name: MetricValue(_finite(value), _finite(intervals[name][0]), _finite(intervals[name][1]))
        for name, value in values.items()
    }


def _corrected(
    labels: list[str], known: np.ndarray, confusion: Any, t: np.ndarray, ref_shares: Any
) -> Corrected:
    shares = corrected_shares(known, confusion)
    metrics = _all_metrics(shares, t, ref_shares)
    return Corrected(
        shares={str(label): _finite(share) for label, share in zip(labels, shares)},
        metrics={name: _finite(value) for name, value in metrics.items()},
    )


def shares_frame(summary: ShareSummary) -> pd.DataFrame:
    """One row per label: count, share, its 95% interval, the target (and the reference and
    corrected shares, when there are)."""
    rows = []
    for label, group in summary.groups.items():
        row = {"label": label, **dataclasses.asdict(group)}
        if summary.reference:
            row["reference_share"] = summary.reference.get(label)
        if summary.corrected is not None:
            row["corrected_share"] = summary.corrected.shares.get(label)
        rows.append(row)
    return pd.DataFrame(rows)
