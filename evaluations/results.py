"""A bias audit's results as types: the figures of one attribute's count table
(`ShareSummary`, from `evaluations.metrics.summarize`), what `evaluations.bias.audit_bias`
adds per attribute (`AttributeAudit`) and what it returns (`BiasResult`).

Reports and the command line read their attributes (``audit.groups["dark"].share``);
`to_json()` gives the layout of ``results.json`` (docs/fairness.md), plain JSON types with
NaN and infinities as null. The other evaluations keep their result types beside the code
that computes them: `evaluations.synthesis.SynthesisResult`,
`evaluations.downstream_job.DownstreamEvaluation`, `evaluations.demo.DemoResult`.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import TYPE_CHECKING, Any, ClassVar

from evaluations.common import jsonable, settings_json

if TYPE_CHECKING:
    import pandas

    from toolkit import GenerationSettings


@dataclasses.dataclass
class GroupShare:
    """One label: its count among the known predictions, its share of them (None when
    there are none) with the 95% Wilson interval, and its target share."""

    count: int
    share: float | None
    ci_low: float
    ci_high: float
    target: float


@dataclasses.dataclass
class MetricValue:
    """A distance from the target and its 95% bootstrap interval (None where undefined or
    infinite)."""

    value: float | None
    ci_low: float | None
    ci_high: float | None


@dataclasses.dataclass
class Corrected:
    """Shares corrected for the classifier's errors (black-box shift estimation), per label,
    and the metrics of those shares."""

    shares: dict[str, float | None]
    metrics: dict[str, float | None]

    def to_json(self) -> dict[str, Any]:
        groups = {label: {"share": share} for label, share in self.shares.items()}
        return {"groups": groups, "metrics": dict(self.metrics)}


@dataclasses.dataclass
class ShareSummary:
    """The figures of one attribute's counts (see `evaluations.metrics.summarize`)."""

    labels: list[str]
    #: every image counted, ``unknown`` (below the confidence threshold) included
    total: int
    unknown: int
    groups: dict[str, GroupShare]
    metrics: dict[str, MetricValue]
    #: the reference (e.g. training) shares per label, when a reference was given
    reference: dict[str, float] | None = None
    corrected: Corrected | None = None

    @property
    def unknown_share(self) -> float | None:
        return self.unknown / self.total if self.total else None

    def shares(self) -> dict[str, float | None]:
        return {label: group.share for label, group in self.groups.items()}

    def targets(self) -> dict[str, float]:
        return {label: group.target for label, group in self.groups.items()}

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "labels": list(self.labels),
            "total": self.total,
            "unknown": {"count": self.unknown, "share": self.unknown_share},
            "groups": {k: dataclasses.asdict(g) for k, g in self.groups.items()},
            "metrics": {k: dataclasses.asdict(m) for k, m in self.metrics.items()},
        }
        if self.reference is not None:
            data["reference"] = dict(self.reference)
        if self.corrected is not None:
            data["corrected"] = self.corrected.to_json()
        return jsonable(data)


@dataclasses.dataclass
class Calibration:
    """The classifier checked on labeled calibration images: per true label the counts of
    each prediction (``unknown`` included), the accuracy and errors of the confident
    predictions, the confusion matrix the correction uses (per true label: its columns)
    and whether that matrix is the identity (then the correction changes nothing)."""

    folder: str | None
    images: int
    unknown: int
    accuracy: float
    errors: int
    counts: dict[str, dict[str, int]]
    confusion: dict[str, dict[str, float]]
    identity: bool

    def accuracy_by_value(self) -> dict[str, float | None]:
        """Per true value, the share of its confident predictions that are right (None for a
        value with none): a classifier worse on one group manufactures bias."""
        accuracy: dict[str, float | None] = {}
        for value, predicted in self.counts.items():
            confident = sum(n for label, n in predicted.items() if label != "unknown")
            accuracy[value] = predicted.get(value, 0) / confident if confident else None
        return accuracy

    def to_json(self) -> dict[str, Any]:
        return jsonable({**dataclasses.asdict(self), "accuracy_by_value": self.accuracy_by_value()})


