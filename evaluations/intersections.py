"""Several attributes at once: the joint count table, each attribute's shares, and the
shares of their intersections, each with its interval (issue 17, "several attributes").

An image counts for an attribute when its prediction for that attribute is confident, and
for the intersection when it is confident on every attribute; the rest are ``unknown`` there.
The intersection is audited as one attribute whose labels are the cells (``"digit=3,
group=dark"``), so its shares get the same Wilson intervals and its distance from the target
the same metrics and BCa intervals as any attribute (`evaluations.metrics.summarize`). Its
default target is the product of the attributes' targets: every cell at the share the
attributes' targets give it if they were independent (uniform targets: every cell equal).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

import toolkit
from evaluations.metrics import count_table, known_or_unknown, summarize
from evaluations.results import ShareSummary
from toolkit import DtkError

UNKNOWN = "unknown"


@dataclasses.dataclass
class IntersectionalSummary:
    """The figures of an audit over several attributes."""

    attributes: list[str]
    #: joint counts: one row per cell (every combination of labels, zeros included), the
    #: attributes as columns, then ``count``; images unknown on any attribute are not in it
    table: pd.DataFrame
    #: each attribute on its own, over the images confident on it
    marginals: dict[str, ShareSummary]
    #: the cells as the labels of one attribute (`cell_name`)
    joint: ShareSummary
    #: the cell with the fewest images (the first such, in table order) and its count
    smallest: tuple[dict[str, str], int]

    def to_json(self) -> dict[str, Any]:
        """The figures as results.json holds them."""
        cell, count = self.smallest
        table = [{k: (int(v) if k == "count" else str(v)) for k, v in row.items()}
                 for row in self.table.to_dict(orient="records")]  # fmt: skip
        return {
            "attributes": self.attributes,
            "table": table,
            "marginals": {a: s.to_json() for a, s in self.marginals.items()},
            "joint": self.joint.to_json(),
            "smallest_cell": {"cell": cell, "count": count},
        }


def cell_name(cell: Mapping[str, str]) -> str:
    """A cell's label: ``"digit=3, group=dark"``, the attributes in audit order."""
    return ", ".join(f"{attribute}={value}" for attribute, value in cell.items())


def audit_intersections(
    predictions: Mapping[str, Sequence[str | None]],
    labels: Mapping[str, Sequence[str]],
    *,
    targets: Mapping[str, Mapping[str, float]] | None = None,
    joint_target: Mapping[str, float] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> IntersectionalSummary:
    """Audit images over several attributes at once.

    `predictions` maps each attribute to one prediction per image (a label, or None /
    ``"unknown"`` when not confident), all of the same length; `labels` gives each
    attribute's labels in order. `targets` gives each attribute's target shares (default:
    uniform); `joint_target` the cells' (keys as `cell_name` writes them; default: the
    product of the attributes' targets).
    """
    attributes = list(predictions)
    if len(attributes) < 2:
        raise DtkError("an intersectional audit needs two or more attributes")
    missing = [a for a in attributes if a not in labels]
    if missing:
        raise DtkError(f"no labels given for attribute {missing[0]!r}")
    lengths = {len(values) for values in predictions.values()}
    if len(lengths) != 1:
        raise DtkError(f"the attributes' predictions differ in length: {sorted(lengths)}")
    targets = {a: dict((targets or {}).get(a) or toolkit.target_distribution("uniform", labels[a]))
               for a in attributes}  # fmt: skip
    marginals = {a: summarize(_counts(a, predictions[a], labels[a]), targets[a], n_boot=n_boot,
                              seed=seed, confidence=confidence)
                 for a in attributes}  # fmt: skip
    cells = _cells(attributes, labels)
    joint_counts = joint_cell_counts(predictions, labels)
    table = pd.DataFrame(cells, columns=attributes).assign(count=joint_counts.iloc[:-1].to_numpy())
    if joint_target is None:
        joint_target = {cell_name(cell): float(np.prod([targets[a][cell[a]] for a in attributes]))
                        for cell in cells}  # fmt: skip
    joint = summarize(joint_counts, joint_target, n_boot=n_boot, seed=seed,
                      confidence=confidence)  # fmt: skip
    smallest = int(np.argmin(table["count"].to_numpy()))
    return IntersectionalSummary(
        attributes, table, marginals, joint, (cells[smallest], int(table["count"].iloc[smallest]))
    )


def joint_cell_counts(predictions: Mapping[str, Sequence[str | None]],
                      labels: Mapping[str, Sequence[str]]) -> pd.Series:  # fmt: skip
    """The images of every cell (indexed by `cell_name`, every combination of labels in
    label order, zeros included), then ``unknown``: those not confident on every
    attribute. `metrics.count_table` over the cells as the labels of one attribute."""
    attributes = list(predictions)
    columns = [_known(a, predictions[a], labels[a]) for a in attributes]
    joint = [None if UNKNOWN in values else cell_name(dict(zip(attributes, values)))
             for values in zip(*columns)]  # fmt: skip
    names = [cell_name(cell) for cell in _cells(attributes, labels)]
    return count_table(joint, names, unknown=UNKNOWN)["count"]


def _cells(attributes: list[str], labels: Mapping[str, Sequence[str]]) -> list[dict[str, str]]:
    """Every combination of the attributes' labels, in label order."""
    values = [[str(v) for v in labels[a]] for a in attributes]
    return [dict(zip(attributes, combination)) for combination in itertools.product(*values)]


def _known(attribute: str, values: Sequence[str | None], labels: Sequence[str]) -> list[str]:
    """One attribute's predictions as labels or ``unknown``, checked (`known_or_unknown`),
    a refusal naming the attribute."""
    try:
        return [str(v) for v in known_or_unknown(values, list(map(str, labels)), UNKNOWN)]
    except DtkError as exc:
        raise DtkError(f"{attribute!r}: {exc}") from None


def _counts(attribute: str, values: Sequence[str | None], labels: Sequence[str]) -> pd.Series:
    """One attribute's counts per label (zeros included), then ``unknown``."""
    try:
        return count_table(values, list(map(str, labels)), unknown=UNKNOWN)["count"]
    except DtkError as exc:
        raise DtkError(f"{attribute!r}: {exc}") from None
