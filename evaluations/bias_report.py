"""The bias audit's report: shares against the target, metrics, breakdown, the classifier's
check on the calibration images, a captioned gallery, limitations, config."""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import toolkit
from evaluations import metrics
from evaluations.intersections import cell_name
from evaluations.plots import prompt_shares_plot, shares_plot
from evaluations.report import Report, round_robin

if TYPE_CHECKING:
    import pandas

    from evaluations.intersections import IntersectionalSummary
    from evaluations.results import AttributeAudit, BiasConfig, BiasResult, ShareSummary

METRIC_NAMES = {
    "fairness_discrepancy": "Fairness Discrepancy ‖p̂−t‖₂",
    "kl_divergence": "KL(p̂‖t)",
    "total_variation": "total variation",
    "mean_absolute_deviation": "mean absolute deviation",
    "bias_amplification": "bias amplification",
}


def metrics_frame(summary: ShareSummary) -> pandas.DataFrame:
    import pandas

    rows = []
    for key, value in summary.metrics.items():
        row = {"metric": METRIC_NAMES.get(key, key), **dataclasses.asdict(value)}
        if summary.corrected is not None:
            row["corrected"] = summary.corrected.metrics.get(key)
        rows.append(row)
    return pandas.DataFrame(rows)


def add_attribute_section(
    report: Report, attribute: str, audit: AttributeAudit, *, level: int = 2
) -> None:
    """Shares plot, shares table and metrics table of one audited attribute."""
    report.heading(f"Attribute `{attribute}`", level=level)
    report.text(
        f"{audit.total} images; {audit.unknown} ({audit.unknown_share:.1%}) below the "
        "confidence threshold count as `unknown` and are left out of the shares. Intervals "
        "are 95%: Wilson per share, bootstrap for the metrics."
    )
    report.figure(
        shares_plot(
            {label: {"share": g.share, "ci_low": g.ci_low, "ci_high": g.ci_high}
             for label, g in audit.groups.items()},
            audit.targets(),
            title=f"{attribute}: shares vs target",
            corrected=None if audit.corrected is None else audit.corrected.shares,
        ),
        caption=f"Share of each {attribute} value with its 95% interval; the target marked.",
        name=f"shares_{attribute}",
    )  # fmt: skip
    report.table(_shares_with_accuracy(audit), caption=f"{attribute}: counts and shares")
    report.text(_accuracy_note(attribute, audit))
    report.table(metrics_frame(audit), caption="Distance from the target")
    if audit.by and audit.suite is None:  # a suite's table holds the per-prompt shares
        add_breakdown(report, attribute, audit.by)
    if audit.calibration is not None:
        add_calibration(report, attribute, audit)


def add_intersection_section(report: Report, summary: IntersectionalSummary) -> None:
    """The joint counts of the audited attributes and the shares of their intersections."""
    joint, names = summary.joint, " × ".join(f"`{a}`" for a in summary.attributes)
    cell, count = summary.smallest
    report.heading(f"Intersections: {names}", level=2)
    report.text(
        f"{joint.total} images; {joint.unknown} below the confidence threshold on at least "
        "one attribute are left out. Each cell's target is the product of the attributes' "
        "targets. Intervals are 95%: Wilson per share, bootstrap (BCa) for the metrics. "
        f"The smallest cell is `{cell_name(cell)}`, with {count} image(s)."
    )
    report.table(metrics.shares_frame(joint), caption="Intersections: counts and shares")
    report.table(metrics_frame(joint), caption="Intersections: distance from the target")


def _shares_with_accuracy(audit: AttributeAudit) -> pandas.DataFrame:
    """The shares table, with the classifier's accuracy on each true value of the labeled
    calibration images beside each share (when there are any)."""
    frame = metrics.shares_frame(audit)
    if audit.calibration is not None:
        accuracy = audit.calibration.accuracy_by_value()
        frame["classifier_accuracy"] = [accuracy.get(label) for label in frame["label"]]
    return frame


def _accuracy_note(attribute: str, audit: AttributeAudit) -> str:
    """What the reader must know before trusting the shares: how right the classifier is on
    each group, measured, or that it was not."""
    if audit.calibration is None:
        return (
            f"**The classifier's accuracy per {attribute} value was not measured** (no "
            "labeled images: `--calibration DIR`). A classifier that is worse on one group "
            "manufactures bias, so these shares are only as good as an accuracy nobody has "
            "checked here."
        )
    accuracy = {k: v for k, v in audit.calibration.accuracy_by_value().items() if v is not None}
    if not accuracy:
        return f"The calibration images hold no confident prediction of any {attribute} value."
    worst = min(accuracy, key=lambda k: accuracy[k])
    listed = ", ".join(f"`{k}` {v:.1%}" for k, v in accuracy.items())
    return (
        f"**The classifier's accuracy per true {attribute} value** on the labeled calibration "
        f"images: {listed} (lowest: `{worst}`). A classifier worse on one group manufactures "
        "bias: its errors on that group's images move them into other values' shares (the "
        "corrected shares below undo what the calibration images show)."
    )


