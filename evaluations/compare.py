"""``dtk eval compare``: one audit against another (model A against model B, or a model
with and without a mitigation), prompt by prompt.

Both audits are `evaluations.bias` output folders (results.json and predictions.csv) of the
same attribute and labels. Their rows are compared where both have images: per prompt for
suite audits (or per value of a shared ``--by``), else the whole audit as one row. For each
row and attribute:

* the share of a focus value (by default the value least represented in A) in A and in B
  with Wilson intervals, and B - A with Newcombe's hybrid score interval (the Wilson
  intervals combined; Newcombe 1998, method 10);
* a test that A's and B's value distributions are the same: Fisher's exact test for two
  values, a chi-squared test of homogeneity for more; the p-values of all rows corrected
  for multiple testing (Holm by default, which controls the family-wise error; or
  Benjamini-Hochberg's false discovery rate, ``scipy.stats.false_discovery_control``);
* each row's skew (total variation from the target) in A and in B.

Over all rows: each audit's mean skew, and B - A with a BCa interval from resampling every
row's images in both audits independently, so "Fair Diffusion moves mean |p_female - 1/2|
from 0.311 to 0.105" comes with its uncertainty (docs/fairness.md). The audits are compared
as independent samples; audits run with the same seeds and prompts are paired, which only
makes these intervals and tests conservative.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import toolkit
from evaluations import metrics
from evaluations.audit_folder import Audit
from evaluations.common import jsonable, now, versions, write_csv, write_json
from evaluations.results import GroupShare, MetricValue
from evaluations.suites import interval, mean_skew, skew

if TYPE_CHECKING:
    import numpy as np
    import pandas

CORRECTIONS = ("holm", "fdr_bh")


@dataclasses.dataclass
class RowComparison:
    """One row (a prompt, a --by value, or all images) of one attribute, A against B."""

    row: str
    counts_a: dict[str, int]
    counts_b: dict[str, int]
    share_a: GroupShare  # the focus value's, in A
    share_b: GroupShare
    difference: MetricValue
    skew_a: float | None
    skew_b: float | None
    p_value: float | None
    p_corrected: float | None = None

    @property
    def changed(self) -> float:
        return abs(self.difference.value) if self.difference.value is not None else -1.0


@dataclasses.dataclass
class AttributeComparison:
    """Every row of one attribute, and the mean skews over the rows."""

    attribute: str
    labels: list[str]
    focus: str
    target: dict[str, float]
    rows: list[RowComparison]
    mean_skew_a: MetricValue
    mean_skew_b: MetricValue
    mean_skew_change: MetricValue
    correction: str
    alpha: float

    def significant(self) -> list[RowComparison]:
        return [r for r in self.rows if r.p_corrected is not None and r.p_corrected < self.alpha]

    def frame(self) -> pandas.DataFrame:
        import pandas

        return pandas.DataFrame([{
            "row": r.row, "n_a": sum(r.counts_a.values()), "n_b": sum(r.counts_b.values()),
            f"share_{self.focus}_a": r.share_a.share, f"share_{self.focus}_b": r.share_b.share,
            "difference": r.difference.value, "difference_ci_low": r.difference.ci_low,
            "difference_ci_high": r.difference.ci_high, "skew_a": r.skew_a, "skew_b": r.skew_b,
            "p_value": r.p_value, "p_corrected": r.p_corrected,
        } for r in self.rows])  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        return jsonable({
            "labels": self.labels, "focus": self.focus, "target": self.target,
            "correction": self.correction, "alpha": self.alpha,
            "mean_skew": {"a": dataclasses.asdict(self.mean_skew_a),
                          "b": dataclasses.asdict(self.mean_skew_b),
                          "change": dataclasses.asdict(self.mean_skew_change)},
            "significant": [r.row for r in self.significant()],
            "rows": [dataclasses.asdict(r) for r in self.rows],
        })  # fmt: skip


@dataclasses.dataclass
class ComparisonResult:
    created: str
    a: Audit
    b: Audit
    by: str | None
    attributes: dict[str, AttributeComparison]

    def to_json(self) -> dict[str, Any]:
        return jsonable({
            "command": "eval compare", "created": self.created,
            "a": {"name": self.a.name, "folder": str(self.a.folder),
                  "config": self.a.results["config"]},
            "b": {"name": self.b.name, "folder": str(self.b.folder),
                  "config": self.b.results["config"]},
            "by": self.by, "versions": versions(),
            "attributes": {a: c.to_json() for a, c in self.attributes.items()},
        })  # fmt: skip


def compare_audits(
    audit_a: str | pathlib.Path,
    audit_b: str | pathlib.Path,
    out: str | pathlib.Path,
    *,
    attributes: Sequence[str] = (),
    focus: str | None = None,
    names: tuple[str, str] = ("A", "B"),
    correction: str = "holm",
    alpha: float = 0.05,
    n_boot: int = 2000,
    seed: int = 0,
    counts_attribute: str = "value",
    report: bool = True,
) -> ComparisonResult:
    """Compare two audit folders (see the module docstring); write ``comparison.json``,
    ``comparison_<attribute>.csv`` and (with `report`) a side-by-side report to `out`.
    Either audit may be a CSV of published counts instead (`Audit.from_counts`), whose
    attribute is named `counts_attribute`."""
    if correction not in CORRECTIONS:
        raise toolkit.DtkError(f"--correction must be one of {', '.join(CORRECTIONS)}")
    toolkit.check_fraction("--alpha", alpha, open_low=True, open_high=True)
    if n_boot < 100:
        raise toolkit.DtkError("--bootstrap must be at least 100 resamples")
    out = pathlib.Path(out)
    toolkit.check_writable(out)
    a = Audit.read(audit_a, names[0], counts_attribute)
    b = Audit.read(audit_b, names[1], counts_attribute)
    by = _shared_by(a, b)
    chosen = list(attributes) or [
        x for x in a.results["attributes"] if x in b.results["attributes"]
    ]
    if not chosen:
        raise toolkit.DtkError("the two audits share no audited attribute")
    compared = {
        attribute: _compare_attribute(a, b, attribute, by, focus, correction, alpha, n_boot, seed)
        for attribute in chosen
    }
    result = ComparisonResult(now(), a, b, by, compared)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "comparison.json", result.to_json())
    for attribute, comparison in compared.items():
        write_csv(out / f"comparison_{toolkit.safe_name(attribute)}.csv", comparison.frame())
    if report:
        from evaluations.compare_report import write_compare_report

        write_compare_report(out, result)
    return result


def _shared_by(a: Audit, b: Audit) -> str | None:
    """The breakdown both audits share, or None; different breakdowns cannot be compared."""
    if a.by != b.by:
        raise toolkit.DtkError(f"the audits break their images down differently (--by "
                               f"{a.by or 'none'} and {b.by or 'none'}); compare audits made the "
                               "same way")  # fmt: skip
    return a.by


def _compare_attribute(a: Audit, b: Audit, attribute: str, by: str | None, focus: str | None,
                       correction: str, alpha: float, n_boot: int,
                       seed: int) -> AttributeComparison:  # fmt: skip
    import numpy as np

    info_a, info_b = a.attribute(attribute), b.attribute(attribute)
    labels = list(info_a["labels"])
    if list(info_b["labels"]) != labels:
        raise toolkit.DtkError(f"{attribute}: the audits' labels differ ({', '.join(labels)} and "
                               f"{', '.join(info_b['labels'])})")  # fmt: skip
    target = {label: float(g["target"]) for label, g in info_a["groups"].items()}
    focus = _focus(focus, labels, info_a)
    rows = [r for r in a.rows(by) if r in set(b.rows(by))]
    if not rows:
        raise toolkit.DtkError(f"the audits share no {by} value to compare")
    t = np.array([target[label] for label in labels])
    samples_a = [_indices(a.labels_in(attribute, by, r), labels) for r in rows]
    samples_b = [_indices(b.labels_in(attribute, by, r), labels) for r in rows]
    compared = [_compare_row(row, sa, sb, labels, focus, t)
                for row, sa, sb in zip(rows, samples_a, samples_b)]  # fmt: skip
    _correct([r for r in compared if r.p_value is not None], correction)
    skews = _mean_skews(samples_a, samples_b, t, n_boot, seed)
    return AttributeComparison(attribute, labels, focus, target, compared, *skews, correction,
                               alpha)  # fmt: skip


def _focus(focus: str | None, labels: list[str], info: Mapping[str, Any]) -> str:
    """The value whose share the table shows: the given one, or A's least represented."""
    if focus is not None:
        if focus not in labels:
            raise toolkit.DtkError(f"--label {focus!r} is not one of {', '.join(labels)}")
        return focus
    return min(labels, key=lambda k: info["groups"][k]["count"])


