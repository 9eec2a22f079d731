"""`dtk eval bias`: how far a generator's outputs are from a target distribution.

Images come from a model (generated here, with the audited attribute left unspecified) or
from any folder. An attribute-classifier plugin labels each image; predictions below
`min_confidence` count as ``unknown``. One count table per attribute (every label listed,
zero counts included) is the single source of every figure: shares with Wilson intervals,
Fairness Discrepancy, KL, total variation, mean absolute deviation (bootstrap intervals),
bias amplification against a reference folder, and shares corrected for the classifier's
own errors when a labeled calibration folder is given (`evaluations.metrics`); the
classifier's confusion counts and accuracy there are kept beside them, so a reader can see
why the correction moved the shares, or why it did not.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import toolkit
from evaluations import fidelity, metrics
from evaluations.common import (
    load_images,
    now,
    provenance,
    versions,
    write_csv,
    write_json,
)
from evaluations.intersections import IntersectionalSummary, audit_intersections
from evaluations.report import shown_path
from evaluations.results import (
    AttributeAudit,
    BiasConfig,
    BiasResult,
    Calibration,
    ShareSummary,
)
from evaluations.suites import PROMPT, Suite, read_suite, summarize_suite
from toolkit import natural_key

if TYPE_CHECKING:
    import pandas
    import torch

    from toolkit import GenerationSettings

UNKNOWN = "unknown"


def audit_bias(
    out: str | pathlib.Path,
    *,
    images: str | pathlib.Path | None = None,
    model: str | pathlib.Path | None = None,
    conditions: Mapping[str, str] | None = None,
    n: int = 400,
    seed: int = 0,
    generation: GenerationSettings | None = None,
    prompt: str | None = None,
    negative_prompt: str | None = None,
    prompts_file: str | pathlib.Path | None = None,
    attributes: Sequence[str] = ("group",),
    classifier: str = "cnn",
    classifier_options: Mapping[str, Any] | None = None,
    min_confidence: float = 0.7,
    target: str | Mapping[str, float] = "uniform",
    reference: str | pathlib.Path | None = None,
    by: str | None = None,
    calibration: str | pathlib.Path | None = None,
    human_labels: str | pathlib.Path | None = None,
    n_boot: int = 2000,
    progress: bool = True,
    report: bool = True,
) -> BiasResult:
    """Audit the images in `images`, or `n` images generated from `model` (default: the
    shipped generator) with `conditions`, for each of `attributes`. Writes
    ``results.json``, CSVs and (with `report`) ``report.html``/``report.md`` to `out`;
    returns the results.

    `target` is ``uniform``, shares (``light=0.5,dark=0.5``) or ``reference`` (the shares of
    the `reference` folder). `generation` says how the images are generated (a
    `toolkit.GenerationSettings`, or a mapping of its fields; default: its defaults);
    a text-to-image model takes `prompt` and `negative_prompt`, or a suite of prompts in
    `prompts_file` (`evaluations.suites`: `n` images per prompt, per-prompt shares, suite
    figures). The classifier plugin is created per attribute with ``attribute=NAME`` and
    `classifier_options` (strings, as from a command line, are converted by the plugin's
    option types).
    """
    audit = _Audit(
        out=pathlib.Path(out), images=images, model=model, conditions=dict(conditions or {}),
        n=n, seed=seed, settings=toolkit.GenerationSettings.from_mapping(generation),
        prompt=prompt, negative_prompt=negative_prompt, prompts_file=prompts_file,
        attributes=list(dict.fromkeys(attributes)), classifier=classifier,
        classifier_options=dict(classifier_options or {}), min_confidence=min_confidence,
        target=target, reference=reference, by=by, calibration=calibration,
        human_labels=human_labels, n_boot=n_boot,
        progress=progress,
    )  # fmt: skip
    # 1. every mistake a user can make, before an image is generated or read
    audit.check_options()
    classifiers = audit.classifiers()
    by = audit.by  # a suite breaks the shares down by prompt
    # 2. the images: generated into OUT/samples (a rerun resumes them), or the given folder
    folder = audit.samples()
    pixels, table = load_images(folder, [by] if by else [])
    # 3. per attribute: classify, count, and compare with the target
    # a sharded folder's rows keep where their images are (galleries, label sheets)
    located = [c for c in ("shard", "index") if c in table.columns]
    predictions = table[["file_name", *located] + ([by] if by else [])].copy()
    by_values = None if by is None else table[by].astype(str).tolist()
    references = _Comparisons.load(audit, folder, table)
    results = {
        attribute: audit.attribute(attribute, instance, pixels, by_values, predictions,
                                   references)
        for attribute, instance in classifiers.items()
    }  # fmt: skip
    # 4. two or more attributes: their intersections, from the same predictions
    intersection = audit.intersection(results, predictions) if len(results) > 1 else None
    # 5. results.json, the CSVs and the report
    result = BiasResult(created=now(), config=audit.config(), versions=versions(),
                        plugins=_plugins_used(classifier, folder), attributes=results,
                        image_root=folder, predictions=predictions,
                        intersection=intersection)  # fmt: skip
    _write(audit.out, result, report)
    return result


@dataclasses.dataclass
class _Audit:
    """One audit's options, and its steps (see `audit_bias`)."""

    out: pathlib.Path
    images: str | pathlib.Path | None
    model: str | pathlib.Path | None
    conditions: dict[str, str]
    n: int
    seed: int
    settings: GenerationSettings
    prompt: str | None
    negative_prompt: str | None
    prompts_file: str | pathlib.Path | None
    attributes: list[str]
    classifier: str
    classifier_options: dict[str, Any]
    min_confidence: float
    target: str | Mapping[str, float]
    reference: str | pathlib.Path | None
    by: str | None
    calibration: str | pathlib.Path | None
    human_labels: str | pathlib.Path | None
    n_boot: int
    progress: bool
    suite: Suite | None = None

    @property
    def target_is_reference(self) -> bool:
        return isinstance(self.target, str) and self.target.strip().lower() == "reference"

    def check_options(self) -> None:
        if not self.attributes:
            raise toolkit.DtkError("give at least one --attribute to audit")
        if not 0 <= self.min_confidence <= 1:
            raise toolkit.DtkError("--min-confidence must be in [0, 1]")
        if self.n_boot < 100:
            raise toolkit.DtkError("--bootstrap must be at least 100 resamples")
        if self.target_is_reference and self.reference is None:
            raise toolkit.DtkError("--target reference needs --reference DIR")
        fixed = sorted(set(self.conditions) & set(self.attributes))
        if fixed:
            raise toolkit.DtkError(
                f"the audited attribute {fixed[0]!r} is fixed by --condition; leave it "
                "unspecified so the audit sees what the model does on its own"
            )
        if self.prompts_file is not None:
            self._check_suite()
        if self.human_labels is not None and self.calibration is not None:
            raise toolkit.DtkError("give --calibration or --human-labels, not both")

    def _check_suite(self) -> None:
        """A suite replaces --prompt and breaks the shares down by prompt itself."""
        if self.prompt is not None:
            raise toolkit.DtkError("give --prompt or --prompts-file, not both")
        if self.by is not None:
            raise toolkit.DtkError("--prompts-file breaks the shares down by prompt; leave "
                                   "out --by")  # fmt: skip
        self.suite = read_suite(self.prompts_file)
        self.by = PROMPT
        if self.images is not None:
            _check_prompt_column(pathlib.Path(self.images), self.suite)

    def classifiers(self) -> dict[str, Any]:
        """One classifier per attribute, each checked to predict it, and the target checked
        against its labels before any compute."""
        made = {}
        for attribute in self.attributes:
            # from_strings converts string values by each option's type, takes others as given
            options = {**self.classifier_options, "attribute": attribute}
            instance = toolkit.create_plugin("attribute_classifier", self.classifier, options,
                                             from_strings=True)  # fmt: skip
            if instance.attribute != attribute:
                raise toolkit.DtkError(f"classifier {self.classifier!r} predicts "
                                       f"{instance.attribute!r}, not {attribute!r}")  # fmt: skip
            if not self.target_is_reference:
                toolkit.target_distribution(self.target, instance.labels, what="--target")
            made[attribute] = instance
        if self.images is not None:  # synthetic images: not by the classifier that chose them
            mine = {a: fidelity.identity(self.classifier, self.classifier_options, a)
                    for a in made}  # fmt: skip
            fidelity.check_independent(mine, fidelity.filtered_by(self.images),
                                       what="--classifier")  # fmt: skip
        return made

    def samples(self) -> pathlib.Path:
        """The folder of the audited images: `images`, or `n` samples generated now."""
        if self.images is not None:
            return pathlib.Path(self.images)
        folder = self.out / "samples"
        if self.suite is not None:  # n images of each prompt, prompt by prompt
            toolkit.generate(
                self.model, out=folder, n=self.n * len(self.suite.prompts), seed=self.seed,
                prompt=self.suite.sample_prompts(self.n), negative_prompt=self.negative_prompt,
                settings=self.settings, conditions=self.conditions or None,
                progress=self.progress,
            )  # fmt: skip
            return folder
        toolkit.generate(
            self.model, out=folder, n=self.n, seed=self.seed, prompt=self.prompt,
            negative_prompt=self.negative_prompt, settings=self.settings,
            conditions=_spread(self.model, self.conditions, self.by, self.n, self.settings),
            progress=self.progress,
        )  # fmt: skip
        return folder

    def attribute(self, attribute: str, classifier: Any, pixels: torch.Tensor,
                  by_values: list[str] | None, predictions: pandas.DataFrame,
                  references: _Comparisons) -> AttributeAudit:  # fmt: skip
        """Classify the images for `attribute` (their predictions added to `predictions`),
        count, summarize, and write its counts and shares CSVs."""
        labels = list(classifier.labels)
        predicted, confidence, top = _predict(classifier, pixels, self.min_confidence)
        predictions[f"{attribute}_predicted"] = predicted
        predictions[f"{attribute}_confidence"] = confidence
        predictions[f"{attribute}_top"] = top
        reference_counts = references.reference_counts(attribute, classifier, labels)
        shares = self.target_shares(attribute, labels, reference_counts)
        confusion, checked = references.calibration(attribute, classifier, labels)
        counts = metrics.count_table(predicted, labels, by=by_values, unknown=UNKNOWN)
        summary = metrics.summarize(
            counts["count" if self.by is None else "all"], shares,
            reference_counts=reference_counts, confusion=confusion, n_boot=self.n_boot,
            seed=self.seed,
        )  # fmt: skip
        used = provenance("attribute_classifier", self.classifier)
        suite = None
        if self.suite is not None:
            suite = summarize_suite(self.suite, attribute, predicted, by_values or [], labels,
                                    shares, n_boot=self.n_boot, seed=self.seed)  # fmt: skip
        audit = AttributeAudit.of(summary, by=self.breakdown(counts, shares),
                                  calibration=checked, classifier=used, suite=suite)  # fmt: skip
        # the attribute names a file: made a safe name, so no --attribute can lead out of OUT
        stem = toolkit.safe_name(attribute)
        write_csv(self.out / f"counts_{stem}.csv", counts.rename_axis(attribute), index=True)
        write_csv(self.out / f"shares_{stem}.csv", metrics.shares_frame(audit))
        if suite is not None:
            write_csv(self.out / f"suite_{stem}.csv", suite.frame())
        return audit

    def intersection(self, results: Mapping[str, AttributeAudit],
                     predictions: pandas.DataFrame) -> IntersectionalSummary:  # fmt: skip
        """The attributes' joint counts and the shares of their intersections (each cell
        against the product of the attributes' targets); the CSVs of both."""
        summary = audit_intersections(
            {a: predictions[f"{a}_predicted"].tolist() for a in results},
            {a: audit.labels for a, audit in results.items()},
            targets={a: audit.targets() for a, audit in results.items()},
            n_boot=self.n_boot, seed=self.seed,
        )  # fmt: skip
        write_csv(self.out / "counts_intersection.csv", summary.table)
        write_csv(self.out / "shares_intersection.csv", metrics.shares_frame(summary.joint))
        return summary

    def target_shares(self, attribute: str, labels: list[str],
                      reference_counts: pandas.Series | None) -> dict[str, float]:  # fmt: skip
        if not self.target_is_reference:
            return toolkit.target_distribution(self.target, labels, what="--target")
        assert reference_counts is not None
        known = reference_counts.drop(UNKNOWN)
        if known.sum() == 0:
            raise toolkit.DtkError(f"--reference holds no image with a known {attribute}")
        return {k: float(v) / float(known.sum()) for k, v in known.items()}

    def breakdown(self, counts: pandas.DataFrame, shares: Mapping[str, float]
                  ) -> dict[str, ShareSummary] | None:  # fmt: skip
        """With --by: the shares among the images of each value."""
        if self.by is None:
            return None
        return {
            str(value): metrics.summarize(counts[value], shares, n_boot=self.n_boot,
                                          seed=self.seed)
            for value in counts.columns
            if value != "all"
        }  # fmt: skip

    def config(self) -> BiasConfig:
        source: dict[str, Any] = {"images": shown_path(self.images)}
        if self.images is None:
            source = {"model": shown_path(self.model or toolkit.default_model()),
                      "conditions": self.conditions, "n": self.n, "seed": self.seed,
                      "generation": self.settings, "prompt": self.prompt,
                      "negative_prompt": self.negative_prompt}  # fmt: skip
        if self.suite is not None:
            source["prompts_file"] = shown_path(self.suite.path)
            source["prompts"] = len(self.suite.prompts)
        return BiasConfig(
            out=str(self.out), attributes=self.attributes, classifier=self.classifier,
            classifier_options=self.classifier_options, min_confidence=self.min_confidence,
            target=self.target if isinstance(self.target, str) else dict(self.target),
            reference=shown_path(self.reference), by=self.by,
            calibration=shown_path(self.calibration), bootstrap=self.n_boot,
            human_labels=shown_path(self.human_labels), **source,
        )  # fmt: skip