@dataclasses.dataclass
class AttributeAudit(ShareSummary):
    """One audited attribute: its `ShareSummary`, the same per value of ``--by`` (per prompt
    under a suite), the classifier's calibration check, which classifier plugin read the
    images, and a prompt suite's figures."""

    by: dict[str, ShareSummary] | None = None
    calibration: Calibration | None = None
    classifier: dict[str, str] = dataclasses.field(default_factory=dict)
    #: a prompt suite's figures (`evaluations.suites.SuiteSummary`)
    suite: Any = None

    @classmethod
    def of(cls, summary: ShareSummary, **extra: Any) -> AttributeAudit:
        fields = {f.name: getattr(summary, f.name) for f in dataclasses.fields(ShareSummary)}
        return cls(**fields, **extra)

    def to_json(self) -> dict[str, Any]:
        data = super().to_json()
        if self.by is not None:
            data["by"] = {value: part.to_json() for value, part in self.by.items()}
        if self.calibration is not None:
            data["calibration"] = self.calibration.to_json()
        data["classifier"] = dict(self.classifier)
        if self.suite is not None:
            data["suite"] = self.suite.to_json()
        return data


@dataclasses.dataclass
class BiasConfig:
    """What was audited and how: a folder (`images`) or samples of `model`."""

    out: str
    attributes: list[str]
    classifier: str
    classifier_options: dict[str, Any]
    min_confidence: float
    target: str | dict[str, float]
    reference: str | None
    by: str | None
    calibration: str | None
    bootstrap: int
    #: the audited images a person labeled, the calibration instead of `calibration`
    human_labels: str | None = None
    images: str | None = None
    model: str | None = None
    conditions: dict[str, str] | None = None
    n: int | None = None
    seed: int | None = None
    generation: GenerationSettings | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    #: a prompt suite: its file, and how many prompts it holds (`n` images each)
    prompts_file: str | None = None
    prompts: int | None = None

    @property
    def generated(self) -> bool:
        return self.images is None

    def to_json(self) -> dict[str, Any]:
        source: dict[str, Any] = {"images": self.images}
        if self.generated:
            generation = settings_json(self.generation)
            prompts = {"prompt": self.prompt, "negative_prompt": self.negative_prompt}
            generation.update({k: v for k, v in prompts.items() if v is not None})
            source = {"model": self.model, "conditions": self.conditions, "n": self.n,
                      "seed": self.seed, "generation": generation}  # fmt: skip
        if self.prompts_file is not None:
            source.update(prompts_file=self.prompts_file, prompts=self.prompts)
        extra = {} if self.human_labels is None else {"human_labels": self.human_labels}
        return jsonable({**source, **{key: getattr(self, key) for key in _BIAS_CONFIG_KEYS},
                         **extra})  # fmt: skip


# the config keys after the source's, in results.json's order
_BIAS_CONFIG_KEYS = ("out", "attributes", "classifier", "classifier_options", "min_confidence",
                     "target", "reference", "by", "calibration", "bootstrap")  # fmt: skip


@dataclasses.dataclass
class BiasResult:
    """`audit_bias`'s result: ``results.json`` (`to_json`), and for the report the folder of
    the audited images and the per-image predictions (``predictions.csv``)."""

    command: ClassVar[str] = "eval bias"

    created: str
    config: BiasConfig
    plugins: list[dict[str, str]]
    versions: dict[str, str]
    attributes: dict[str, AttributeAudit]
    image_root: pathlib.Path = dataclasses.field(repr=False, compare=False)
    predictions: pandas.DataFrame = dataclasses.field(repr=False, compare=False)
    #: two or more attributes: their joint counts and intersections
    #: (`evaluations.intersections.IntersectionalSummary`)
    intersection: Any = dataclasses.field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return jsonable({
            "command": self.command,
            "created": self.created,
            "config": self.config.to_json(),
            "plugins": self.plugins,
            "versions": self.versions,
            "attributes": {a: audit.to_json() for a, audit in self.attributes.items()},
            **({} if self.intersection is None
               else {"intersection": self.intersection.to_json()}),
        })  # fmt: skip
