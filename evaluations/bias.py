"""`dtk eval bias`: how far a generator's outputs are from a target distribution.

Images come from a model (generated here, with the audited attribute left unspecified) or
from any folder. An attribute-classifier plugin labels each image; predictions below
`min_confidence` count as ``unknown``. One count table per attribute (every label listed,
zero counts included) is the single source of every figure: shares with Wilson intervals,
Fairness Discrepancy, KL, total variation, mean absolute deviation (bootstrap intervals),
bias amplification against a reference folder, and shares corrected for the classifier's
own errors when a labeled calibration folder is given (`evaluations.metrics`); the
classifier's confusion counts and accuracy there are kept beside them, so a reader can see
why the correction moved the shares, or why it did not.
"""

from __future__ import annotations

import collections
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import toolkit
from evaluations import metrics
from evaluations.common import (
    load_images,
    now,
    provenance,
    versions,
    write_csv,
    write_json,
)
from evaluations.report import shown_path
from toolkit import natural_key

if TYPE_CHECKING:
    import pandas
    import torch

UNKNOWN = "unknown"


def audit_bias(
    out: str | pathlib.Path,
    *,
    images: str | pathlib.Path | None = None,
    model: str | pathlib.Path | None = None,
    conditions: Mapping[str, str] | None = None,
    n: int = 400,
    seed: int = 0,
    generation: Mapping[str, Any] | None = None,
    attributes: Sequence[str] = ("group",),
    classifier: str = "cnn",
    classifier_options: Mapping[str, Any] | None = None,
    min_confidence: float = 0.7,
    target: str | Mapping[str, float] = "uniform",
    reference: str | pathlib.Path | None = None,
    by: str | None = None,
    calibration: str | pathlib.Path | None = None,
    n_boot: int = 2000,
    progress: bool = True,
    report: bool = True,
) -> dict[str, Any]:
    """Audit the images in `images`, or `n` images generated from `model` (default: the
    shipped generator) with `conditions`, for each of `attributes`. Writes
    ``results.json``, CSVs and (with `report`) ``report.html``/``report.md`` to `out`;
    returns the results.

    `target` is ``uniform``, shares (``light=0.5,dark=0.5``) or ``reference`` (the shares of
    the `reference` folder). `generation` holds `toolkit.generate` keyword arguments
    (sampler, steps, guidance, prompt for a text-to-image model, ...). The classifier plugin
    is created per attribute with ``attribute=NAME`` and `classifier_options` (strings, as
    from a command line, are converted by the plugin's option types).
    """
    out = pathlib.Path(out)
    attributes = list(dict.fromkeys(attributes))
    if not attributes:
        raise toolkit.DtkError("give at least one --attribute to audit")
    if not 0 <= min_confidence <= 1:
        raise toolkit.DtkError("--min-confidence must be in [0, 1]")
    if n_boot < 100:
        raise toolkit.DtkError("--bootstrap must be at least 100 resamples")
    target_is_reference = isinstance(target, str) and target.strip().lower() == "reference"
    if target_is_reference and reference is None:
        raise toolkit.DtkError("--target reference needs --reference DIR")
    options = dict(classifier_options or {})
    # from_strings converts string values by each option's type and takes others as given
    classifiers = {
        a: toolkit.create_plugin("attribute_classifier", classifier, {**options, "attribute": a},
                                 from_strings=True)
        for a in attributes
    }  # fmt: skip
    for attribute, instance in classifiers.items():
        if instance.attribute != attribute:
            raise toolkit.DtkError(
                f"classifier {classifier!r} predicts {instance.attribute!r}, not {attribute!r}"
            )
        if not target_is_reference:  # check the spelling before any compute
            toolkit.target_distribution(target, instance.labels, what="--target")
    if conditions:
        fixed = sorted(set(conditions) & set(attributes))
        if fixed:
            raise toolkit.DtkError(
                f"the audited attribute {fixed[0]!r} is fixed by --condition; leave it "
                "unspecified so the audit sees what the model does on its own"
            )

    source: dict[str, Any]
    if images is None:
        folder = out / "samples"
        toolkit.generate(
            model, out=folder, conditions=_spread(model, conditions, by, n, generation), n=n,
            seed=seed,
            progress=progress, **dict(generation or {}),
        )  # fmt: skip
        source = {"model": shown_path(model or toolkit.default_model()), "conditions":
                  dict(conditions or {}), "n": n, "seed": seed,
                  "generation": dict(generation or {})}  # fmt: skip
    else:
        folder = pathlib.Path(images)
        source = {"images": shown_path(folder)}
    pixels, table = load_images(folder, [by] if by else [])
    by_values = None if by is None else table[by].astype(str).tolist()

    reference_data = None if reference is None else load_images(reference)
    calibration_data = None if calibration is None else load_images(calibration, attributes)

    predictions = table[["file_name"] + ([by] if by else [])].copy()
    results: dict[str, Any] = {}
    for attribute, instance in classifiers.items():
        labels = list(instance.labels)
        predicted, confidence, top = _predict(instance, pixels, min_confidence)
        predictions[f"{attribute}_predicted"] = predicted
        predictions[f"{attribute}_confidence"] = confidence
        predictions[f"{attribute}_top"] = top
        reference_counts = None
        if reference_data is not None:
            reference_counts = _reference_counts(
                reference_data, attribute, instance, labels, min_confidence
            )
        if target_is_reference:
            assert reference_counts is not None
            known = reference_counts.drop(UNKNOWN)
            if known.sum() == 0:
                raise toolkit.DtkError(f"--reference holds no image with a known {attribute}")
            shares = {k: float(v) / float(known.sum()) for k, v in known.items()}
        else:
            shares = toolkit.target_distribution(target, labels, what="--target")
        confusion = checked = None
        if calibration_data is not None:
            confusion, checked = _calibration(
                calibration_data, attribute, instance, labels, min_confidence
            )
        counts = metrics.count_table(predicted, labels, by=by_values, unknown=UNKNOWN)
        overall = counts["all"] if by is not None else counts["count"]
        summary = metrics.summarize(
            overall, shares, reference_counts=reference_counts, confusion=confusion,
            n_boot=n_boot, seed=seed,
        )  # fmt: skip
        if by is not None:
            summary["by"] = {
                str(value): metrics.summarize(counts[value], shares, n_boot=n_boot, seed=seed)
                for value in counts.columns
                if value != "all"
            }
        if checked is not None:
            summary["calibration"] = {"folder": shown_path(calibration), **checked}
        summary["classifier"] = provenance("attribute_classifier", classifier)
        results[attribute] = summary
        # the attribute names a file: made a safe name, so no --attribute can lead out of OUT
        stem = toolkit.safe_name(attribute)
        write_csv(out / f"counts_{stem}.csv", counts.rename_axis(attribute), index=True)
        write_csv(out / f"shares_{stem}.csv", metrics.shares_frame(summary))

    result = {
        "command": "eval bias",
        "created": now(),
        "config": {
            **source,
            "out": str(out),
            "attributes": attributes,
            "classifier": classifier,
            "classifier_options": options,
            "min_confidence": min_confidence,
            "target": target if isinstance(target, str) else dict(target),
            "reference": shown_path(reference),
            "by": by,
            "calibration": shown_path(calibration),
            "bootstrap": n_boot,
        },
        "plugins": _plugins_used(classifier, folder),
        "versions": versions(),
        "attributes": results,
    }
    write_csv(out / "predictions.csv", predictions)
    write_json(out / "results.json", result)
    if report:
        from evaluations.bias_report import write_bias_report

        write_bias_report(out, result, folder, predictions)
    return result


