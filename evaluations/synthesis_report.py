"""The synthesis report: the plan and what was achieved, retries, rejections, a gallery."""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from evaluations.report import Report, round_robin

if TYPE_CHECKING:
    import pandas


def write_synthesis_report(
    out: pathlib.Path,
    result: Mapping[str, Any],
    plan: pandas.DataFrame,
    synthetic: pandas.DataFrame,
) -> None:
    config = result["config"]
    attribute, by = config["attribute"], config["by"]
    report = Report(f"Synthetic data: {attribute}" + (f" by {by}" if by else ""),
                    created=result["created"])  # fmt: skip
    add_synthesis_section(report, out, result, plan, synthetic, level=2)
    report.config({"config": config, "plugins": result["plugins"],
                   "versions": result["versions"]})  # fmt: skip
    report.write(out)


def add_synthesis_section(
    report: Report,
    out: pathlib.Path,
    result: Mapping[str, Any],
    plan: pandas.DataFrame,
    synthetic: pandas.DataFrame,
    *,
    level: int,
) -> None:
    """The plan and its outcome, the rounds, rejections and a gallery of accepted samples."""
    import pandas

    config = result["config"]
    attribute, by = config["attribute"], config["by"]
    met = "met" if result["shortfall"] == 0 else f"short by {result['shortfall']} images"
    report.text(
        f"Real data `{config['data']}`, generator `{config['model']}`. Planned "
        f"{result['planned']} images, accepted {result['accepted']}: the plan is {met}."
    )
    report.heading("Plan", level=level)
    report.text(
        "Per cell: `have` real images, `want` after synthesis, `generate` planned and "
        "`generated` accepted after filtering."
    )
    report.table(plan, caption="Plan and outcome per cell")
    report.heading("Filtering and retries", level=level)
    report.table(pandas.DataFrame(result["rounds"]), caption="Generation rounds")
    if result["rejections"]:
        frame = pandas.DataFrame(
            [{"filter": k, "rejected": v} for k, v in result["rejections"].items()]
        )
        report.table(frame, caption="Rejections by filter (a sample may fail both)")
    if len(synthetic):
        # the rows come class by class: take the classes in turn, or 16 would show one class
        gallery = {}
        for value, rows in synthetic.groupby(attribute, sort=True):
            rows = round_robin(rows, by)
            names = rows["file_name"]
            classes = rows[by] if by else [""] * len(rows)
            gallery[str(value)] = [
                (out / "synthetic" / f, f"{by} {c}" if by else "") for f, c in zip(names, classes)
            ]
        title = f"Synthetic samples by {attribute}" + (f", each {by} in turn" if by else "")
        report.gallery(title, gallery, max_per_group=16)
