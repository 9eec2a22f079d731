"""`dtk demo`: the whole fairness workflow on the embedded default, in one report.

1. **Data**: the colored-digits training split (group ``dark`` a 5% minority) and the
   balanced test split.
2. **Audit**: the shipped generator (trained on that split only), sampled with ``digit`` set
   and ``group`` left free: how often does it draw the minority?
3. **Fair guidance**: the same audit with the ``fair`` guidance plugin and a uniform target.
4. **Synthesis**: the minority images each digit is missing, filtered and retried.
5. **Downstream**: a digit classifier trained on real data alone, with oversampling, with
   color jitter, and with the synthetic data; accuracy per group on the test split.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import toolkit
from evaluations import defaults, synthesis
from evaluations.bias import audit_bias
from evaluations.common import jsonable, now, versions, write_json
from evaluations.downstream_job import DownstreamEvaluation, evaluate_downstream
from evaluations.report import shown_path
from evaluations.results import BiasResult

if TYPE_CHECKING:
    from evaluations.report import Report
    from evaluations.synthesis import SynthesisResult
    from toolkit import GenerationSettings

GROUP, MINORITY = "group", "dark"
#: the guidance of stage 3: each sample's group drawn from a uniform target
FAIR_GUIDANCE = {
    "guidance": "fair",
    "guidance_options": {"attribute": GROUP, "target": "uniform", "scale": 2.0},
}
#: each stage's results, relative to the demo's folder
STAGES = {
    "audit": "audit/results.json",
    "fair guidance": "audit-fair/results.json",
    "synthesis": "synthesize/results.json",
    "downstream": "downstream/results.json",
}
METHODS = ("real", "oversample", "jitter", "synthetic", "pretrain_finetune")


@dataclasses.dataclass
class MinorityShare:
    """The minority's share of an audit's known predictions, with its 95% interval."""

    share: float | None
    ci_low: float
    ci_high: float

    @classmethod
    def of(cls, audit: BiasResult) -> MinorityShare:
        group = audit.attributes[GROUP].groups[MINORITY]
        return cls(group.share, group.ci_low, group.ci_high)


@dataclasses.dataclass
class MethodFigures:
    """A downstream method's means over seeds (and 95% intervals) for the CNN."""

    gap: float | None
    gap_ci: tuple[float | None, float | None]
    worst_group: float | None
    accuracy: float | None
    gap_reduction: float | None
    gap_reduction_ci: tuple[float | None, float | None]

    @classmethod
    def of(cls, row: dict[str, Any]) -> MethodFigures:
        return cls(
            gap=row["gap_mean"], gap_ci=(row["gap_ci_low"], row["gap_ci_high"]),
            worst_group=row["worst_group_mean"], accuracy=row["overall_mean"],
            gap_reduction=row["gap_reduction_mean"],
            gap_reduction_ci=(row["gap_reduction_ci_low"], row["gap_reduction_ci_high"]),
        )  # fmt: skip


@dataclasses.dataclass
class Headline:
    """The figures a reader wants first."""

    training_minority_share: float | None
    generated_minority_share: MinorityShare
    fair_guidance_minority_share: MinorityShare
    synthetic_images: int
    synthesis_shortfall: int
    #: per downstream method
    cnn: dict[str, MethodFigures]
    #: per attribute, the share of synthetic and of real images the independent judge read
    #: as requested, and the difference (None without a judge)
    fidelity: dict[str, dict[str, float | None]] | None = None

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        methods = data.pop("cnn")
        return jsonable({**data, **{f"cnn_{method}": f for method, f in methods.items()}})


@dataclasses.dataclass
class DemoConfig:
    out: str
    n: int
    seeds: int
    sampler: str
    steps: int
    budget: int | None
    model: str | None
    #: how the audits generated (`sampler` and `steps` repeat two of its fields)
    generation: GenerationSettings

    def to_json(self) -> dict[str, Any]:
        return jsonable(dataclasses.asdict(self))


