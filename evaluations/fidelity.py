"""Synthetic data's fidelity, read by a judge independent of the filter that accepted it.

`dtk synthesize` keeps a sample when its filter classifier reads the requested labels. Asking
that same classifier afterwards whether the accepted samples show their labels measures
the filter, not the images: every accepted sample passes by construction. A judge of
another family (the shipped ``mlp`` judges against the ``cnn`` filters: fully connected
against convolutional, other seeds, other augmentations) errs differently, so it can tell
how often the accepted samples really show what they were asked for.

The judge's reading of synthetic images is compared with its reading of real labeled
images of the same cells (ones it did not train on): a judge's errors on real data are not
the synthesizer's fault. Per attribute the judge reads, the share of images read as their
requested value, synthetic against real, with Wilson intervals and the difference with
Newcombe's interval; overall and per cell.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import toolkit
from evaluations import metrics
from evaluations.common import jsonable
from evaluations.compare import newcombe
from evaluations.report import shown_path
from evaluations.results import GroupShare, MetricValue

if TYPE_CHECKING:
    import pandas
    import torch

#: how close (in share) synthetic fidelity must come to real fidelity to count as matched
TOLERANCE = 0.03
#: the judge `synthesize` uses when the filter is the shipped cnn: the shipped mlp judges
DEFAULT_JUDGE = "mlp"
#: the file in a synthetic dataset folder that says which classifiers filtered it
FILTERED = "dataset.json"
ALL = "all"


@dataclasses.dataclass
class FidelityRow:
    """One attribute in one cell (or ``all``): the share of images the judge reads as their
    requested value, synthetic and real, and ``synthetic - real``."""

    attribute: str
    cell: str
    synthetic_n: int
    real_n: int
    synthetic: GroupShare
    real: GroupShare
    difference: MetricValue


@dataclasses.dataclass
class Fidelity:
    """What the judge read (results.json's ``fidelity``)."""

    judge: str
    judge_options: dict[str, Any]
    #: attribute -> the judge's identity (`identity`): its folder, or its plugin and options
    judges: dict[str, str]
    reference: str
    tolerance: float
    rows: list[FidelityRow]

    def overall(self) -> list[FidelityRow]:
        return [r for r in self.rows if r.cell == ALL]

    @property
    def matched(self) -> bool:
        """Every attribute's synthetic fidelity within `tolerance` of the real one."""
        return all(
            r.difference.value is not None and abs(r.difference.value) <= self.tolerance
            for r in self.overall()
        )

    def frame(self) -> pandas.DataFrame:
        """A row per attribute and cell: counts, shares, intervals, difference."""
        import pandas

        return pandas.DataFrame([
            {"attribute": r.attribute, "cell": r.cell,
             "synthetic_n": r.synthetic_n, "synthetic": r.synthetic.share,
             "synthetic_low": r.synthetic.ci_low, "synthetic_high": r.synthetic.ci_high,
             "real_n": r.real_n, "real": r.real.share,
             "real_low": r.real.ci_low, "real_high": r.real.ci_high,
             "difference": r.difference.value, "difference_low": r.difference.ci_low,
             "difference_high": r.difference.ci_high}
            for r in self.rows
        ])  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        return jsonable({
            "judge": self.judge, "judge_options": self.judge_options, "judges": self.judges,
            "reference": self.reference, "tolerance": self.tolerance, "matched": self.matched,
            "rows": self.frame().to_dict(orient="records"),
        })  # fmt: skip


def identity(name: str, options: Mapping[str, Any], attribute: str) -> str:
    """What makes two attribute classifiers the same one: the folder its weights come from
    (a ``path`` option, or the shipped folder ``cnn`` and ``mlp`` serve without one; shown
    as `shown_path` shows it), else its plugin name and options. Found without loading it."""
    path = options.get("path")
    if path is None:
        shipped = {"cnn": toolkit.classifier_path, "mlp": toolkit.judge_path}.get(name)
        try:
            path = shipped(str(options.get("attribute", attribute))) if shipped else None
        except toolkit.DtkError:  # no shipped folder: the plugin will say so when it loads
            path = None
    if path is not None:  # the shipped ones as toolkit/..., the same on every machine
        return shown_path(pathlib.Path(path).resolve())
    shown = {k: str(v) for k, v in sorted(options.items()) if k != "attribute"}
    return f"{name} {json.dumps(shown)}"


def make_judges(
    judge: str, options: Mapping[str, Any], attributes: Sequence[str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """The judge plugin for each attribute, each checked to predict it, and their identities."""
    made, identities = {}, {}
    for attribute in attributes:
        # from_strings converts string values by each option's type, takes others as given
        instance = toolkit.create_plugin("attribute_classifier", judge,
                                         {**options, "attribute": attribute},
                                         from_strings=True)  # fmt: skip
        if instance.attribute != attribute:
            raise toolkit.DtkError(f"judge {judge!r} predicts {instance.attribute!r}, "
                                   f"not {attribute!r}")  # fmt: skip
        made[attribute] = instance
        identities[attribute] = identity(judge, options, attribute)
    return made, identities


def check_independent(judges: Mapping[str, str], filters: Mapping[str, str], *,
                      what: str = "the judge") -> None:  # fmt: skip
    """Refuse a judge that is the filter's own classifier for an attribute it filtered."""
    for attribute, judge in judges.items():
        if filters.get(attribute) == judge:
            raise toolkit.DtkError(
                f"{what} for {attribute!r} is the classifier that filtered these images "
                f"({judge}): it accepted every one of them, so it would measure the filter, "
                "not the images; judge with another classifier (the shipped independent "
                "judges: --classifier mlp)"
            )


def filtered_by(folder: str | pathlib.Path) -> dict[str, str]:
    """The classifiers that filtered a synthetic dataset folder, per attribute (empty for a
    folder `synthesize` did not write)."""
    try:
        info = json.loads((pathlib.Path(folder) / FILTERED).read_text())
    except (OSError, ValueError):
        return {}
    filtered = info.get("filtered_by") if isinstance(info, dict) else None
    return dict(filtered) if isinstance(filtered, dict) else {}


def measure_fidelity(
    synthetic: toolkit.ImageDataset,
    reference: toolkit.ImageDataset,
    judges: Mapping[str, Any],
    *,
    judge: str,
    judge_options: Mapping[str, Any],
    identities: Mapping[str, str],
    cells: Sequence[str],
    tolerance: float = TOLERANCE,
) -> Fidelity:
    """How often `judges` read each image of `synthetic` as its requested values, against
    real images of `reference` in the same cells (combinations of the `cells` columns).

    Both datasets need every `cells` column; `judges` maps an attribute (a `cells` column)
    to the classifier that reads it.
    """
    import numpy as np
    import torch

    synthetic_cells = _cell_names(synthetic.metadata, cells)
    every_real = _cell_names(reference.metadata, cells)
    # the real images in the synthetic data's cells
    real = every_real.isin(set(synthetic_cells)).to_numpy()
    if not real.any():
        raise toolkit.DtkError(f"{reference.root} has no real images in the synthetic data's "
                               f"cells ({', '.join(cells)}): nothing to compare with")  # fmt: skip
    real_cells = every_real[real].reset_index(drop=True)
    real_images = reference.images[torch.as_tensor(np.flatnonzero(real))]
    rows = []
    for attribute, classifier in judges.items():
        synthetic_ok = _read_as_requested(classifier, synthetic.images,
                                          synthetic.metadata[attribute])  # fmt: skip
        real_ok = _read_as_requested(classifier, real_images,
                                     reference.metadata[attribute][real])  # fmt: skip
        rows.append(_row(attribute, ALL, synthetic_ok, real_ok))
        for cell in sorted(set(synthetic_cells), key=toolkit.natural_key):
            rows.append(_row(attribute, cell, synthetic_ok[synthetic_cells == cell],
                             real_ok[real_cells == cell]))  # fmt: skip
    return Fidelity(judge, dict(judge_options), dict(identities), shown_path(reference.root),
                    tolerance, rows)  # fmt: skip


def _cell_names(frame: pandas.DataFrame, cells: Sequence[str]) -> pandas.Series:
    import pandas

    if frame.empty:
        return pandas.Series([], dtype=str)
    parts = [c + "=" + frame[c].astype(str) for c in cells]
    names = parts[0]
    for part in parts[1:]:
        names = names + " " + part
    return names.reset_index(drop=True)


def _read_as_requested(classifier: Any, images: torch.Tensor, requested: pandas.Series) -> Any:
    """Per image, whether the classifier's most likely label is the requested value."""
    import numpy as np

    if len(images) == 0:
        return np.zeros(0, dtype=bool)
    read = classifier.predict_proba(images).float().argmax(-1).cpu().numpy()
    labels = np.asarray(classifier.labels, dtype=object)
    return labels[read] == requested.astype(str).to_numpy(dtype=object)


def _row(attribute: str, cell: str, synthetic_ok: Any, real_ok: Any) -> FidelityRow:
    shares = [_share(int(ok.sum()), len(ok)) for ok in (synthetic_ok, real_ok)]
    return FidelityRow(attribute, cell, len(synthetic_ok), len(real_ok), *shares,
                       newcombe(shares[1], shares[0]))  # fmt: skip


def _share(count: int, total: int) -> GroupShare:
    low, high = metrics.wilson_interval(count, total)
    return GroupShare(count, count / total if total else None, low, high, 1.0)
