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

from evaluations.metrics import summarize
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
    frame = _predictions_frame(predictions, labels)
    targets = {a: dict(targets[a]) if targets and a in targets else _uniform(labels[a])
               for a in attributes}  # fmt: skip
    marginals = {a: summarize(_counts(frame[a], labels[a]), targets[a], n_boot=n_boot,
                              seed=seed, confidence=confidence)
                 for a in attributes}  # fmt: skip
    table = _joint_table(frame, attributes, labels)
    cells = [dict(zip(attributes, values)) for values in table[attributes].itertuples(index=False)]
    names = [cell_name(cell) for cell in cells]
    unknown = int(len(frame) - table["count"].sum())
    joint_counts = pd.Series([*table["count"], unknown], index=[*names, UNKNOWN])
    if joint_target is None:
        joint_target = {name: float(np.prod([targets[a][cell[a]] for a in attributes]))
                        for name, cell in zip(names, cells)}  # fmt: skip
    joint = summarize(joint_counts, joint_target, n_boot=n_boot, seed=seed,
                      confidence=confidence)  # fmt: skip
    smallest = int(np.argmin(table["count"].to_numpy()))
    return IntersectionalSummary(
        attributes, table, marginals, joint, (cells[smallest], int(table["count"].iloc[smallest]))
    )


def _uniform(values: Sequence[str]) -> dict[str, float]:
    return {str(v): 1 / len(values) for v in values}


def _predictions_frame(predictions: Mapping[str, Sequence[str | None]],
                       labels: Mapping[str, Sequence[str]]) -> pd.DataFrame:  # fmt: skip
    """One row per image, one column per attribute: a label or ``UNKNOWN``."""
    lengths = {len(values) for values in predictions.values()}
    if len(lengths) != 1:
        raise DtkError(f"the attributes' predictions differ in length: {sorted(lengths)}")
    columns = {}
    for attribute, values in predictions.items():
        allowed = [str(v) for v in labels[attribute]]
        if UNKNOWN in allowed:
            raise DtkError(f"{UNKNOWN!r} is reserved for low-confidence predictions, not a "
                           f"label of {attribute!r}")  # fmt: skip
        column = [UNKNOWN if v is None or v == UNKNOWN else str(v) for v in values]
        stray = sorted(set(column) - {*allowed, UNKNOWN})
        if stray:
            raise DtkError(f"{attribute!r} predictions hold {stray[0]!r}, not one of its "
                           f"labels {allowed}")  # fmt: skip
        columns[attribute] = column
    return pd.DataFrame(columns)


def _counts(column: pd.Series, labels: Sequence[str]) -> pd.Series:
    """One attribute's counts per label (zeros included), then ``unknown``."""
    index = [*map(str, labels), UNKNOWN]
    return column.value_counts().reindex(index, fill_value=0).astype(int)


def _joint_table(frame: pd.DataFrame, attributes: list[str],
                 labels: Mapping[str, Sequence[str]]) -> pd.DataFrame:  # fmt: skip
    """Every combination of labels, in label order, with its count of confident images."""
    known = frame[(frame[attributes] != UNKNOWN).all(axis=1)]
    counts = known.groupby(attributes, sort=False).size()
    cells = list(itertools.product(*(list(map(str, labels[a])) for a in attributes)))
    index = pd.MultiIndex.from_tuples(cells, names=attributes)
    table = counts.reindex(index, fill_value=0).astype(int).rename("count").reset_index()
    return table