def add_suite_section(report: Report, audit: AttributeAudit, image_root: pathlib.Path,
                      predictions: pandas.DataFrame) -> None:  # fmt: skip
    """A prompt suite's figures for one attribute: the mean skew and the share of skewed
    prompts (overall and per grouping value), each prompt's shares in a plot and a table,
    and galleries of the most and least skewed prompts."""
    import pandas

    from evaluations.suites import PROMPT, SKEWED

    suite, attribute = audit.suite, audit.suite.attribute
    overall = suite.overall
    report.heading(f"Prompt suite: `{attribute}`", level=3)
    report.text(
        f"{len(suite.prompts)} prompts. A prompt's **skew** is the total variation distance "
        f"of its {attribute} shares from the target (with two values: |p − target|); a "
        f"prompt is **skewed** when one value takes at least {SKEWED:.0%} of its images. "
        f"Mean skew: **{_figure(overall.mean_skew, '{:.3f}')}**; skewed prompts: "
        f"**{_figure(overall.skewed_share, '{:.1%}')}** of {overall.prompts}. Intervals are "
        "95% BCa, resampling each prompt's images (the prompts are fixed, the images are the "
        "sample)."
    )
    label = min(audit.groups, key=lambda k: audit.groups[k].share or 0.0)
    by = audit.by or {}
    report.figure(prompt_shares_plot(
        [p.prompt for p in suite.prompts],
        [p.shares.get(label) for p in suite.prompts],
        [by[p.prompt].groups[label].ci_low if p.prompt in by else None for p in suite.prompts],
        [by[p.prompt].groups[label].ci_high if p.prompt in by else None
         for p in suite.prompts],
        target=suite.target[label], label=label, title=f"{attribute}: share {label} per prompt",
    ), caption=f"Share of `{label}` (the least represented value) in each prompt's images, "
       "with its 95% Wilson interval; the target dashed.", name=f"suite_{attribute}")  # fmt: skip
    for column, values in suite.by_grouping.items():
        rows = {value: {"prompts": f.prompts, "mean skew": _figure(f.mean_skew, "{:.3f}"),
                        "skewed": _figure(f.skewed_share, "{:.1%}")}
                for value, f in values.items()}  # fmt: skip
        frame = pandas.DataFrame.from_dict(rows, orient="index").rename_axis(column)
        report.table(frame, caption=f"{attribute}: the suite per {column}")
    ranked = suite.frame().sort_values("skew", ascending=False, kind="stable")
    report.table(ranked.set_index("prompt"), caption=f"{attribute}: each prompt, most skewed first")
    for title, chosen in (("most", suite.most_skewed()), ("least", suite.least_skewed())):
        gallery = {}
        for prompt in chosen:
            rows = predictions[predictions[PROMPT] == prompt.prompt].head(8)
            captions = rows[f"{attribute}_predicted"].astype(str)
            gallery[f"{prompt.prompt} (skew {prompt.skew:.2f})"] = list(
                zip(toolkit.image_sources(image_root, rows), captions)
            )
        report.gallery(f"The {title} skewed prompts ({attribute})", gallery, max_per_group=8,
                       note=f"Under each image: its predicted {attribute}.")  # fmt: skip


def _figure(value: Any, number: str) -> str:
    """A figure with its interval, as text (n/a where undefined)."""
    if value.value is None:
        return "n/a"
    if value.ci_low is None or value.ci_high is None:
        return number.format(value.value)
    return (f"{number.format(value.value)} [{number.format(value.ci_low)}, "
            f"{number.format(value.ci_high)}]")  # fmt: skip


def add_breakdown(report: Report, attribute: str, by: Mapping[str, ShareSummary]) -> None:
    """The shares among the images of each --by value, one row per value."""
    import pandas

    rows = {value: {**part.shares(), "images": part.total} for value, part in by.items()}
    frame = pandas.DataFrame.from_dict(rows, orient="index").rename_axis("condition")
    report.table(frame, caption=f"{attribute} shares per condition value")


def add_calibration(report: Report, attribute: str, audit: AttributeAudit) -> None:
    """The classifier's confusion counts and accuracy on the labeled calibration images, and
    what the correction did with them: corrected shares that equal the raw ones are explained,
    not left for the reader to wonder about."""
    import pandas

    checked = audit.calibration
    assert checked is not None and audit.corrected is not None
    known = checked.images - checked.unknown
    report.text(
        f"**The classifier on the calibration images.** Of the {checked.images} labeled "
        f"images of `{checked.folder}`, {checked.unknown} fall below the confidence "
        f"threshold (left out, as in the audit); the classifier labels "
        f"{checked.accuracy:.1%} of the other {known} correctly ({checked.errors} "
        "errors). The corrected shares solve `C q = p̂` (black-box shift estimation), where "
        "`C[i, j]`, the probability of predicting `i` for an image whose true value is `j`, "
        "comes from these counts."
    )
    frame = pandas.DataFrame.from_dict(checked.counts, orient="index")
    frame = frame.rename_axis(f"true {attribute}").add_prefix("predicted ")
    report.table(frame, caption=f"{attribute}: calibration images by true value and prediction")
    corrected = audit.corrected.shares
    moves = ", ".join(
        f"`{label}` {_pct(group.share)} → {_pct(corrected[label])}"
        for label, group in audit.groups.items()
    )
    if checked.identity:
        report.text(
            "It made no error on the calibration images, so `C` is the identity and the "
            f"corrected shares equal the raw ones ({moves}): the correction has nothing to "
            "undo. That does not show the classifier is right on the audited images; see "
            "Limitations."
        )
    else:
        report.text(f"Its errors there move the shares: {moves} (raw → corrected).")


