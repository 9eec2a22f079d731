"""The bias audit's report: shares against the target, metrics, breakdown, the classifier's
check on the calibration images, a captioned gallery, limitations, config."""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from evaluations import metrics
from evaluations.plots import shares_plot
from evaluations.report import Report, round_robin

if TYPE_CHECKING:
    import pandas

METRIC_NAMES = {
    "fairness_discrepancy": "Fairness Discrepancy ‖p̂−t‖₂",
    "kl_divergence": "KL(p̂‖t)",
    "total_variation": "total variation",
    "mean_absolute_deviation": "mean absolute deviation",
    "bias_amplification": "bias amplification",
}


def metrics_frame(summary: Mapping[str, Any]) -> pandas.DataFrame:
    import pandas

    corrected = (summary.get("corrected") or {}).get("metrics", {})
    rows = []
    for key, value in summary["metrics"].items():
        row = {"metric": METRIC_NAMES.get(key, key), **value}
        if corrected:
            row["corrected"] = corrected.get(key)
        rows.append(row)
    return pandas.DataFrame(rows)


def add_attribute_section(
    report: Report, attribute: str, summary: Mapping[str, Any], *, level: int = 2
) -> None:
    """Shares plot, shares table and metrics table of one audited attribute."""

    target = {label: group["target"] for label, group in summary["groups"].items()}
    corrected = (summary.get("corrected") or {}).get("groups")
    report.heading(f"Attribute `{attribute}`", level=level)
    unknown = summary["unknown"]
    report.text(
        f"{summary['total']} images; {unknown['count']} ({unknown['share']:.1%}) below the "
        "confidence threshold count as `unknown` and are left out of the shares. Intervals "
        "are 95%: Wilson per share, bootstrap for the metrics."
    )
    report.figure(
        shares_plot(
            summary["groups"],
            target,
            title=f"{attribute}: shares vs target",
            corrected={k: v["share"] for k, v in corrected.items()} if corrected else None,
        ),
        caption=f"Share of each {attribute} value with its 95% interval; the target marked.",
        name=f"shares_{attribute}",
    )
    report.table(metrics.shares_frame(summary), caption=f"{attribute}: counts and shares")
    report.table(metrics_frame(summary), caption="Distance from the target")
    if summary.get("by"):
        import pandas

        rows = {
            value: {label: g["share"] for label, g in part["groups"].items()}
            | {"images": part["total"]}
            for value, part in summary["by"].items()
        }
        frame = pandas.DataFrame.from_dict(rows, orient="index").rename_axis("condition")
        report.table(frame, caption=f"{attribute} shares per condition value")
    if summary.get("calibration"):
        add_calibration(report, attribute, summary)


def add_calibration(report: Report, attribute: str, summary: Mapping[str, Any]) -> None:
    """The classifier's confusion counts and accuracy on the labeled calibration images, and
    what the correction did with them: corrected shares that equal the raw ones are explained,
    not left for the reader to wonder about."""
    import pandas

    checked = summary["calibration"]
    known = checked["images"] - checked["unknown"]
    report.text(
        f"**The classifier on the calibration images.** Of the {checked['images']} labeled "
        f"images of `{checked['folder']}`, {checked['unknown']} fall below the confidence "
        f"threshold (left out, as in the audit); the classifier labels "
        f"{checked['accuracy']:.1%} of the other {known} correctly ({checked['errors']} "
        "errors). The corrected shares solve `C q = p̂` (black-box shift estimation), where "
        "`C[i, j]`, the probability of predicting `i` for an image whose true value is `j`, "
        "comes from these counts."
    )
    frame = pandas.DataFrame.from_dict(checked["counts"], orient="index")
    frame = frame.rename_axis(f"true {attribute}").add_prefix("predicted ")
    report.table(frame, caption=f"{attribute}: calibration images by true value and prediction")
    corrected = summary["corrected"]["groups"]
    moves = ", ".join(
        f"`{label}` {_pct(group['share'])} → {_pct(corrected[label]['share'])}"
        for label, group in summary["groups"].items()
    )
    if checked["identity"]:
        report.text(
            "It made no error on the calibration images, so `C` is the identity and the "
            f"corrected shares equal the raw ones ({moves}): the correction has nothing to "
            "undo. That does not show the classifier is right on the audited images; see "
            "Limitations."
        )
    else:
        report.text(f"Its errors there move the shares: {moves} (raw → corrected).")


