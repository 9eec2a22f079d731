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

import pathlib
import time
from collections.abc import Mapping
from typing import Any

import toolkit
from evaluations.bias import audit_bias
from evaluations.common import now, versions, write_json
from evaluations.downstream_job import evaluate_downstream
from evaluations.report import shown_path

GROUP, MINORITY = "group", "dark"


def run_demo(
    out: str | pathlib.Path,
    *,
    n: int = 400,
    seeds: int = 5,
    sampler: str = "dpmpp_2m",
    steps: int = 10,
    batch_size: int = 100,
    budget: int | None = None,
    device: str = "auto",
    progress: bool = True,
    report: bool = True,
) -> dict[str, Any]:
    """Run the five stages into `out` (each in its own subfolder, with its own report) and
    write ``OUT/report.html``, ``report.md`` and ``results.json`` joining them. `budget`
    caps the synthetic images (default: as many as balancing every digit needs)."""
    from evaluations.synthesis import synthesize

    out = pathlib.Path(out)
    if n < 10:
        raise toolkit.DtkError("-n must be at least 10")
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        timings[name] = round(time.perf_counter() - started - sum(timings.values()), 1)

    train, test = out / "data" / "train", out / "data" / "test"
    toolkit.write_colored_digits(train, "train", progress=progress)
    toolkit.write_colored_digits(test, "test", progress=progress)
    lap("data")
    generation = {"sampler": sampler, "steps": steps, "batch_size": batch_size,
                  "device": device}  # fmt: skip
    common = {"n": n, "by": "digit", "attributes": [GROUP], "progress": progress}
    audit = audit_bias(out / "audit", reference=train, calibration=test,
                       generation=generation, **common)  # fmt: skip
    lap("audit")
    fair_guidance = {
        "guidance": "fair",
        "guidance_options": {"attribute": GROUP, "target": "uniform", "scale": 2.0},
    }
    fair = audit_bias(out / "audit-fair", reference=train,
                      generation={**generation, **fair_guidance}, **common)  # fmt: skip
    lap("fair guidance")
    # synthesis keeps its own step count and guidance (evaluations.synthesis.DEFAULT_*)
    synthesis_generation = {k: v for k, v in generation.items() if k != "steps"}
    synthesis = synthesize(out / "synthesize", data=train, generation=synthesis_generation,
                           budget=budget, progress=progress)  # fmt: skip
    lap("synthesis")
    downstream = evaluate_downstream(
        out / "downstream", train, test, out / "synthesize" / "synthetic",
        seeds=seeds, threads=1, progress=progress,
    )  # fmt: skip
    lap("downstream")

    result = {
        "command": "demo",
        "created": now(),
        "config": {
            "out": str(out),
            "n": n,
            "seeds": seeds,
            "sampler": sampler,
            "steps": steps,
            "budget": budget,
            "model": shown_path(toolkit.default_model()),
        },
        "versions": versions(),
        "headline": headline(audit, fair, synthesis, downstream),
        "seconds": timings,
        "stages": {
            "audit": "audit/results.json",
            "fair guidance": "audit-fair/results.json",
            "synthesis": "synthesize/results.json",
            "downstream": "downstream/results.json",
        },
    }
    write_json(out / "results.json", result)
    if report:
        write_demo_report(out, result, audit, fair, synthesis, downstream)
    return result


def _share(audit: Mapping[str, Any]) -> dict[str, Any]:
    group = audit["attributes"][GROUP]["groups"][MINORITY]
    return {k: group[k] for k in ("share", "ci_low", "ci_high")}


def headline(
    audit: Mapping[str, Any],
    fair: Mapping[str, Any],
    synthesis: Mapping[str, Any],
    downstream: Mapping[str, Any],
) -> dict[str, Any]:
    """The figures a reader wants first."""
    reference = audit["attributes"][GROUP].get("reference", {}).get(MINORITY)
    methods = {row["method"]: row for row in downstream["summary"] if row["model"] == "cnn"}
    figures: dict[str, Any] = {
        "training_minority_share": reference,
        "generated_minority_share": _share(audit),
        "fair_guidance_minority_share": _share(fair),
        "synthetic_images": synthesis["accepted"],
        "synthesis_shortfall": synthesis["shortfall"],
    }
    for method, row in methods.items():
        figures[f"cnn_{method}"] = {
            "gap": row["gap_mean"],
            "gap_ci": [row["gap_ci_low"], row["gap_ci_high"]],
            "worst_group": row["worst_group_mean"],
            "accuracy": row["overall_mean"],
            "gap_reduction": row["gap_reduction_mean"],
            "gap_reduction_ci": [row["gap_reduction_ci_low"], row["gap_reduction_ci_high"]],
        }
    return figures


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


