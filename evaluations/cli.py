"""``dtk eval bias``, ``dtk eval downstream``, ``dtk synthesize`` and ``dtk demo``.

They join ``dtk`` through the ``dtk.commands`` entry-point group (pyproject.toml), so
`toolkit` never imports `evaluations`. Keep module-level imports light (no torch): ``dtk
--help`` lists these commands. A `toolkit.DtkError` raised here is reported by ``dtk`` as
one line with exit status 2.
"""

from __future__ import annotations

import math
import pathlib
from typing import TYPE_CHECKING, Any

import click

import toolkit
from evaluations import defaults
from toolkit import parse_key_values

if TYPE_CHECKING:
    import pandas

    from evaluations.demo import DemoResult
    from evaluations.fidelity import Fidelity
    from evaluations.results import BiasResult

PATH = click.Path(path_type=pathlib.Path)
EXISTING = click.Path(path_type=pathlib.Path, exists=True, file_okay=False)


def classifier_options(classifier_help: str) -> Any:
    """``--classifier NAME`` and repeatable ``--classifier-option KEY=VALUE``."""

    def decorate(function: Any) -> Any:
        function = click.option(
            "--classifier-option", multiple=True, metavar="KEY=VALUE",
            help="Option of the classifier plugin, e.g. path=clip-folder or labels=a,b. "
            "Repeatable.",
        )(function)  # fmt: skip
        return click.option("--classifier", default="cnn", show_default=True, help=classifier_help)(
            function
        )

    return decorate


def _settings(kw: dict[str, Any]) -> toolkit.GenerationSettings:
    """The generation settings from the options `toolkit.generation_options` added (popped
    from `kw`), checked before the command writes anything."""
    settings = toolkit.settings_from_cli(kw)
    _check_settings(settings, kw.get("model"))
    return settings


def _check_settings(settings: toolkit.GenerationSettings, model: Any = None) -> None:
    """The settings (against `model`'s defaults) and the device, before the command writes
    anything (each run checks the settings again)."""
    toolkit.check_settings(settings, model)
    toolkit.resolve_device(settings.device)


@click.group("eval")
def eval_group() -> None:
    """Fairness evaluations: bias audits of a generator's outputs, and downstream fairness
    of classifiers trained with synthetic data."""