def _spread(
    model: str | pathlib.Path | None,
    conditions: Mapping[str, str] | None,
    by: str | None,
    n: int,
    generation: Mapping[str, Any] | None,
) -> list[dict[str, str]] | dict[str, str] | None:
    """With ``--by ATTR`` on generated images, sample ``i`` asks for ATTR's ``i % k``-th value
    (unless the conditions fix it, or the guidance draws ATTR itself, as ``fair`` does for
    its attribute), so every value gets its share of the ``n`` samples."""
    if by is None or (conditions and by in conditions):
        return dict(conditions) if conditions else None
    space = toolkit.label_space(model if model is not None else toolkit.default_model())
    if _guidance_draws(generation, space, conditions, by):
        return dict(conditions) if conditions else None
    if space is None:
        raise toolkit.DtkError(
            f"--by {by}: the model has no attributes to spread the samples over; give "
            f"--condition {by}=VALUE, or a guidance that draws {by} (fair)"
        )
    values = space.attribute(by).values
    return [{**(conditions or {}), by: values[i % len(values)]} for i in range(n)]


def _predict(
    classifier: Any, pixels: torch.Tensor, min_confidence: float
) -> tuple[list[str], list[float], list[str]]:
    """Per image: the most probable label, or ``unknown`` below `min_confidence`; its
    probability; and the most probable label even below the threshold (for the gallery)."""
    probabilities = classifier.predict_proba(pixels).float().cpu()
    confidence, index = probabilities.max(dim=1)
    labels = list(classifier.labels)
    top = [labels[i] for i in index.tolist()]
    predicted = [
        label if c >= min_confidence else UNKNOWN for label, c in zip(top, confidence.tolist())
    ]
    return predicted, [round(c, 6) for c in confidence.tolist()], top


