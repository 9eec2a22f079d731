"""Several attributes at once (`evaluations.intersections`): the joint table, the marginal
and intersectional shares recover a planted truth within their intervals, the smallest cell
is named, and the marginals are the single-attribute audit's figures."""

from __future__ import annotations

import numpy as np
import pytest

from evaluations import intersections as ix
from evaluations import metrics as m
from toolkit import DtkError

LABELS = {"gender": ["female", "male"], "skin_tone": ["light", "medium", "dark"]}
#: the planted joint shares: rows gender, columns skin tone (sum 1)
TRUTH = np.array([[0.30, 0.12, 0.03], [0.35, 0.15, 0.05]])


def planted(n: int, rng: np.random.Generator, unknown: float = 0.0) -> dict[str, list]:
    """`n` images drawn from `TRUTH`, a share `unknown` of each attribute's predictions
    unconfident."""
    cells = rng.choice(TRUTH.size, size=n, p=TRUTH.ravel())
    gender = [LABELS["gender"][c // 3] for c in cells]
    tone = [LABELS["skin_tone"][c % 3] for c in cells]
    for column in (gender, tone):
        for i in np.flatnonzero(rng.random(n) < unknown):
            column[i] = None
    return {"gender": gender, "skin_tone": tone}


def test_the_joint_table_counts_every_cell_and_names_the_smallest():
    predictions = {"gender": ["female", "male", "male", None, "female"],
                   "skin_tone": ["light", "light", "dark", "dark", "unknown"]}  # fmt: skip
    summary = ix.audit_intersections(predictions, LABELS, n_boot=100)
    table = summary.table
    assert list(table.columns) == ["gender", "skin_tone", "count"]
    assert len(table) == 6 and table["count"].sum() == 3  # two images unknown somewhere
    counts = {(g, s): c for g, s, c in table.itertuples(index=False)}
    assert counts[("female", "light")] == counts[("male", "light")] == 1
    assert counts[("male", "dark")] == 1 and counts[("female", "dark")] == 0
    assert summary.smallest == ({"gender": "female", "skin_tone": "medium"}, 0)
    assert summary.joint.unknown == 2 and summary.joint.total == 5
    assert summary.joint.labels[0] == "gender=female, skin_tone=light"


def test_marginals_are_the_single_attribute_audits():
    rng = np.random.default_rng(1)
    predictions = planted(500, rng, unknown=0.1)
    summary = ix.audit_intersections(predictions, LABELS, n_boot=200)
    for attribute, values in predictions.items():
        counts = m.count_table(values, LABELS[attribute])["count"]
        alone = m.summarize(counts, {v: 1 / len(LABELS[attribute]) for v in LABELS[attribute]},
                            n_boot=200)  # fmt: skip
        assert summary.marginals[attribute] == alone


def test_a_planted_truth_is_recovered_within_the_intervals():
    """One audit of 2,000 planted images: every cell's and every value's share within 0.03
    of the truth and its interval the Wilson interval of its count; over 400 planted joint
    tables those intervals hold the truth about 95% of the time."""
    one = ix.audit_intersections(planted(2000, np.random.default_rng(5)), LABELS, n_boot=200)
    shares = np.array([one.joint.groups[name].share for name in one.joint.labels])
    assert np.abs(shares - TRUTH.ravel()).max() <= 0.03
    counts = one.table["count"].to_numpy()
    low, high = m.wilson_interval(counts, counts.sum())
    assert [(g.ci_low, g.ci_high) for g in one.joint.groups.values()] == list(zip(low, high))
    female = one.marginals["gender"].groups["female"]
    assert abs(female.share - TRUTH[0].sum()) <= 0.03
    rng = np.random.default_rng(0)
    held = total = 0
    for _ in range(400):
        counts = ix.joint_cell_counts(planted(2000, rng), LABELS).iloc[:-1].to_numpy()
        low, high = m.wilson_interval(counts, counts.sum())
        held += int(((low <= TRUTH.ravel()) & (TRUTH.ravel() <= high)).sum())
        total += counts.size
    assert 0.93 <= held / total <= 0.97, held / total


def test_the_joint_target_is_the_product_of_the_attributes_targets():
    rng = np.random.default_rng(2)
    targets = {"gender": {"female": 0.5, "male": 0.5},
               "skin_tone": {"light": 0.5, "medium": 0.3, "dark": 0.2}}  # fmt: skip
    summary = ix.audit_intersections(planted(300, rng), LABELS, targets=targets, n_boot=100)
    assert summary.joint.groups["gender=male, skin_tone=dark"].target == pytest.approx(0.1)
    uniform = ix.audit_intersections(planted(300, rng), LABELS, n_boot=100)
    assert [g.target for g in uniform.joint.groups.values()] == pytest.approx([1 / 6] * 6)
    # an unequal intersection is further from its target than either attribute alone
    assert uniform.joint.metrics["total_variation"].value > max(
        s.metrics["total_variation"].value for s in uniform.marginals.values()
    )


@pytest.mark.parametrize("predictions, message", [
    ({"gender": ["female"]}, "two or more attributes"),
    ({"gender": ["female"], "skin_tone": ["light", "dark"]}, "differ in length"),
    ({"gender": ["female"], "skin_tone": ["purple"]}, "'purple'"),
    ({"gender": ["female"], "age": ["old"]}, "no labels given for attribute 'age'"),
])  # fmt: skip
def test_bad_input_is_one_clear_error(predictions, message):
    with pytest.raises(DtkError, match=message):
        ix.audit_intersections(predictions, LABELS, n_boot=100)


def test_results_json_holds_the_table_the_cells_and_the_smallest():
    import json

    summary = ix.audit_intersections(planted(100, np.random.default_rng(3)), LABELS, n_boot=100)
    data = json.loads(json.dumps(summary.to_json()))
    assert data["attributes"] == ["gender", "skin_tone"]
    assert len(data["table"]) == 6 and set(data["marginals"]) == set(LABELS)
    assert data["smallest_cell"]["count"] == min(row["count"] for row in data["table"])