@dataclasses.dataclass
class _Comparisons:
    """The folders the audited shares are compared with: a reference (its counts give bias
    amplification, or the target) and labeled calibration images (the classifier's errors)."""

    audit: _Audit
    reference: tuple[torch.Tensor, pandas.DataFrame] | None
    calibration_data: tuple[torch.Tensor, pandas.DataFrame] | None

    @classmethod
    def load(cls, audit: _Audit, folder: pathlib.Path, table: pandas.DataFrame) -> _Comparisons:
        """The reference and the calibration images: a labeled folder, or the audited
        images a person labeled (`human_labels`, on `folder`, whose images `table` lists)."""
        calibration = None
        if audit.calibration is not None:
            calibration = load_images(audit.calibration, audit.attributes)
        elif audit.human_labels is not None:
            calibration = _human_labeled(pathlib.Path(audit.human_labels), folder, table,
                                         audit.attributes)  # fmt: skip
        reference = None if audit.reference is None else load_images(audit.reference)
        return cls(audit, reference, calibration)

    @property
    def calibration_source(self) -> str | None:
        if self.audit.human_labels is not None:
            return f"human labels {shown_path(self.audit.human_labels)}"
        return shown_path(self.audit.calibration)

    def reference_counts(self, attribute: str, classifier: Any, labels: list[str]
                         ) -> pandas.Series | None:  # fmt: skip
        if self.reference is None:
            return None
        return _reference_counts(self.reference, attribute, classifier, labels,
                                 self.audit.min_confidence)  # fmt: skip

    def calibration(self, attribute: str, classifier: Any, labels: list[str]
                    ) -> tuple[Any, Calibration | None]:  # fmt: skip
        if self.calibration_data is None:
            return None, None
        confusion, checked = _calibration(self.calibration_data, attribute, classifier, labels,
                                          self.audit.min_confidence)  # fmt: skip
        return confusion, Calibration(folder=self.calibration_source, **checked)