@dataclasses.dataclass
class DemoResult:
    """`run_demo`'s result: results.json (`to_json`: the config, the headline figures, the
    time per stage) and each stage's own result."""

    command: ClassVar[str] = "demo"

    created: str
    config: DemoConfig
    versions: dict[str, str]
    headline: Headline
    #: seconds per stage, to 0.1 s
    seconds: dict[str, float]
    audit: BiasResult = dataclasses.field(repr=False, compare=False)
    fair: BiasResult = dataclasses.field(repr=False, compare=False)
    synthesis: SynthesisResult = dataclasses.field(repr=False, compare=False)
    downstream: DownstreamEvaluation = dataclasses.field(repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return jsonable({
            "command": self.command, "created": self.created, "config": self.config.to_json(),
            "versions": self.versions, "headline": self.headline.to_json(),
            "seconds": self.seconds, "stages": STAGES,
        })  # fmt: skip


def run_demo(
    out: str | pathlib.Path,
    *,
    n: int = 400,
    seeds: int = 5,
    budget: int | None = None,
    generation: GenerationSettings | None = None,
    progress: bool = True,
    report: bool = True,
) -> DemoResult:
    """Run the five stages into `out` (each in its own subfolder, with its own report) and
    write ``OUT/report.html``, ``report.md`` and ``results.json`` joining them. `budget`
    caps the synthetic images (default: as many as balancing every digit needs).

    `generation` (a `toolkit.GenerationSettings`; default: its defaults with
    `defaults.DEMO_STEPS` steps) is how the audits generate; the fair-guidance audit swaps
    its guidance for `fair`, and synthesis keeps its own step count (and its guidance,
    unless `generation` names one).
    """
    out = pathlib.Path(out)
    if n < 10:
        raise toolkit.DtkError("-n must be at least 10")
    settings = demo_settings(generation)
    audits = {"n": n, "by": "digit", "attributes": [GROUP], "progress": progress}
    laps = _Laps()
    # 1. the data: the imbalanced training split and the balanced test split
    train, test = laps.time("data", _write_data, out / "data", progress)
    # 2. the generator's bias, its classifier checked on the labeled test split
    audit = laps.time("audit", audit_bias, out / "audit", reference=train, calibration=test,
                      generation=settings, **audits)  # fmt: skip
    # 3. the same audit under fair guidance
    fair = laps.time("fair guidance", audit_bias, out / "audit-fair", reference=train,
                     generation=settings.replace(**FAIR_GUIDANCE), **audits)  # fmt: skip
    # 4. the missing minority data, with synthesis's own step count
    made = laps.time("synthesis", synthesis.synthesize, out / "synthesize", data=train,
                     generation=settings.replace(steps=defaults.SYNTHESIS_STEPS),
                     budget=budget, judge_data=test, progress=progress)  # fmt: skip
    # 5. does it make a digit classifier fairer?
    downstream = laps.time("downstream", evaluate_downstream, out / "downstream", train, test,
                           out / "synthesize" / "synthetic", seeds=seeds, threads=1,
                           progress=progress)  # fmt: skip
    result = DemoResult(
        created=now(), config=_config(out, n, seeds, budget, settings), versions=versions(),
        headline=headline(audit, fair, made, downstream), seconds=laps.seconds, audit=audit,
        fair=fair, synthesis=made, downstream=downstream,
    )  # fmt: skip
    write_json(out / "results.json", result.to_json())
    if report:
        write_demo_report(out, result)
    return result


def demo_settings(generation: GenerationSettings | None) -> GenerationSettings:
    """How the demo's audits generate: `generation`, by default the toolkit's defaults with
    `defaults.DEMO_STEPS` steps."""
    if generation is None:
        return toolkit.GenerationSettings(steps=defaults.DEMO_STEPS)
    return toolkit.GenerationSettings.from_mapping(generation)


def _write_data(folder: pathlib.Path, progress: bool) -> tuple[pathlib.Path, pathlib.Path]:
    train, test = folder / "train", folder / "test"
    toolkit.write_colored_digits(train, "train", progress=progress)
    toolkit.write_colored_digits(test, "test", progress=progress)
    return train, test


class _Laps:
    """Seconds per stage, each rounded to 0.1 s (the total is their sum)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def time(self, name: str, stage: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`stage`'s result, its time recorded under `name`."""
        result = stage(*args, **kwargs)
        elapsed = time.perf_counter() - self.started - sum(self.seconds.values())
        self.seconds[name] = round(elapsed, 1)
        return result


def _config(out: pathlib.Path, n: int, seeds: int, budget: int | None,
            settings: GenerationSettings) -> DemoConfig:  # fmt: skip
    # as the audits ran them: the shipped model's defaults where the user named none
    resolved = toolkit.check_settings(settings, toolkit.default_model())
    return DemoConfig(out=str(out), n=n, seeds=seeds, sampler=resolved.sampler,
                      steps=resolved.steps, budget=budget,
                      model=shown_path(toolkit.default_model()), generation=settings)  # fmt: skip


def headline(
    audit: BiasResult,
    fair: BiasResult,
    synthesis: SynthesisResult,
    downstream: DownstreamEvaluation,
) -> Headline:
    """The figures a reader wants first."""
    reference = audit.attributes[GROUP].reference or {}
    rows = [r for r in downstream.result.summary_records() if r["model"] == "cnn"]
    return Headline(
        training_minority_share=reference.get(MINORITY),
        generated_minority_share=MinorityShare.of(audit),
        fair_guidance_minority_share=MinorityShare.of(fair),
        synthetic_images=synthesis.accepted,
        synthesis_shortfall=synthesis.shortfall,
        cnn={row["method"]: MethodFigures.of(row) for row in rows},
        fidelity=None if synthesis.fidelity is None else {
            r.attribute: {"synthetic": r.synthetic.share, "real": r.real.share,
                          "difference": r.difference.value}
            for r in synthesis.fidelity.overall()
        },
    )  # fmt: skip


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def duration(seconds: float) -> str:
    """A stage's time as a person reads it: ``0.6 s``, ``12 s``, ``3.4 min``, ``1.2 h``."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def write_demo_report(out: pathlib.Path, result: DemoResult) -> None:
    """One report: the summary and time per stage, then each stage's own section, then the
    limitations of the audits and of this run's size."""
    from evaluations.report import Report

    report = Report("dtk demo: auditing and rebalancing the embedded default",
                    created=result.created)  # fmt: skip
    add_summary(report, result)
    add_stages(report, out, result)
    add_limitations(report, result)
    report.config({"config": result.config.to_json(), "versions": result.versions,
                   "stages": STAGES})  # fmt: skip
    report.write(out)


def summary_lines(head: Headline) -> list[str]:
    """The headline figures in words."""
    generated, guided = head.generated_minority_share, head.fair_guidance_minority_share
    short = head.synthesis_shortfall
    lines = [
        f"The training split holds {_pct(head.training_minority_share)} `dark` images. "
        f"Asked for digits with the group left free, the generator draws "
        f"{_pct(generated.share)} `dark` (95% interval {_pct(generated.ci_low)} to "
        f"{_pct(generated.ci_high)}); with `fair` guidance towards a uniform target, "
        f"{_pct(guided.share)}.",
        f"Synthesis added {head.synthetic_images} filtered images"
        + (f" ({short} short of the plan)." if short else ", meeting the plan.")
        + _fidelity_words(head.fidelity),
    ]
    real, synthetic = head.cnn.get("real"), head.cnn.get("synthetic")
    if real and synthetic:
        low, high = synthetic.gap_reduction_ci
        lines.append(
            f"A digit CNN's accuracy gap between groups is {real.gap:.3f} on real data and "
            f"{synthetic.gap:.3f} with the synthetic data: a reduction of "
            f"{_pct(synthetic.gap_reduction)} (95% interval {_pct(low)} to {_pct(high)})."
        )
    return lines


def _fidelity_words(fidelity: dict[str, dict[str, float | None]] | None) -> str:
    """What the independent judge read, in a sentence (empty without one)."""
    if not fidelity:
        return ""
    parts = [f"{a} {_pct(f['synthetic'])} of them against {_pct(f['real'])} of real images"
             for a, f in fidelity.items() if f["synthetic"] is not None]  # fmt: skip
    return " An independent judge read as requested the " + "; the ".join(parts) + "."


def add_summary(report: Report, result: DemoResult) -> None:
    import pandas

    report.heading("Summary", level=2)
    report.text("\n\n".join(summary_lines(result.headline)))
    seconds = {**result.seconds, "total": sum(result.seconds.values())}
    report.table(
        pandas.DataFrame([{"stage": k, "time": duration(v)} for k, v in seconds.items()]),
        caption="Time per stage",
    )


def add_stages(report: Report, out: pathlib.Path, result: DemoResult) -> None:
    """Each stage's section, as in its own report, numbered."""
    from evaluations.bias_report import add_attribute_section, add_gallery
    from evaluations.downstream_job import add_downstream_section
    from evaluations.synthesis_report import add_synthesis_section

    audit = result.audit
    report.heading("1. Audit of the generator", level=2)
    add_attribute_section(report, GROUP, audit.attributes[GROUP], level=3)
    add_gallery(report, GROUP, audit.image_root, audit.predictions, by="digit")
    report.heading("2. Fair guidance", level=2)
    add_attribute_section(report, GROUP, result.fair.attributes[GROUP], level=3)
    report.heading("3. Synthetic minority data", level=2)
    add_synthesis_section(report, out / "synthesize", result.synthesis, level=3)
    add_downstream_section(report, result.downstream, heading="4. Downstream fairness")


def add_limitations(report: Report, result: DemoResult) -> None:
    from evaluations.bias_report import limitations

    report.heading("Limitations", level=2)
    report.text(limitations(result.audit))
    report.text(
        "**This run's size.** The audits classify "
        f"{result.config.n} samples each and the downstream figures come from "
        f"{result.config.seeds} seeds per method: the intervals say how far to trust "
        "them (the t-intervals over seeds are not clipped to [0, 1]). The downstream test "
        "is the real colored-digits `test` split: the figures hold for that data, not "
        "beyond it."
    )