def _reference_counts(
    data: tuple[torch.Tensor, pandas.DataFrame],
    attribute: str,
    classifier: Any,
    labels: list[str],
    min_confidence: float,
) -> pandas.Series:
    """The reference folder's counts: its own labels if it has the column, else the
    classifier's predictions (so both sides carry the same classifier errors)."""
    pixels, table = data
    if attribute in table.columns:
        values = table[attribute].astype(str).tolist()
        foreign = sorted(set(values) - set(labels), key=natural_key)
        if foreign:
            raise toolkit.DtkError(
                f"--reference: {attribute} values {foreign} are not the classifier's labels "
                f"({', '.join(labels)})"
            )
    else:
        values, _, _ = _predict(classifier, pixels, min_confidence)
    return metrics.count_table(values, labels, unknown=UNKNOWN)["count"]


def _calibration(
    data: tuple[torch.Tensor, pandas.DataFrame],
    attribute: str,
    classifier: Any,
    labels: list[str],
    min_confidence: float,
) -> tuple[Any, dict[str, Any]]:
    """The confusion matrix the correction uses, and what the report shows of it: per true
    label the counts of each prediction (``unknown`` included), the accuracy of the confident
    predictions, and whether the matrix is the identity (then the correction is a no-op)."""
    pixels, table = data
    truth = table[attribute].astype(str).tolist()
    predicted, _, _ = _predict(classifier, pixels, min_confidence)
    # unknown predictions are left out of the audited shares, so of the calibration too
    kept = [(t, p) for t, p in zip(truth, predicted) if p != UNKNOWN]
    if not kept:
        raise toolkit.DtkError(f"--calibration: no image got a confident {attribute} prediction")
    confusion = metrics.confusion_matrix([t for t, _ in kept], [p for _, p in kept], labels)
    pairs = collections.Counter(zip(truth, predicted))
    counts = {t: {p: pairs[t, p] for p in [*labels, UNKNOWN]} for t in labels}
    correct = sum(1 for t, p in kept if t == p)
    checked = {
        "images": len(truth),
        "unknown": len(truth) - len(kept),
        "accuracy": correct / len(kept),
        "errors": len(kept) - correct,
        "counts": counts,
        # C[i, j] = P(pred = i | true = j), written per true label: C's columns
        "confusion": {
            t: {p: float(confusion[i, j]) for i, p in enumerate(labels)}
            for j, t in enumerate(labels)
        },
        # every label has calibration images (confusion_matrix checks), so no error = identity
        "identity": correct == len(kept),
    }
    return confusion, checked


def _plugins_used(classifier: str, folder: pathlib.Path) -> list[dict[str, str]]:
    """The classifier, then the plugins that made the images, as the folder's run.json (one
    `toolkit.generate` wrote) records them; a folder from elsewhere has none."""
    used = [provenance("attribute_classifier", classifier)]
    run_file = folder / "run.json"
    if run_file.is_file():
        used += json.loads(run_file.read_text()).get("plugins", [])
    return used


def _guidance_draws(
    generation: Mapping[str, Any] | None,
    space: Any,
    conditions: Mapping[str, str] | None,
    by: str,
) -> bool:
    """Whether the run's guidance draws `by` itself: its `assign` hook adds `by` to a
    sample's condition. Then --by reads what it drew from the metadata."""
    generation = dict(generation or {})
    if generation.get("guidance") is None:
        return False
    guidance = toolkit.create_plugin(
        "guidance", generation["guidance"], generation.get("guidance_options"),
        from_strings=bool(generation.get("options_from_strings")),
    )  # fmt: skip
    assign = toolkit.optional_member("guidance", guidance, "assign")
    if assign is None:
        return False
    # the attributes as `toolkit.generate` hands them over (none for a text-to-image model)
    attributes = {} if space is None else {a.name: list(a.values) for a in space.attributes}
    return by in assign(dict(conditions or {}), 0, attributes)