def _check_prompt_column(folder: pathlib.Path, suite: Suite) -> None:
    """An audited folder under a suite records each image's prompt, one of the suite's."""
    try:
        prompts = set(toolkit.read_metadata(folder, [PROMPT])[PROMPT])
    except toolkit.DtkError as exc:
        raise toolkit.DtkError(f"--images with --prompts-file: {exc}") from None
    foreign = sorted(prompts - set(suite.prompts))
    if foreign:
        raise toolkit.DtkError(f"--images: prompt {foreign[0]!r} is not in {suite.path}")


def _human_labeled(path: pathlib.Path, folder: pathlib.Path, table: pandas.DataFrame,
                  attributes: Sequence[str]) -> tuple[torch.Tensor, pandas.DataFrame]:  # fmt: skip
    """The audited images a person labeled (``dtk eval label-sheet``'s answers: a CSV of
    ``file_name`` and attribute columns, blank where they could not tell) with their labels,
    as calibration images."""
    import pandas

    try:
        answers = pandas.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise toolkit.DtkError(f"cannot read --human-labels {path}: {exc}") from None
    missing = [c for c in ("file_name", *attributes) if c not in answers.columns]
    if missing:
        raise toolkit.DtkError(f"--human-labels {path} has no {missing[0]!r} column")
    unknown = sorted(set(answers["file_name"]) - set(table["file_name"]))
    if unknown:
        raise toolkit.DtkError(f"--human-labels {path}: {unknown[0]!r} is not one of the "
                               f"audited images in {folder}")  # fmt: skip
    if answers.empty:
        raise toolkit.DtkError(f"--human-labels {path} labels no image")
    labeled = answers[["file_name"]].merge(table, on="file_name", how="left")
    pixels = toolkit.read_dataset_images(folder, labeled)
    return pixels, answers[["file_name", *attributes]]