def write_bias_report(out: pathlib.Path, result: BiasResult) -> None:
    config = result.config
    report = Report(f"Bias audit: {', '.join(result.attributes)}", created=result.created)
    what = (
        f"folder `{config.images}`"
        if not config.generated
        else f"{config.n} samples of `{config.model}` with conditions "
        f"`{config.conditions or 'none'}`"
    )
    report.text(f"Audited: {what}. Classifier: `{config.classifier}`.")
    for attribute, audit in result.attributes.items():
        add_attribute_section(report, attribute, audit)
        if audit.suite is not None:
            add_suite_section(report, audit, result.image_root, result.predictions)
        add_gallery(report, attribute, result.image_root, result.predictions, by=config.by)
    if result.intersection is not None:
        add_intersection_section(report, result.intersection)
    report.heading("Limitations", level=2)
    report.text(limitations(result))
    report.config({"config": config.to_json(), "plugins": result.plugins,
                   "versions": result.versions})  # fmt: skip
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
        captions = [f"{t} ({float(c):.2f})" for t, c in zip(rows[top], rows[confidence])]
        gallery[label] = list(zip(toolkit.image_sources(image_root, rows), captions))
    note = (
        "Under each image: the classifier's most probable label and, in brackets, its "
        "probability; `unknown` images fell below the confidence threshold."
    )
    report.gallery(f"Samples by predicted {attribute}", gallery, max_per_group=16, note=note)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _shipped(config: BiasConfig) -> bool:
    """Whether the audit used the shipped classifiers (the ``cnn`` plugin without a path)."""
    name = str(config.classifier).split(":")[-1]
    return name == "cnn" and not (config.classifier_options or {}).get("path")


def limitations(result: BiasResult) -> str:
    """What the attribute classifier can and cannot judge, for this audit's settings: three
    paragraphs, each a limit a reader must know to trust the shares."""
    return "\n\n".join([_what_it_judges(result), _labels_it_knows(result),
                         _its_errors(result.config)])  # fmt: skip


#: what each shipped classifier reads, in the words of the report
SHIPPED_READS = {
    "group": "the `group` classifier tells `dark` from `light` by stroke width and paper "
    "grain (it was trained on randomly recoloured images, so a colour change alone does not "
    "fool it)",
    "digit": "the `digit` classifier reads the ten digits",
}


def _what_it_judges(result: BiasResult) -> str:
    config = result.config
    if not _shipped(config):
        options = config.classifier_options
        said = f" with options `{options}`" if options else ""
        return (
            "**What the classifier can judge.** Every share is the reading of the attribute "
            f"classifier `{config.classifier}`{said}, not ground truth: it is only as "
            "good as that classifier on these images."
        )
    said = "; ".join(SHIPPED_READS[a] for a in result.attributes if a in SHIPPED_READS)
    return (
        "**What the classifier can judge.** Every share is the attribute classifier's "
        "reading of the images, not ground truth. The shipped `cnn` classifiers learned "
        "from the shipped colored-digits images alone (the `train-balanced` split, both "
        f"groups){': ' + said if said else ''}. On other images, such as another "
        "dataset or samples unlike any colored digit, their reading means little."
    )


def _labels_it_knows(result: BiasResult) -> str:
    labels = "; ".join(
        f"`{attribute}`: " + ", ".join(f"`{label}`" for label in audit.labels)
        for attribute, audit in result.attributes.items()
    )
    return (
        f"**Only the labels it knows.** It gives every image one of its labels ({labels}): "
        "it cannot say that an image shows none of them, or a value it was not trained on. "
        f"A prediction whose top probability is below {result.config.min_confidence} counts "
        "as `unknown` and is left out of the shares; if it is unsure more often about one "
        "group, the shares lean towards the others, and nothing here corrects that."
    )


def _its_errors(config: BiasConfig) -> str:
    if config.calibration:
        errors = (
            "**Its errors.** The calibration correction undoes the confusions it makes on the "
            f"labeled images of `{config.calibration}`, assuming it makes them at the same "
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
    return errors + (
        " The galleries show each image's most probable label and its probability, to check "
        "the readings by eye."
    )
