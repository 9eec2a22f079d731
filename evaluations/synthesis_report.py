"""The synthesis report: the plan and what was achieved, retries, rejections, a gallery."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import TYPE_CHECKING

import toolkit
from evaluations.report import Report, round_robin, shown_interval

if TYPE_CHECKING:
    import pandas

    from evaluations.fidelity import Fidelity
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
    if result.fidelity is not None:
        add_fidelity_section(report, result.fidelity, level=level)
    if len(result.synthetic):
        add_synthetic_gallery(report, out, result)


def add_fidelity_section(report: Report, fidelity: Fidelity, *, level: int) -> None:
    """What the independent judge read: synthetic against real, overall and per cell."""
    report.heading("Fidelity, read by an independent judge", level=level)
    verdict = "within" if fidelity.matched else "**not** within"
    report.text(
        f"The judge `{fidelity.judge}` (not the filter's classifier, which passed every "
        "accepted image by construction) read each accepted image, and the real images of "
        f"the same cells in `{fidelity.reference}`. Shown: the share read as requested, "
        "with 95% Wilson intervals, and synthetic minus real with Newcombe's interval. "
        f"Overall, the synthetic share is {verdict} {fidelity.tolerance:.2f} of the real one "
        "for every attribute (point estimates). A judge's errors on real images are its "
        "own, not the synthesizer's: what counts is the difference."
    )
    frame = fidelity.frame()
    shown = frame[["attribute", "cell"]].assign(
        synthetic=[_interval(r, "synthetic") for _, r in frame.iterrows()],
        synthetic_n=frame["synthetic_n"],
        real=[_interval(r, "real") for _, r in frame.iterrows()],
        real_n=frame["real_n"],
        difference=[_interval(r, "difference", signed=True) for _, r in frame.iterrows()],
    )
    overall = shown[shown["cell"] == "all"]
    report.table(overall.drop(columns="cell").reset_index(drop=True),
                 caption="Read as requested, overall")  # fmt: skip
    cells = shown[shown["cell"] != "all"].reset_index(drop=True)
    if len(cells) > 1:
        report.table(cells, caption="Read as requested, per cell")


def _interval(row: pandas.Series, name: str, signed: bool = False) -> str:
    # NaN where a cell has no real images: n/a
    return shown_interval(row[name], row[f"{name}_low"], row[f"{name}_high"], signed=signed)


def add_synthetic_gallery(report: Report, out: pathlib.Path, result: SynthesisResult) -> None:
    """Up to 16 accepted samples per group value, captioned with their class."""
    attribute, by = result.config.attribute, result.config.by
    gallery = {}
    for value, rows in result.synthetic.groupby(attribute, sort=True):
        # the rows come class by class: take the classes in turn, or 16 would show one class
        rows = round_robin(rows, by)
        classes = rows[by] if by else [""] * len(rows)
        captions = [f"{by} {c}" if by else "" for c in classes]
        gallery[str(value)] = list(zip(toolkit.image_sources(out / "synthetic", rows), captions))
    title = f"Synthetic samples by {attribute}" + (f", each {by} in turn" if by else "")
    report.gallery(title, gallery, max_per_group=16)