@eval_group.command("bias")
@click.option(
    "--model",
    type=PATH,
    help="Generator folder to audit, or a shipped model's name (digits, text-digits). "
    "Default: digits.",
)
@click.option("--images", type=EXISTING, help="Audit this image folder instead of generating.")
@click.option(
    "--condition", "conditions", multiple=True, metavar="KEY=VALUE",
    help="Fixed attribute for every generated sample (leave the audited attribute out).",
)  # fmt: skip
@click.option(
    "-n",
    "--num",
    "n",
    type=int,
    default=400,
    show_default=True,
    help="Samples (per prompt with --prompts-file).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@toolkit.generation_options()
@click.option(
    "--attribute", "attributes", multiple=True, default=("group",), show_default=True,
    help="Attribute to audit; repeatable: with two or more, their intersections too (the "
    "joint counts, each cell's share against the product of the targets, the smallest "
    "cell).",
)  # fmt: skip
@classifier_options("Attribute-classifier plugin (created with attribute=NAME).")
@click.option("--prompt", help="Prompt for every sample (text-to-image models).")
@click.option(
    "--prompts-file",
    help="A prompt suite: a CSV with a 'prompt' column (other columns group the prompts), "
    "or a shipped suite's name (digits-neutral, occupations). "
    "-n images per prompt; per-prompt shares, the suite's mean skew and share of prompts "
    "beyond 90/10 with intervals, the most and least skewed prompts.",
)  # fmt: skip
@click.option("--negative-prompt", help="Negative prompt (text-to-image models).")
@click.option(
    "--min-confidence", type=float, default=0.7, show_default=True,
    help="Predictions less confident than this count as 'unknown'.",
)  # fmt: skip
@click.option(
    "--target", default="uniform", show_default=True,
    help="uniform, shares like light=0.5,dark=0.5, or 'reference' (the --reference shares).",
)  # fmt: skip
@click.option(
    "--reference", type=EXISTING,
    help="A reference (e.g. training) dataset folder: adds bias amplification.",
)  # fmt: skip
@click.option("--by", help="Break the shares down by this condition (metadata) column.")
@click.option(
    "--calibration", type=EXISTING,
    help="Labeled dataset folder: estimate the classifier's confusion matrix and report "
    "shares corrected for its errors.",
)  # fmt: skip
@click.option(
    "--human-labels", type=click.Path(path_type=pathlib.Path, exists=True, dir_okay=False),
    help="A person's labels of some audited images (dtk eval label-sheet's answers CSV: "
    "file_name and attribute columns, blank where they could not tell), used as --calibration.",
)  # fmt: skip
@click.option("--bootstrap", "n_boot", type=int, default=2000, show_default=True)
@click.option("--out", type=PATH, default=pathlib.Path("dtk-bias"), show_default=True)
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def bias_command(**kw: Any) -> None:
    """How biased are a generator's outputs? Classify each image's ATTRIBUTE, count, and
    compare the shares to a target.

    Writes OUT/results.json (per attribute: groups with count, share and 95% interval;
    Fairness Discrepancy, KL, total variation, mean absolute deviation and, with
    --reference, bias amplification), predictions.csv, counts and shares CSVs, report.html
    and report.md.

    \b
    Examples:
      dtk eval bias --out audit                        # the shipped generator, no condition
      dtk eval bias --by digit --reference train --out audit
      dtk eval bias --images other-generator-output/ --target light=0.7,dark=0.3
      dtk eval bias --model sd-folder --prompt "a photo of a doctor" --attribute gender \\
          --classifier clip --classifier-option path=clip-folder \\
          --classifier-option labels=female,male --out audit
      dtk eval bias --guidance fair --by group --out audit-fair   # did fair guidance work?
      dtk eval bias --model text-digits --prompts-file digits-neutral -n 200 --out suite
      dtk eval bias --model sd-folder --prompt "a photo of a doctor" \\
          --attribute gender --attribute skin_tone --classifier clip \\
          --classifier-option path=clip-folder --classifier-option words=words.toml \\
          --guidance fair --guidance-option attribute=gender \\
          --guidance-option words=words.toml --by gender --out audit-fair
    """
    from evaluations.bias import audit_bias

    _check_bias(kw)
    quiet = kw.pop("quiet")
    result = audit_bias(
        kw.pop("out"),
        conditions=parse_key_values(kw.pop("conditions"), what="--condition"),
        classifier_options=parse_key_values(kw.pop("classifier_option"),
                                            what="--classifier-option"),
        generation=_settings(kw),
        progress=not quiet,
        **kw,
    )  # fmt: skip
    _bias_summary(result)


def _check_bias(kw: dict[str, Any]) -> None:
    """What ``eval bias`` can check from its options alone, before any work."""
    if kw["images"] is not None and kw["model"] is not None:
        raise toolkit.DtkError("give --model or --images, not both")
    toolkit.check_writable(kw["out"])
    if kw["images"] is None:  # the samples are seeds seed .. seed + n - 1
        toolkit.check_positive("-n", kw["n"])
        toolkit.check_seed(kw["seed"], kw["n"], what="--seed")
    toolkit.check_fraction("--min-confidence", kw["min_confidence"])


def _bias_summary(result: BiasResult) -> None:
    """Per attribute, one line: each share with its interval, and the Fairness Discrepancy."""
    for attribute, audit in result.attributes.items():
        parts = [
            f"{label} {g.share:.3f} [{g.ci_low:.3f}, {g.ci_high:.3f}]"
            for label, g in audit.groups.items()
            if g.share is not None
        ]
        fd = audit.metrics["fairness_discrepancy"].value
        fd_text = "n/a" if fd is None else f"{fd:.3f}"
        click.echo(f"{attribute}: {'; '.join(parts)}; FD {fd_text}", err=True)
    click.echo(f"report: {pathlib.Path(result.config.out) / 'report.html'}", err=True)


@eval_group.command("compare")
@click.argument("audit_a", type=click.Path(path_type=pathlib.Path, exists=True))
@click.argument("audit_b", type=click.Path(path_type=pathlib.Path, exists=True))
@click.option(
    "--attribute",
    "attributes",
    multiple=True,
    help="Attribute to compare; repeatable. Default: every one both audited.",
)
@click.option(
    "--label",
    "focus",
    help="The value whose share the tables show. Default: A's least represented.",
)
@click.option(
    "--name",
    "names",
    multiple=True,
    help="What to call A and B in the report; give twice (default: A, B).",
)
@click.option(
    "--correction",
    type=click.Choice(["holm", "fdr_bh"]),
    default="holm",
    show_default=True,
    help="Multiple-testing correction of the per-row p-values: Holm (family-wise "
    "error) or Benjamini-Hochberg (false discovery rate).",
)
@click.option(
    "--alpha",
    type=float,
    default=0.05,
    show_default=True,
    help="A row differs when its corrected p-value is below this.",
)
@click.option(
    "--counts-attribute",
    default="value",
    show_default=True,
    help="The attribute's name for an AUDIT given as a counts CSV.",
)
@click.option("--bootstrap", "n_boot", type=int, default=2000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="The bootstrap's seed.")
@click.option("--out", type=PATH, default=pathlib.Path("dtk-compare"), show_default=True)
def compare_command(**kw: Any) -> None:
    """Compare two bias audits, row by row: model A against model B, or a model with and
    without a mitigation (run both audits with the same seeds and prompts).

    AUDIT_A and AUDIT_B are `dtk eval bias` output folders (suite audits are compared per
    prompt, --by audits per value, others as a whole), or CSV files of published counts
    (a 'prompt' column and one column of counts per value). Per row: the share of --label
    in each with Wilson intervals, the difference with Newcombe's interval, Fisher's exact
    (two values) or chi-squared test with corrected p-values, each side's skew. Over the
    rows: each mean skew and its change, with BCa intervals.

    Writes OUT/comparison.json, OUT/comparison_<attribute>.csv, report.html and report.md.

    \b
    Examples:
      dtk eval bias --model text-digits --prompts-file digits-neutral --out plain
      dtk eval bias --model text-digits --prompts-file digits-neutral \\
          --guidance fair --guidance-option values=dark,light \\
          --guidance-option "edit_prompt={prompt} on {value} paper" \\
          --guidance-option mode=prompt --out fair
      dtk eval compare plain fair --name unguided --name fair --out compare
      dtk eval compare docs/examples/fair-diffusion/stable-diffusion.csv \\
          docs/examples/fair-diffusion/fair-diffusion.csv --counts-attribute gender
    """
    from evaluations.compare import compare_audits

    names = tuple(kw.pop("names")) or ("A", "B")
    if len(names) != 2 or names[0] == names[1]:
        raise toolkit.DtkError("--name takes two different names, one per audit (A, then B)")
    result = compare_audits(kw.pop("audit_a"), kw.pop("audit_b"), kw.pop("out"),
                            attributes=kw.pop("attributes"), names=names, **kw)  # fmt: skip
    for attribute, c in result.attributes.items():
        change = c.mean_skew_change
        shown = "n/a" if change.value is None else (
            f"{change.value:+.3f} [{change.ci_low:+.3f}, {change.ci_high:+.3f}]")  # fmt: skip
        click.echo(f"{attribute}: mean skew {_number(c.mean_skew_a.value)} -> "
                   f"{_number(c.mean_skew_b.value)} ({shown}); {len(c.significant())} of "
                   f"{len(c.rows)} row(s) differ", err=True)  # fmt: skip


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


@eval_group.command("label-sheet")
@click.argument("audit", type=EXISTING)
@click.option(
    "--n",
    "n",
    type=int,
    default=100,
    show_default=True,
    help="Images to label, stratified by the classifier's prediction.",
)
@click.option("--attribute", help="The attribute to label. Default: the audit's first.")
@click.option("--seed", type=int, default=0, show_default=True, help="Which images are drawn.")
@click.option("--out", type=PATH, default=pathlib.Path("dtk-label-sheet"), show_default=True)
def label_sheet_command(**kw: Any) -> None:
    """Write a sheet for a person to label a random sample of an audit's images, so the
    classifier's accuracy per group is measured on the audited images themselves.

    AUDIT is a `dtk eval bias` output folder. The sample is stratified by the classifier's
    prediction (as many of each predicted value as there are, up to an equal share) and
    shown in random order, without the predictions. Writes OUT/label-sheet.html (open it,
    choose a value or "can't tell" under each image, press Save answers), a blank
    OUT/label-sheet.csv for a spreadsheet instead, and OUT/label-sheet.json. Feed the
    answers back with the audit's own options plus --human-labels.

    \b
    Examples:
      dtk eval bias --out audit
      dtk eval label-sheet audit --n 100 --out sheet
      dtk eval bias --out audit --human-labels label-sheet-answers.csv
    """
    from evaluations.label_sheet import write_label_sheet

    sheet = write_label_sheet(kw["audit"], kw["out"], n=kw["n"], attribute=kw["attribute"],
                              seed=kw["seed"])  # fmt: skip
    strata = ", ".join(f"{count} {value}" for value, count in sheet.strata.items())
    click.echo(f"{len(sheet.files)} images ({strata}): {sheet.folder / 'label-sheet.html'}",
               err=True)  # fmt: skip


@click.command("synthesize")
@click.option(
    "--data", type=EXISTING,
    help="Real dataset folder with attribute columns. Default: the colored-digits train split.",
)  # fmt: skip
@click.option("--model", type=PATH, help="Generator trained on it. Default: the shipped one.")
@click.option("--attribute", default="group", show_default=True, help="The group attribute.")
@click.option(
    "--by", default="digit", show_default=True,
    help="Balance within each value of this column ('' for the whole set).",
)  # fmt: skip
@click.option(
    "--target", default="balanced", show_default=True,
    help="balanced, or shares like light=0.5,dark=0.5.",
)  # fmt: skip
@click.option("--budget", type=int, help="Generate exactly N images, where they help most.")
@click.option(
    "--filters", default="label_consistency,memorization", show_default=True,
    help="Comma-separated synthesis filters ('' for none).",
)  # fmt: skip
@click.option(
    "--consistency-threshold", type=float,
    help="The probability label_consistency's classifier must give each requested value. "
    f"Default: {defaults.SYNTHESIS_CONSISTENCY_THRESHOLD} with a label-conditioned model "
    "(what makes the accepted images as readable as real ones to an independent judge), "
    f"{defaults.TEXT_CONSISTENCY_THRESHOLD} with a text-to-image model.",
)  # fmt: skip
@click.option("--memorization-threshold", type=float, default=0.03, show_default=True)
@click.option(
    "--max-rounds", type=int, default=8, show_default=True,
    help="Generation rounds (the first plus retries of rejected samples).",
)  # fmt: skip
@click.option(
    "--prompt-template",
    help="Text-to-image models: the prompt of a cell, with {ATTRIBUTE} and {BY} fields, "
    "e.g. 'a photo of a {gender} {occupation}'.",
)
@click.option("--negative-prompt", help="Text-to-image models: the negative prompt.")
@click.option(
    "--words", type=PATH, metavar="FILE",
    help="With --prompt-template: a TOML words file ([gender] female = \"woman\") whose "
    "words fill the template's fields instead of the values; metadata keeps the values.",
)  # fmt: skip
@classifier_options("Attribute-classifier plugin of the label_consistency filter.")
@click.option(
    "--judge", default="auto", show_default=True,
    help="Attribute-classifier plugin that reads the accepted images afterwards, and real "
    "ones of the same cells (fidelity, in results.json and the report); never the filter's "
    "own classifier. auto: the shipped mlp judges where the filter is the shipped cnn; "
    "none: no judge.",
)  # fmt: skip
@click.option(
    "--judge-option", multiple=True, metavar="KEY=VALUE",
    help="Option of the judge plugin, e.g. path=judge-folder. Repeatable.",
)  # fmt: skip
@click.option(
    "--judge-data", type=EXISTING,
    help="Real labeled images the judge reads for comparison (ones it did not learn from). "
    "Default: the colored-digits test split with the default data, else --data.",
)  # fmt: skip
@click.option("--seed", type=int, default=0, show_default=True)
@toolkit.generation_options(
    steps_help=f"{defaults.SYNTHESIS_STEPS} with a label-conditioned model; a text-to-image "
    "model's own, as for dtk generate (SD 3 and Flux dev: 28, LCM and Flux schnell: 4, ...)",
    guidance_help="cfg at scale 0.75 with a label-conditioned model (varied samples, which "
    "the filters check); a text-to-image model's own (cfg 7.5 for SD, none for Flux and LCM)",
    filters=False,
)
@toolkit.engine_options
@toolkit.format_options
@click.option("--out", type=PATH, default=pathlib.Path("dtk-synthetic"), show_default=True)
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def synthesize_command(**kw: Any) -> None:
    """Make the missing data: plan per class x group, generate, filter, retry.

    Prints the plan (have / want / generate per cell), then generates each cell's images
    conditioned on its class and group. The label_consistency filter makes the attribute
    classifiers confirm both values; memorization rejects near copies of training images.
    Rejected samples are regenerated with new seeds, up to --max-rounds.

    An independent judge (--judge; by default the shipped mlp classifiers, another family
    than the cnn filters) then reads the accepted images and real ones of the same cells:
    the share read as requested, synthetic against real, with intervals. The filter's own
    classifier would pass every accepted image.

    Writes OUT/synthetic/ (a dataset folder, column synthetic=True), OUT/combined.csv (real +
    synthetic, ready for training), plan.csv, results.json, report.html and report.md.
    With --format webdataset or parquet, the rounds and OUT/synthetic hold shards, and
    combined.csv names each sharded row's shard and index. Rerunning the same command
    resumes.

    \b
    Examples:
      dtk synthesize --out synth                       # balance the colored-digits groups
      dtk synthesize --data my-data --model my-gen --attribute group --by label --out synth
      dtk synthesize --budget 500 --target light=0.6,dark=0.4 --out synth
      dtk synthesize --budget 100000 --format webdataset --engine ray --workers 8 --out synth
      dtk synthesize --model sd-folder --data photos --attribute gender --by occupation \\
          --prompt-template "a photo of a {gender} {occupation}" --classifier clip \\
          --classifier-option path=clip-folder --classifier-option labels=female,male
      dtk synthesize --model sd-folder --data photos --attribute gender --by occupation \\
          --prompt-template "a photo of a {gender} {occupation}" --words words.toml \\
          --classifier clip --classifier-option path=clip-folder \\
          --classifier-option words=words.toml
    """
    from evaluations.synthesis import synthesize

    _check_synthesize(kw)
    filters = [f.strip() for f in kw.pop("filters").split(",") if f.strip()]
    generation = _settings(kw)
    kw["classifier_options"] = parse_key_values(kw.pop("classifier_option"),
                                                what="--classifier-option")  # fmt: skip
    kw["judge_options"] = parse_key_values(kw.pop("judge_option"), what="--judge-option")
    kw["judge"] = None if kw["judge"] in ("none", "") else kw["judge"]
    quiet, out, by = kw.pop("quiet"), kw.pop("out"), kw.pop("by") or None
    kw["format"] = kw.pop("fmt")
    result = synthesize(out, by=by, filters=filters, generation=generation,
                        progress=not quiet, on_plan=_show_plan, **kw)  # fmt: skip
    shortfall = f", {result.shortfall} short of the plan" if result.shortfall else ""
    click.echo(
        f"{result.accepted} of {result.planned} planned images accepted{shortfall}; "
        f"synthetic data in {out / 'synthetic'}, manifest {out / 'combined.csv'}",
        err=True,
    )
    if result.fidelity is not None:
        click.echo(_fidelity_line(result.fidelity), err=True)


def _fidelity_line(fidelity: Fidelity) -> str:
    """The judge's overall reading per attribute, synthetic against real, in one line."""
    parts = [f"{r.attribute} {r.synthetic.share:.3f} vs {r.real.share:.3f} real "
             f"({r.difference.value:+.3f} [{r.difference.ci_low:+.3f}, "
             f"{r.difference.ci_high:+.3f}])"
             for r in fidelity.overall() if r.difference.value is not None]  # fmt: skip
    return f"judged by {fidelity.judge} as requested: " + "; ".join(parts)


def _check_synthesize(kw: dict[str, Any]) -> None:
    """What ``synthesize`` can check from its options alone, before any work."""
    toolkit.check_writable(kw["out"])
    if kw["budget"] is not None:
        toolkit.check_positive("--budget", kw["budget"])
    toolkit.check_positive("--max-rounds", kw["max_rounds"])
    # each round takes the seeds after the previous round's and retries at most what that
    # round made, so a run uses at most planned x rounds seeds (planned is --budget if given)
    toolkit.check_seed(kw["seed"], (kw["budget"] or 1) * kw["max_rounds"], what="--seed")
    if kw["consistency_threshold"] is not None:
        toolkit.check_fraction("--consistency-threshold", kw["consistency_threshold"])
    toolkit.check_fraction("--memorization-threshold", kw["memorization_threshold"],
                           high=math.inf)  # fmt: skip


def _show_plan(plan: pandas.DataFrame) -> None:
    click.echo(f"plan ({int(plan['generate'].sum())} images to generate):", err=True)
    click.echo(plan.to_string(index=False), err=True)


DEFAULT_METHODS = "real,oversample,jitter,synthetic,pretrain_finetune"


@eval_group.command("downstream")
@click.option(
    "--real", type=EXISTING,
    help="Real training dataset folder. Default: the colored-digits train split.",
)  # fmt: skip
@click.option(
    "--test", type=EXISTING,
    help="Test dataset folder holding every group. Default: the colored-digits test split.",
)  # fmt: skip
@click.option(
    "--synthetic", type=EXISTING,
    help="Synthetic dataset folder (e.g. OUT/synthetic of dtk synthesize).",
)  # fmt: skip
@click.option("--label", default="digit", show_default=True, help="What the classifier predicts.")
@click.option("--attribute", default="group", show_default=True, help="The group attribute.")
@click.option("--seeds", type=int, default=5, show_default=True, help="Runs per method.")
@click.option("--models", default="cnn", show_default=True, help="Comma-separated: cnn, logreg.")
@click.option(
    "--methods", default=DEFAULT_METHODS, show_default=True,
    help="Comma-separated training methods (synthetic ones need --synthetic).",
)  # fmt: skip
@click.option("--steps", type=int, help="Optimizer steps per run (default: per model).")
@click.option(
    "--threads", type=int, default=1, show_default=True,
    help="torch threads while training (these small networks run fastest on one).",
)  # fmt: skip
@click.option("--device", default="cpu", show_default=True)
@click.option("--out", type=PATH, default=pathlib.Path("dtk-downstream"), show_default=True)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def downstream_command(**kw: Any) -> None:
    """Does synthetic data make a classifier fairer? Train a LABEL classifier under each
    method, several seeds each, and compare accuracy per ATTRIBUTE group on the test set.

    \b
    Methods:
      real               the real data only
      oversample         the minority duplicated up to the majority (trivial baseline)
      jitter             generic color-jitter augmentation (reported win or lose)
      synthetic          real + synthetic pooled
      pretrain_finetune  synthetic first, then real

    Reports accuracy, worst-group accuracy and the gap (fairlearn MetricFrame), mean and 95%
    interval over seeds, and the gap reduction against real-only, paired by seed. Writes
    OUT/results.json, runs.csv, summary.csv, report.html and report.md.

    \b
    Example:
      dtk synthesize --out synth
      dtk eval downstream --synthetic synth/synthetic --out downstream
    """
    from evaluations.downstream_job import evaluate_downstream, summary_table

    out = kw["out"]
    # everything is checked before the default data is written
    methods, models = _check_downstream(kw)
    real = kw["real"] or _colored_digits(out, "train", quiet=kw["quiet"])
    test = kw["test"] or _colored_digits(out, "test", quiet=kw["quiet"])
    evaluation = evaluate_downstream(
        out, real, test, kw["synthetic"], label=kw["label"], attribute=kw["attribute"],
        methods=methods, models=models, seeds=kw["seeds"], steps=kw["steps"],
        device=kw["device"], threads=kw["threads"], progress=not kw["quiet"],
    )  # fmt: skip
    click.echo(summary_table(evaluation).to_string(index=False), err=True)
    click.echo(f"report: {out / 'report.html'}", err=True)


def _check_downstream(kw: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The options of ``eval downstream``, checked; the methods and models chosen."""
    from evaluations.downstream import METHODS, MODELS, NEEDS_SYNTHETIC

    toolkit.check_writable(kw["out"])
    toolkit.check_positive("--seeds", kw["seeds"])
    toolkit.check_positive("--threads", kw["threads"])
    if kw["steps"] is not None:
        toolkit.check_positive("--steps", kw["steps"])
        if kw["steps"] < 2:
            raise toolkit.DtkError(f"--steps must be at least 2 (pretrain_finetune halves it), "
                                   f"got {kw['steps']}")  # fmt: skip
    models, methods = _choices(kw, "models", MODELS), _choices(kw, "methods", METHODS)
    toolkit.resolve_device(kw["device"])
    # methods asked for by name need their data; the default ones without it are skipped
    # by run_downstream, which says so in the results and the report
    needing = [m for m in methods if m in NEEDS_SYNTHETIC]
    if kw["synthetic"] is None and needing and kw["methods"] != DEFAULT_METHODS:
        raise toolkit.DtkError(f"method {needing[0]!r} needs --synthetic DIR")
    return methods, models


def _choices(kw: dict[str, Any], option: str, known: tuple[str, ...]) -> list[str]:
    """The comma-separated names of --OPTION, each one of `known`."""
    chosen = [m.strip() for m in kw[option].split(",") if m.strip()]
    unknown = [m for m in chosen if m not in known]
    if unknown or not chosen:
        what = f"unknown {option[:-1]} {unknown[0]!r}" if unknown else "none given"
        raise toolkit.DtkError(f"--{option}: {what}; choose from: {', '.join(known)}")
    return chosen


def _colored_digits(out: pathlib.Path, split: str, *, quiet: bool) -> pathlib.Path:
    """The default data: a colored-digits split, written to OUT/data/SPLIT."""
    folder = out / "data" / split
    toolkit.write_colored_digits(folder, split, progress=not quiet)
    return folder


@click.command("demo")
@click.option("--out", type=PATH, default=pathlib.Path("dtk-demo"), show_default=True)
@click.option("-n", "--num", "n", type=int, default=400, show_default=True,
              help="Samples per audit.")  # fmt: skip
@click.option("--seeds", type=int, default=5, show_default=True, help="Downstream runs per method.")
@click.option(
    "--budget", type=int,
    help="Cap the synthetic images, for a quicker look (default: balance every digit).",
)  # fmt: skip
@toolkit.generation_options(
    steps=defaults.DEMO_STEPS,
    guidance_help="cfg (scale 2) for the audit, cfg (scale 0.75) for synthesis; the fair "
    "guidance audit always uses fair",
    filters=False,
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def demo_command(**kw: Any) -> None:
    """The fairness workflow end to end on the embedded default, in a few minutes on a CPU:
    audit the shipped generator, fix its bias with fair guidance, synthesize the missing
    minority data, and test whether it makes a digit classifier fairer.

    The generation options apply to every stage that generates, with two exceptions: the
    fair-guidance audit uses the fair guidance, and synthesis keeps its own --steps (20).

    Writes OUT/report.html (start there), report.md and results.json, and one folder per
    stage (audit/, audit-fair/, synthesize/, downstream/) with its own report. Rerunning
    resumes the generation stages.
    """
    from evaluations.demo import run_demo

    out = kw.pop("out")
    # everything is checked before the first stage writes its data
    toolkit.check_writable(out)  # (run_demo checks -n before it writes)
    toolkit.check_positive("--seeds", kw["seeds"])
    if kw["budget"] is not None:
        toolkit.check_positive("--budget", kw["budget"])
    generation = _settings(kw)
    result = run_demo(out, generation=generation, progress=not kw.pop("quiet"), **kw)
    _demo_summary(out, result)


def _demo_summary(out: pathlib.Path, result: DemoResult) -> None:
    """The minority's share in training, generated and under fair guidance; the CNN's
    accuracy and gap per method; where the report is."""
    head = result.headline
    click.echo(f"minority share: training {head.training_minority_share:.3f}, generated "
               f"{head.generated_minority_share.share:.3f}, with fair guidance "
               f"{head.fair_guidance_minority_share.share:.3f}", err=True)  # fmt: skip
    for method, figures in head.cnn.items():
        click.echo(f"cnn {method:>17}: accuracy {figures.accuracy:.3f}, gap "
                   f"{figures.gap:.3f}", err=True)  # fmt: skip
    click.echo(f"report: {out / 'report.html'} ({sum(result.seconds.values()):.0f} s)",
               err=True)  # fmt: skip
