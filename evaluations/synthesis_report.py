"""The synthesis report: the plan and what was achieved, retries, rejections, a gallery."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import TYPE_CHECKING

from evaluations.report import Report, round_robin

if TYPE_CHECKING:
    from evaluations.synthesis import SynthesisResult


def write_synthesis_report(out: pathlib.Path, result: SynthesisResult) -> None:
    config = result.config
    title = f"Synthetic data: {config.attribute}" + (f" by {config.by}" if config.by else "")
    report = Report(title, created=result.created)
    add_synthesis_section(report, out, result, level=2)
    report.config({"config": config.to_json(), "plugins": result.plugins,
                   "versions": result.versions})  # fmt: skip
    report.write(out)


def add_synthesis_section(
    report: Report, out: pathlib.Path, result: SynthesisResult, *, level: int
) -> None:
    """The plan and its outcome, the rounds, rejections and a gallery of accepted samples."""
    import pandas

    config = result.config
    met = "met" if result.shortfall == 0 else f"short by {result.shortfall} images"
    report.text(
        f"Real data `{config.data}`, generator `{config.model}`. Planned "
        f"{result.planned} images, accepted {result.accepted}: the plan is {met}."
    )
    report.heading("Plan", level=level)
    report.text(
        "Per cell: `have` real images, `want` after synthesis, `generate` planned and "
        "`generated` accepted after filtering."
    )
    report.table(result.plan, caption="Plan and outcome per cell")
    report.heading("Filtering and retries", level=level)
    rounds = pandas.DataFrame([dataclasses.asdict(r) for r in result.rounds])
    report.table(rounds, caption="Generation rounds")
    if result.rejections:
        frame = pandas.DataFrame(
            [{"filter": k, "rejected": v} for k, v in result.rejections.items()]
        )
        report.table(frame, caption="Rejections by filter (a sample may fail both)")
    if len(result.synthetic):
        add_synthetic_gallery(report, out, result)


def add_synthetic_gallery(report: Report, out: pathlib.Path, result: SynthesisResult) -> None:
    """Up to 16 accepted samples per group value, captioned with their class."""
    attribute, by = result.config.attribute, result.config.by
    gallery = {}
    for value, rows in result.synthetic.groupby(attribute, sort=True):
        # the rows come class by class: take the classes in turn, or 16 would show one class
        rows = round_robin(rows, by)
        classes = rows[by] if by else [""] * len(rows)
        gallery[str(value)] = [
            (out / "synthetic" / f, f"{by} {c}" if by else "")
            for f, c in zip(rows["file_name"], classes)
        ]
    title = f"Synthetic samples by {attribute}" + (f", each {by} in turn" if by else "")
    report.gallery(title, gallery, max_per_group=16)
