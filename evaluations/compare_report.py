"""The side-by-side report of ``dtk eval compare``: per attribute, the mean skews and their
change, each row's shares in A and B with the difference and its corrected p-value, and the
images of the rows that changed most, A beside B."""

from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING

import toolkit
from evaluations.plots import comparison_plot
from evaluations.report import Report, shown_interval

if TYPE_CHECKING:
    from evaluations.compare import AttributeComparison, Audit, ComparisonResult

CORRECTION_NAMES = {"holm": "Holm", "fdr_bh": "Benjamini-Hochberg"}
#: rows whose images the report shows, A beside B
SHOWN = 3


def write_compare_report(out: pathlib.Path, result: ComparisonResult) -> None:
    a, b = result.a, result.b
    report = Report(f"Comparison: {a.name} against {b.name}", created=result.created)
    rows = f"each {result.by} both audits hold" if result.by else "all images"
    report.text(f"**{a.name}**: {_source(a)}. **{b.name}**: {_source(b)}. Rows: {rows}.")
    for comparison in result.attributes.values():
        _attribute_section(report, comparison, a, b, result.by)
    report.config(result.to_json())
    report.write(out)


def _source(audit: Audit) -> str:
    config = audit.results["config"]
    if config.get("counts"):
        return f"published counts `{config['counts']}`"
    if config.get("images"):
        return f"the audit `{audit.folder}` of the folder `{config['images']}`"
    generation = config.get("generation", {})
    guidance = generation.get("guidance") or "the model's default guidance"
    return f"the audit `{audit.folder}` of `{config.get('model')}` with {guidance}"


def _attribute_section(report: Report, c: AttributeComparison, a: Audit, b: Audit,
                       by: str | None) -> None:  # fmt: skip
    report.heading(f"Attribute `{c.attribute}`", level=2)
    significant = c.significant()
    report.text(
        f"Mean skew (total variation from the target; with two values |p − target|) over "
        f"{len(c.rows)} row(s): {a.name} **{_value(c.mean_skew_a)}**, {b.name} "
        f"**{_value(c.mean_skew_b)}**; the change {b.name} − {a.name} is "
        f"**{_value(c.mean_skew_change)}** (95% BCa intervals, each row's images resampled in "
        f"both audits). **{len(significant)} of {len(c.rows)}** row(s) differ at "
        f"{CORRECTION_NAMES[c.correction]}-corrected p < {c.alpha} (Fisher's exact test per "
        "row for two values, chi-squared for more)."
    )
    report.figure(
        comparison_plot([r.row for r in c.rows], [r.share_a.share for r in c.rows],
                        [r.share_b.share for r in c.rows], target=c.target[c.focus],
                        label=c.focus, names=(a.name, b.name),
                        title=f"{c.attribute}: share {c.focus}, {a.name} → {b.name}"),
        caption=f"Share of `{c.focus}` per row in {a.name} and in {b.name}; the target dashed.",
        name=f"comparison_{c.attribute}",
    )  # fmt: skip
    frame = c.frame().set_index("row").sort_values("p_corrected", kind="stable")
    report.table(frame, caption=f"{c.attribute}: each row, smallest corrected p first")
    if by is not None and a.has_images and b.has_images:
        _galleries(report, c, a, b, by)


def _galleries(report: Report, c: AttributeComparison, a: Audit, b: Audit, by: str) -> None:
    """The images of the rows whose focus share moved most, A's beside B's."""
    moved = sorted(c.rows, key=lambda r: -r.changed)[:SHOWN]
    gallery = {}
    for row in moved:
        for audit in (a, b):
            rows = audit.predictions[audit.predictions[by] == row.row].head(8)
            captions = rows[f"{c.attribute}_predicted"].astype(str)
            gallery[f"{row.row} — {audit.name}"] = list(
                zip(toolkit.image_sources(audit.image_root, rows), captions)
            )
    report.gallery(f"The rows that moved most ({c.attribute})", gallery, max_per_group=8,
                   note=f"Under each image: its predicted {c.attribute}.")  # fmt: skip


def _value(value) -> str:
    return shown_interval(value.value, value.ci_low, value.ci_high)