def write_bias_report(
    out: pathlib.Path,
    result: Mapping[str, Any],
    image_root: pathlib.Path,
    predictions: pandas.DataFrame,
) -> None:
    attributes = list(result["attributes"])
    report = Report(f"Bias audit: {', '.join(attributes)}", created=result["created"])
    source = result["config"]
    what = (
        f"folder `{source['images']}`"
        if "images" in source
        else f"{source['n']} samples of `{source['model']}` with conditions "
        f"`{source['conditions'] or 'none'}`"
    )
    report.text(f"Audited: {what}. Classifier: `{source['classifier']}`.")
    for attribute in attributes:
        add_attribute_section(report, attribute, result["attributes"][attribute])
        add_gallery(report, attribute, image_root, predictions, by=source["by"])
    report.heading("Limitations", level=2)
    report.text(limitations(result))
    report.config({"config": result["config"], "plugins": result["plugins"],
                   "versions": result["versions"]})  # fmt: skip
    report.write(out)


def add_gallery(
    report: Report,
    attribute: str,
    image_root: pathlib.Path,
    predictions: pandas.DataFrame,
    *,
    by: str | None = None,
) -> None:
    """Up to 16 images per predicted value, taking each `by` value in turn: what the
    classifier calls each group. Under each image its most probable label and that label's
    probability, so a sample that looks misclassified shows how sure the classifier was (in
    the ``unknown`` group: which label it leaned to, below the threshold)."""
    column, confidence = f"{attribute}_predicted", f"{attribute}_confidence"
    top = f"{attribute}_top" if f"{attribute}_top" in predictions else column
    gallery = {}
    for label, rows in predictions.groupby(column, sort=True):
        rows = round_robin(rows, by)
        gallery[label] = [
            (image_root / f, f"{t} ({float(c):.2f})")
            for f, t, c in zip(rows["file_name"], rows[top], rows[confidence])
        ]
    note = (
        "Under each image: the classifier's most probable label and, in brackets, its "
        "probability; `unknown` images fell below the confidence threshold."
    )
    report.gallery(f"Samples by predicted {attribute}", gallery, max_per_group=16, note=note)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _shipped(config: Mapping[str, Any]) -> bool:
    """Whether the audit used the shipped classifiers (the ``cnn`` plugin without a path)."""
    name = str(config["classifier"]).split(":")[-1]
    return name == "cnn" and not (config.get("classifier_options") or {}).get("path")


def limitations(result: Mapping[str, Any]) -> str:
    """What the attribute classifier can and cannot judge, for this audit's settings."""
    config = result["config"]
    labels = "; ".join(
        f"`{attribute}`: " + ", ".join(f"`{label}`" for label in summary["labels"])
        for attribute, summary in result["attributes"].items()
    )
    if _shipped(config):
        what = {
            "group": "the `group` classifier tells `dark` from `light` by stroke width and "
            "paper grain (it was trained on randomly recoloured images, so a colour change "
            "alone does not fool it)",
            "digit": "the `digit` classifier reads the ten digits",
        }
        said = "; ".join(what[a] for a in result["attributes"] if a in what)
        judges = (
            "**What the classifier can judge.** Every share is the attribute classifier's "
            "reading of the images, not ground truth. The shipped `cnn` classifiers learned "
            "from the shipped colored-digits images alone (the `train-balanced` split, both "
            f"groups){': ' + said if said else ''}. On other images, such as another "
            "dataset or samples unlike any colored digit, their reading means little."
        )
    else:
        options = config.get("classifier_options") or {}
        said = f" with options `{options}`" if options else ""
        judges = (
            "**What the classifier can judge.** Every share is the reading of the attribute "
            f"classifier `{config['classifier']}`{said}, not ground truth: it is only as "
            "good as that classifier on these images."
        )
    knows = (
        f"**Only the labels it knows.** It gives every image one of its labels ({labels}): "
        "it cannot say that an image shows none of them, or a value it was not trained on. "
        f"A prediction whose top probability is below {config['min_confidence']} counts as "
        "`unknown` and is left out of the shares; if it is unsure more often about one "
        "group, the shares lean towards the others, and nothing here corrects that."
    )
    if config.get("calibration"):
        errors = (
            "**Its errors.** The calibration correction undoes the confusions it makes on the "
            f"labeled images of `{config['calibration']}`, assuming it makes them at the same "
            "rates on the audited images (confident predictions only). Errors it makes only "
            "on the audited images, e.g. on generated samples unlike the calibration images, "
            "are not corrected."
        )
    else:
        errors = (
            "**Its errors.** No `--calibration` folder was given, so its errors are neither "
            "measured nor corrected; with labeled images there, the report shows its "
            "confusion counts and shares corrected for them."
        )
    errors += (
        " The galleries show each image's most probable label and its probability, to check "
        "the readings by eye."
    )
    return "\n\n".join([judges, knows, errors])