def _write(out: pathlib.Path, result: BiasResult, report: bool) -> None:
    write_csv(out / "predictions.csv", result.predictions)
    write_json(out / "results.json", result.to_json())
    if report:
        from evaluations.bias_report import write_bias_report

        write_bias_report(out, result)


def _spread(
    model: str | pathlib.Path | None,
    conditions: Mapping[str, str] | None,
    by: str | None,
    n: int,
    settings: GenerationSettings,
) -> list[dict[str, str]] | dict[str, str] | None:
    """With ``--by ATTR`` on generated images, sample ``i`` asks for ATTR's ``i % k``-th value
    (unless the conditions fix it, or the guidance draws ATTR itself, as ``fair`` does for
    its attribute), so every value gets its share of the ``n`` samples."""
    if by is None or (conditions and by in conditions):
        return dict(conditions) if conditions else None
    space = toolkit.label_space(model if model is not None else toolkit.default_model())
    if _guidance_draws(settings, space, conditions, by):
        return dict(conditions) if conditions else None
    if space is None:
        raise toolkit.DtkError(
            f"--by {by}: the model has no attributes to spread the samples over; give "
            f"--condition {by}=VALUE, or a guidance that draws {by} (fair)"
        )
    values = space.attribute(by).values
    return [{**(conditions or {}), by: values[i % len(values)]} for i in range(n)]


