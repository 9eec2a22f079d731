"""`dtk eval downstream` as a job: run `evaluations.downstream`, write its files and report."""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from evaluations.common import jsonable, now, versions, write_csv, write_json
from evaluations.downstream import (
    DownstreamConfig,
    DownstreamResult,
    mean_interval,
    run_downstream,
)
from evaluations.report import shown_path

if TYPE_CHECKING:
    import pandas

    from evaluations.report import Report

METHOD_NAMES = {
    "real": "real only",
    "oversample": "real + oversampled minority",
    "jitter": "real + color jitter",
    "synthetic": "real + synthetic",
    "pretrain_finetune": "synthetic pretrain, real finetune",
}


@dataclasses.dataclass
class DownstreamEvaluation:
    """``dtk eval downstream``'s result: `run_downstream`'s, the folders it read (as given)
    and each group's accuracy per model and method; `to_json` is results.json."""

    command: ClassVar[str] = "eval downstream"

    created: str
    real: str | None
    test: str | None
    synthetic: str | None
    out: str
    result: DownstreamResult
    versions: dict[str, str]
    accuracy_by_group: pandas.DataFrame = dataclasses.field(repr=False, compare=False)

    @property
    def config(self) -> DownstreamConfig:
        return self.result.config

    def config_json(self) -> dict[str, Any]:
        """results.json's ``config``: the folders, then `run_downstream`'s config."""
        folders = {"real": self.real, "test": self.test, "synthetic": self.synthetic}
        return {**folders, "out": self.out, **self.config.to_json()}

    def to_json(self) -> dict[str, Any]:
        return jsonable({
            "command": self.command, "created": self.created, "config": self.config_json(),
            "versions": self.versions, "groups": self.config.groups,
            "skipped": self.result.skipped, "summary": self.result.summary_records(),
            "accuracy_by_group": self.accuracy_by_group.to_dict(orient="records"),
            "runs": self.result.runs.to_dict("records"),
        })  # fmt: skip


def evaluate_downstream(
    out: str | pathlib.Path,
    real: Any,
    test: Any,
    synthetic: Any = None,
    *,
    report: bool = True,
    **options: Any,
) -> DownstreamEvaluation:
    """Train and test per model, method and seed (`run_downstream` `options`); write
    ``runs.csv``, ``summary.csv``, ``results.json`` and the report to `out`."""
    out = pathlib.Path(out)
    result = run_downstream(real, test, synthetic, **options)
    evaluation = DownstreamEvaluation(
        created=now(), real=_where(real), test=_where(test),
        synthetic=None if synthetic is None else _where(synthetic), out=str(out),
        result=result, versions=versions(),
        accuracy_by_group=accuracy_by_group(result.runs, result.config.groups),
    )  # fmt: skip
    write_csv(out / "runs.csv", result.runs)
    write_csv(out / "summary.csv", result.summary)
    write_json(out / "results.json", evaluation.to_json())
    if report:
        from evaluations.report import Report

        report_ = Report("Downstream fairness", created=evaluation.created)
        add_downstream_section(report_, evaluation)
        report_.config({"config": evaluation.config_json(), "versions": evaluation.versions})
        report_.write(out)
    return evaluation


def _where(data: Any) -> str:
    """The folder of a dataset given as a path or as a loaded `toolkit.ImageDataset`. A path
    is its own answer: `pathlib.Path` has a ``root`` too (``"/"`` or ``""``), not the folder."""
    if isinstance(data, (str, os.PathLike)):
        return shown_path(data)
    return shown_path(data.root)


def accuracy_by_group(runs: pandas.DataFrame, groups: Iterable[str]) -> pandas.DataFrame:
    """Per model and method: each group's mean accuracy over seeds with its t-interval."""
    import pandas

    rows = []
    for (model, method), chosen in runs.groupby(["model", "method"], sort=False):
        row: dict[str, Any] = {"model": model, "method": method}
        for group in groups:
            values = chosen[f"accuracy_{group}"].to_numpy(dtype=float)
            row.update(mean_interval(f"accuracy_{group}", values))
        rows.append(row)
    return pandas.DataFrame(rows)


def _interval(row: Mapping[str, Any], name: str, percent: bool = False) -> str:
    mean, low, high = (row.get(f"{name}_{p}") for p in ("mean", "ci_low", "ci_high"))
    if mean is None:
        return "—"
    fmt = "{:.1%}" if percent else "{:.3f}"
    if low is None or high is None:
        return fmt.format(mean)
    return f"{fmt.format(mean)} [{fmt.format(low)}, {fmt.format(high)}]"


def summary_table(evaluation: DownstreamEvaluation) -> pandas.DataFrame:
    """The headline table: mean [95% interval] per model and method."""
    import pandas

    rows = []
    for row in evaluation.result.summary_records():
        rows.append({
            "model": row["model"],
            "method": METHOD_NAMES.get(row["method"], row["method"]),
            "seeds": row["seeds"],
            "accuracy": _interval(row, "overall"),
            "worst group": _interval(row, "worst_group"),
            "gap": _interval(row, "gap"),
            "gap reduction vs real": "—" if row["method"] == "real"
            else _interval(row, "gap_reduction", percent=True),
        })  # fmt: skip
    return pandas.DataFrame(rows)


def add_downstream_section(
    report: Report, evaluation: DownstreamEvaluation, *, heading: str | None = None
) -> None:
    """The summary table and accuracy plots, under the level-2 `heading` if given (the
    report's own title says "Downstream fairness"; the demo numbers its section)."""
    from evaluations.plots import accuracy_plot

    config = evaluation.config
    if heading is not None:
        report.heading(heading, level=2)
    report.text(
        f"A `{config.label}` classifier trained per method and seed, tested on "
        f"`{evaluation.test}`; the gap is the best minus the worst `{config.attribute}` "
        "accuracy (fairlearn `MetricFrame.difference`). Intervals are 95% t-intervals over "
        "seeds; the gap reduction is paired by seed."
    )
    report.table(summary_table(evaluation), caption="Accuracy, worst-group accuracy and gap")
    for model, part in evaluation.accuracy_by_group.groupby("model", sort=False):
        report.figure(
            accuracy_plot(part, groups=config.groups, title=f"{model}: accuracy by group"),
            caption=f"{model}: mean accuracy per group and method, 95% intervals over seeds.",
            name=f"accuracy_{model}",
        )
    if evaluation.result.skipped:
        skipped = "; ".join(f"`{k}`: {v}" for k, v in evaluation.result.skipped.items())
        report.text(f"Not run: {skipped}.")