def _indices(predicted: Sequence[str], labels: list[str]) -> np.ndarray:
    """Known predictions as label indices (``unknown`` left out, as in every share)."""
    import numpy as np

    index = {label: j for j, label in enumerate(labels)}
    return np.array([index[p] for p in predicted if p in index], dtype=np.int64)


def _compare_row(row: str, sa: np.ndarray, sb: np.ndarray, labels: list[str], focus: str,
                 t: np.ndarray) -> RowComparison:  # fmt: skip
    import numpy as np

    j = labels.index(focus)
    counts_a = np.bincount(sa, minlength=len(labels))
    counts_b = np.bincount(sb, minlength=len(labels))
    share_a = focus_share(int(counts_a[j]), len(sa), float(t[j]))
    share_b = focus_share(int(counts_b[j]), len(sb), float(t[j]))
    return RowComparison(
        row, dict(zip(labels, counts_a.tolist())), dict(zip(labels, counts_b.tolist())),
        share_a, share_b, newcombe(share_a, share_b),
        skew(counts_a, t), skew(counts_b, t), homogeneity_p(counts_a, counts_b),
    )  # fmt: skip


def focus_share(count: int, total: int, target: float) -> GroupShare:
    """One value's share of `total` known predictions with its Wilson interval (None, and
    the whole range, without predictions), as any audit's shares."""
    low, high = metrics.wilson_interval(count, total)
    return GroupShare(count, count / total if total else None, low, high, target)