def _predict(
    classifier: Any, pixels: torch.Tensor, min_confidence: float
) -> tuple[list[str], list[float], list[str]]:
    """Per image: the most probable label, or ``unknown`` below `min_confidence`; its
    probability; and the most probable label even below the threshold (for the gallery)."""
    probabilities = classifier.predict_proba(pixels).float().cpu()
    confidence, index = probabilities.max(dim=1)
    labels = list(classifier.labels)
    top = [labels[i] for i in index.tolist()]
    predicted = [
        label if c >= min_confidence else UNKNOWN for label, c in zip(top, confidence.tolist())
    ]
    return predicted, [round(c, 6) for c in confidence.tolist()], top


def _reference_counts(
    data: tuple[torch.Tensor, pandas.DataFrame],
    attribute: str,
    classifier: Any,
    labels: list[str],
    min_confidence: float,
) -> pandas.Series:
    """The reference folder's counts: its own labels if it has the column, else the
    classifier's predictions (so both sides carry the same classifier errors)."""
    pixels, table = data
    if attribute in table.columns:
        values = table[attribute].astype(str).tolist()
        foreign = sorted(set(values) - set(labels), key=natural_key)
        if foreign:
            raise toolkit.DtkError(
                f"--reference: {attribute} values {foreign} are not the classifier's labels "
                f"({', '.join(labels)})"
            )
    else:
        values, _, _ = _predict(classifier, pixels, min_confidence)
    return metrics.count_table(values, labels, unknown=UNKNOWN)["count"]