def write_demo_report(
    out: pathlib.Path,
    result: Mapping[str, Any],
    audit: Mapping[str, Any],
    fair: Mapping[str, Any],
    synthesis: Mapping[str, Any],
    downstream: Mapping[str, Any],
) -> None:
    import pandas

    from evaluations.bias_report import add_attribute_section, add_gallery, limitations
    from evaluations.downstream_job import add_downstream_section
    from evaluations.report import Report
    from evaluations.synthesis_report import add_synthesis_section

    head = result["headline"]
    report = Report("dtk demo: auditing and rebalancing the embedded default",
                    created=result["created"])  # fmt: skip
    generated, guided = head["generated_minority_share"], head["fair_guidance_minority_share"]
    lines = [
        f"The training split holds {_pct(head['training_minority_share'])} `dark` images. "
        f"Asked for digits with the group left free, the generator draws "
        f"{_pct(generated['share'])} `dark` (95% interval {_pct(generated['ci_low'])} to "
        f"{_pct(generated['ci_high'])}); with `fair` guidance towards a uniform target, "
        f"{_pct(guided['share'])}.",
        f"Synthesis added {head['synthetic_images']} filtered images"
        + (
            f" ({head['synthesis_shortfall']} short of the plan)."
            if head["synthesis_shortfall"]
            else ", meeting the plan."
        ),
    ]
    real, synthetic = head.get("cnn_real"), head.get("cnn_synthetic")
    if real and synthetic:
        low, high = synthetic["gap_reduction_ci"]
        lines.append(
            f"A digit CNN's accuracy gap between groups is {real['gap']:.3f} on real data and "
            f"{synthetic['gap']:.3f} with the synthetic data: a reduction of "
            f"{_pct(synthetic['gap_reduction'])} (95% interval {_pct(low)} to {_pct(high)})."
        )
    report.heading("Summary", level=2)
    report.text("\n\n".join(lines))
    seconds = {**result["seconds"], "total": sum(result["seconds"].values())}
    report.table(
        pandas.DataFrame([{"stage": k, "time": duration(v)} for k, v in seconds.items()]),
        caption="Time per stage",
    )
    predictions = pandas.read_csv(out / "audit" / "predictions.csv", dtype=str)
    report.heading("1. Audit of the generator", level=2)
    add_attribute_section(report, GROUP, audit["attributes"][GROUP], level=3)
    add_gallery(report, GROUP, out / "audit" / "samples", predictions, by="digit")
    report.heading("2. Fair guidance", level=2)
    add_attribute_section(report, GROUP, fair["attributes"][GROUP], level=3)
    report.heading("3. Synthetic minority data", level=2)
    plan = pandas.DataFrame(synthesis["plan"])  # the plan with its outcome, as numbers
    synthetic_rows = pandas.read_csv(out / "synthesize" / "synthetic" / "metadata.csv", dtype=str)
    add_synthesis_section(report, out / "synthesize", synthesis, plan, synthetic_rows, level=3)
    add_downstream_section(report, downstream, heading="4. Downstream fairness")
    report.heading("Limitations", level=2)
    report.text(limitations(audit))
    report.text(
        "**This run's size.** The audits classify "
        f"{result['config']['n']} samples each and the downstream figures come from "
        f"{result['config']['seeds']} seeds per method: the intervals say how far to trust "
        "them (the t-intervals over seeds are not clipped to [0, 1]). The downstream test "
        "is the real colored-digits `test` split: the figures hold for that data, not "
        "beyond it."
    )
    report.config({"config": result["config"], "versions": result["versions"],
                   "stages": result["stages"]})  # fmt: skip
    report.write(out)
