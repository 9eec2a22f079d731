"""The bias audit's report: shares against the target, metrics, breakdown, gallery, config."""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from evaluations.plots import shares_plot
from evaluations.report import Report

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
    from evaluations.bias import shares_frame

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
    report.table(shares_frame(summary), caption=f"{attribute}: counts and shares")
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
        add_gallery(report, attribute, image_root, predictions)
    report.config({"config": result["config"], "plugins": result["plugins"],
                   "versions": result["versions"]})  # fmt: skip
    report.write(out)


def add_gallery(
    report: Report, attribute: str, image_root: pathlib.Path, predictions: pandas.DataFrame
) -> None:
    """Up to 16 images per predicted value: what the classifier calls each group."""
    column = f"{attribute}_predicted"
    gallery = {
        label: [image_root / f for f in rows["file_name"]]
        for label, rows in predictions.groupby(column, sort=True)
    }
    report.gallery(f"Samples by predicted {attribute}", gallery, max_per_group=16)