def newcombe(a: GroupShare, b: GroupShare) -> MetricValue:
    """``b - a`` with Newcombe's hybrid score interval from the two Wilson intervals."""
    if a.share is None or b.share is None:
        return MetricValue(None, None, None)
    d = b.share - a.share
    low = d - math.hypot(b.share - b.ci_low, a.ci_high - a.share)
    high = d + math.hypot(b.ci_high - b.share, a.share - a.ci_low)
    return MetricValue(d, low, high)


def homogeneity_p(counts_a: Any, counts_b: Any) -> float | None:
    """The p-value of "A and B draw their values from the same distribution": Fisher's exact
    test on a 2x2 table, a chi-squared test of homogeneity on a wider one; values neither
    audit saw are left out (1.0 when fewer than two remain: nothing can differ); None when
    either side has no image."""
    import numpy as np
    from scipy.stats import chi2_contingency, fisher_exact

    table = np.vstack([counts_a, counts_b])
    if table[0].sum() == 0 or table[1].sum() == 0:
        return None
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2:
        return 1.0
    if table.shape[1] == 2:
        return float(fisher_exact(table).pvalue)
    return float(chi2_contingency(table).pvalue)


def _correct(rows: list[RowComparison], correction: str) -> None:
    """Each row's p-value corrected over all rows (in place)."""
    import numpy as np

    if not rows:
        return
    p = np.array([r.p_value for r in rows], dtype=float)
    if correction == "fdr_bh":
        from scipy.stats import false_discovery_control

        corrected = false_discovery_control(p, method="bh")
    else:
        corrected = holm(p)
    for row, value in zip(rows, corrected):
        row.p_corrected = float(value)


def holm(p: Any) -> np.ndarray:
    """Holm's step-down adjusted p-values: the k-th smallest times (m - k + 1), made
    non-decreasing in that order and capped at 1."""
    import numpy as np

    p = np.asarray(p, dtype=float)
    order = np.argsort(p, kind="stable")
    m = len(p)
    stepped = np.maximum.accumulate((m - np.arange(m)) * p[order])
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(stepped, 1.0)
    return adjusted


def _mean_skews(
    samples_a: list[np.ndarray], samples_b: list[np.ndarray], target: np.ndarray, n_boot: int,
    seed: int
) -> tuple[MetricValue, MetricValue, MetricValue]:  # fmt: skip
    """Each audit's mean skew over the rows both have images of, and B - A, with BCa
    intervals over both audits' images resampled row by row."""
    both = [(sa, sb) for sa, sb in zip(samples_a, samples_b) if len(sa) and len(sb)]
    if not both:
        nothing = MetricValue(None, None, None)
        return nothing, nothing, nothing
    a, b = [sa for sa, _ in both], [sb for _, sb in both]
    k = len(a)

    def mean(*resampled: np.ndarray, axis: int = -1) -> np.ndarray:
        return mean_skew(resampled, target, axis)

    def change(*resampled: np.ndarray, axis: int = -1) -> np.ndarray:
        return mean(*resampled[k:], axis=axis) - mean(*resampled[:k], axis=axis)

    return (interval(mean, a, n_boot, seed), interval(mean, b, n_boot, seed),
            interval(change, a + b, n_boot, seed))  # fmt: skip