def _calibration(
    data: tuple[torch.Tensor, pandas.DataFrame],
    attribute: str,
    classifier: Any,
    labels: list[str],
    min_confidence: float,
) -> tuple[Any, dict[str, Any]]:
    """The confusion matrix the correction uses, and what the report shows of it: per true
    label the counts of each prediction (``unknown`` included), the accuracy of the confident
    predictions, and whether the matrix is the identity (then the correction is a no-op)."""
    pixels, table = data
    # a blank value is an image nobody could label (a human label sheet's "can't tell")
    values = table[attribute].astype(str).str.strip().tolist()
    labeled = [i for i, value in enumerate(values) if value]
    truth = [values[i] for i in labeled]
    foreign = sorted(set(truth) - set(labels), key=natural_key)
    if foreign:
        raise toolkit.DtkError(f"calibration: {attribute} value {foreign[0]!r} is not one of the "
                               f"classifier's labels ({', '.join(labels)})")  # fmt: skip
    predicted, _, _ = _predict(classifier, pixels[labeled], min_confidence)
    # unknown predictions are left out of the audited shares, so of the calibration too
    kept = [(t, p) for t, p in zip(truth, predicted) if p != UNKNOWN]
    if not kept:
        raise toolkit.DtkError(f"--calibration: no image got a confident {attribute} prediction")
    confusion = metrics.confusion_matrix([t for t, _ in kept], [p for _, p in kept], labels)
    pairs = collections.Counter(zip(truth, predicted))
    counts = {t: {p: pairs[t, p] for p in [*labels, UNKNOWN]} for t in labels}
    correct = sum(1 for t, p in kept if t == p)
    checked = {
        "images": len(truth),
        "unknown": len(truth) - len(kept),
        "accuracy": correct / len(kept),
        "errors": len(kept) - correct,
        "counts": counts,
        # C[i, j] = P(pred = i | true = j), written per true label: C's columns
        "confusion": {
            t: {p: float(confusion[i, j]) for i, p in enumerate(labels)}
            for j, t in enumerate(labels)
        },
        # every label has calibration images (confusion_matrix checks), so no error = identity
        "identity": correct == len(kept),
    }
    return confusion, checked


def _plugins_used(classifier: str, folder: pathlib.Path) -> list[dict[str, str]]:
    """The classifier, then the plugins that made the images, as the folder's run.json (one
    `toolkit.generate` wrote) records them; a folder from elsewhere has none."""
    used = [provenance("attribute_classifier", classifier)]
    run_file = folder / "run.json"
    if run_file.is_file():
        used += json.loads(run_file.read_text()).get("plugins", [])
    return used


def _guidance_draws(
    settings: GenerationSettings, space: Any, conditions: Mapping[str, str] | None, by: str
) -> bool:
    """Whether the run's guidance draws `by` itself: its `assign` hook adds `by` to a
    sample's condition. Then --by reads what it drew from the metadata."""
    if settings.guidance is None:
        return False
    guidance = toolkit.create_plugin("guidance", settings.guidance, settings.guidance_options,
                                     from_strings=settings.options_from_strings)  # fmt: skip
    assign = toolkit.optional_member("guidance", guidance, "assign")
    if assign is None:
        return False
    # the attributes as `toolkit.generate` hands them over (none for a text-to-image model)
    attributes = {} if space is None else {a.name: list(a.values) for a in space.attributes}
    return by in assign(dict(conditions or {}), 0, attributes)
