"""`dtk synthesize`: generate the images a dataset is missing, by a plan.

1. **Plan** (`make_plan`): count the real images per class (`by`) and group (`attribute`),
   and decide how many to generate in each cell so every class matches the target shares
   without discarding real data — or, with a budget, where N images best close the gap.
2. **Generate** each cell's images with its class and group as the condition, through the
   safety-filter plugins ``label_consistency`` (the classifiers must confirm both values) and
   ``memorization`` (no near copy of a training image).
3. **Retry**: rejected samples are generated again with fresh seeds, round after round, until
   the plan is met or `max_rounds` is spent; any shortfall is reported, never hidden.
4. **Write** a dataset folder of the accepted images (column ``synthetic`` = True) and
   ``combined.csv``, the real + synthetic manifest for training.

Every round is an ordinary `toolkit.generate` run folder under ``OUT/rounds/``, so rerunning
the same command resumes where it stopped and reproduces the same images.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import toolkit
from evaluations import defaults
from evaluations import fidelity as judging
from evaluations.common import (
    jsonable,
    now,
    provenance,
    versions,
    write_csv,
    write_json,
)
from toolkit import natural_key

if TYPE_CHECKING:
    import pandas

    from evaluations.fidelity import Fidelity
    from toolkit import GenerationSettings

DEFAULT_FILTERS = ("label_consistency", "memorization")
ALL = "all"  # the one class when there is no --by
#: dataset.json's name in a folder `dtk data colored-digits` wrote
COLORED_DIGITS = "colored-digits"


def class_column(by: str | None, attribute: str) -> str:
    """The plan's first column: `by`, or without one a column of `ALL` named ``class`` (named
    ``classes`` when the group attribute is itself ``class``, as a DiT model's is)."""
    if by:
        return by
    return "classes" if attribute == "class" else "class"


@dataclasses.dataclass
class SynthesisRound:
    """One generation round: its first seed, the samples it generated, and how many of them
    the filters accepted and rejected (those are retried in the next round)."""

    round: int
    seed_start: int
    generated: int
    accepted: int
    rejected: int


@dataclasses.dataclass
class SynthesisConfig:
    """What `synthesize` was asked for (results.json's ``config``)."""

    data: str | None
    model: str | None
    out: str
    attribute: str
    by: str | None
    target: str | dict[str, float]
    target_shares: dict[str, float]
    budget: int | None
    filters: list[str]
    consistency_threshold: float
    memorization_threshold: float
    max_rounds: int
    seed: int
    generation: GenerationSettings
    prompt_template: str | None
    negative_prompt: str | None
    #: the words file and the words it gives the prompts (attribute -> value -> words)
    words: dict[str, Any] | None
    classifier: str
    classifier_options: dict[str, Any]
    #: the independent judge of fidelity (None: no judge), and its reference images
    judge: str | None = None
    judge_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    judge_data: str | None = None
    #: how the rounds and OUT/synthetic store their images (`toolkit.data.shards`)
    format: str = "imagefolder"
    shard_size: int | None = None

    def to_json(self) -> dict[str, Any]:
        return jsonable(dataclasses.asdict(self))


@dataclasses.dataclass
class SynthesisResult:
    """`synthesize`'s result: results.json (`to_json`), with the plan and what each cell got
    (``plan.csv``) and the accepted images' metadata (``OUT/synthetic/metadata.csv``)."""

    command: ClassVar[str] = "synthesize"

    created: str
    config: SynthesisConfig
    plugins: list[dict[str, str]]
    versions: dict[str, str]
    planned: int
    accepted: int
    shortfall: int
    rounds: list[SynthesisRound]
    #: rejections per filter (a sample may be rejected by both)
    rejections: dict[str, int]
    plan: pandas.DataFrame = dataclasses.field(repr=False, compare=False)
    synthetic: pandas.DataFrame = dataclasses.field(repr=False, compare=False)
    #: the independent judge's reading of the accepted images against real ones (None
    #: without a judge, or when nothing was accepted)
    fidelity: Fidelity | None = None

    def to_json(self) -> dict[str, Any]:
        return jsonable({
            "command": self.command, "created": self.created, "config": self.config.to_json(),
            "plugins": self.plugins, "versions": self.versions, "planned": self.planned,
            "accepted": self.accepted, "shortfall": self.shortfall,
            "rounds": [dataclasses.asdict(r) for r in self.rounds],
            "rejections": self.rejections, "plan": self.plan.to_dict(orient="records"),
            "fidelity": None if self.fidelity is None else self.fidelity.to_json(),
        })  # fmt: skip


def make_plan(
    metadata: pandas.DataFrame,
    *,
    attribute: str,
    values: Sequence[str],
    target: Mapping[str, float],
    by: str | None = None,
    classes: Sequence[str] | None = None,
    budget: int | None = None,
) -> pandas.DataFrame:
    """Per class x value: ``have`` (real images), ``want`` and ``generate``.

    Without a budget each class is completed to the target shares: its total becomes the
    smallest for which no value has more real images than its target share allows, so no
    real image is discarded. With `budget`, exactly that many images are placed one at a
    time where a class is furthest below its target count.
    """
    import pandas

    column = metadata[by].astype(str) if by else pandas.Series([ALL] * len(metadata))
    classes = list(classes) if classes is not None else sorted(column.unique(), key=natural_key)
    have = pandas.crosstab(column, metadata[attribute].astype(str)).reindex(
        index=classes, columns=list(values), fill_value=0
    )
    if budget is None:
        generate = _complete_classes(have, target)
    else:
        generate = _spend_budget(have, target, budget)
    key = class_column(by, attribute)
    rows = [{key: c, attribute: v, "have": int(have.loc[c, v]),
             "want": int(have.loc[c, v] + generate.loc[c, v]),
             "generate": int(generate.loc[c, v])}
            for c in classes for v in values]  # fmt: skip
    return pandas.DataFrame(rows, columns=[key, attribute, "have", "want", "generate"])


def _complete_classes(have: pandas.DataFrame, target: Mapping[str, float]) -> pandas.DataFrame:
    """Per cell, what completes each class to the target shares, no real image dropped."""
    generate = have * 0
    positive = [v for v in have.columns if target[v] > 0]
    for c in have.index:
        total = max(have.loc[c, v] / target[v] for v in positive)
        # round up, and never below what a zero-target value already has
        for v in have.columns:
            want = math.ceil(round(total * target[v], 9)) if target[v] > 0 else 0
            generate.loc[c, v] = max(0, want - have.loc[c, v])
    return generate


def _spend_budget(
    have: pandas.DataFrame, target: Mapping[str, float], budget: int
) -> pandas.DataFrame:
    """Per cell, `budget` images placed one at a time where the cell is furthest below its
    target count (its share of the class's total with that image); ties go to the first."""
    generate = have * 0
    for _ in range(budget):
        current = have + generate
        totals = current.sum(axis=1)
        gaps = {(c, v): target[v] * (totals[c] + 1) - current.loc[c, v]
                for c in have.index for v in have.columns}  # fmt: skip
        generate.loc[max(gaps, key=gaps.get)] += 1
    return generate


def synthesize(
    out: str | pathlib.Path,
    *,
    data: str | pathlib.Path | None = None,
    model: str | pathlib.Path | None = None,
    attribute: str = "group",
    by: str | None = "digit",
    target: str | Mapping[str, float] = "balanced",
    budget: int | None = None,
    filters: Sequence[str] = DEFAULT_FILTERS,
    consistency_threshold: float | None = None,
    memorization_threshold: float = 0.03,
    max_rounds: int = 8,
    seed: int = 0,
    generation: GenerationSettings | None = None,
    prompt_template: str | None = None,
    negative_prompt: str | None = None,
    words: str | pathlib.Path | None = None,
    classifier: str = "cnn",
    classifier_options: Mapping[str, Any] | None = None,
    judge: str | None = "auto",
    judge_options: Mapping[str, Any] | None = None,
    judge_data: str | pathlib.Path | None = None,
    engine: str = "local",
    workers: int | None = None,
    ray_address: str | None = None,
    threads: int | None = None,
    format: str = "imagefolder",
    shard_size: int | None = None,
    progress: bool = True,
    report: bool = True,
    on_plan: Callable[[pandas.DataFrame], None] | None = None,
) -> SynthesisResult:
    """Plan, generate, filter and retry; write the synthetic dataset folder to
    ``OUT/synthetic`` and the manifest ``OUT/combined.csv``. Returns the results
    (also ``OUT/results.json``).

    `data` defaults to the colored-digits training split (written to ``OUT/real``) and
    `model` to the shipped generator trained on it. `generation` says how the images are
    generated (a `toolkit.GenerationSettings`, or a mapping of its fields;
    `synthesis_settings` adds the synthesis defaults); the filters are synthesis's own,
    `filters`. `on_plan` is called with the plan before anything is generated.

    A text-to-image `model` takes `prompt_template` instead of label conditions: a
    ``str.format`` template over `attribute` and `by`, e.g. ``"a photo of a {gender}
    {occupation}"``, filled with each cell's values (from `data`); `negative_prompt` applies
    to all. With `words`, a words file (`toolkit.read_words`) that must list `attribute`,
    the fields of the attributes it lists are filled with each value's words instead
    (``gender=female`` may read "woman"); conditions and metadata keep the values.
    `label_consistency` then checks `attribute` with the classifier plugin `classifier` and
    `classifier_options` (e.g. ``clip`` with its path and labels, or the same words file).

    `judge` (an attribute-classifier plugin, with `judge_options`) then reads every accepted
    image's requested values, and the same cells' real images in `judge_data`
    (`evaluations.fidelity`); it must not be the filter's classifier. ``"auto"``: the
    shipped ``mlp`` judges where the filter is the shipped ``cnn``, else none; None: no
    judge. `judge_data` defaults to the colored-digits test split (written to
    ``OUT/judge-reference``) with the default data, else to `data`.

    `engine` (``local`` or ``ray``, with `workers`, `ray_address` and `threads`) is how each
    round is generated (`toolkit.generate`): the same images either way (on a CPU, at the
    same `threads`). `format` (with `shard_size`) is how the rounds and ``OUT/synthetic``
    store them: one PNG per file, or WebDataset or Parquet shards (`toolkit.data.shards`);
    ``combined.csv`` then names each sharded row's ``shard`` and ``index``.
    """
    job = _Synthesis(
        out=pathlib.Path(out), data=data, model=model, attribute=attribute, by=by,
        target=target, budget=budget, filters=list(filters),
        consistency_threshold=_consistency_threshold(consistency_threshold, prompt_template),
        memorization_threshold=memorization_threshold, max_rounds=max_rounds, seed=seed,
        settings=synthesis_settings(generation, text=prompt_template is not None),
        prompt_template=prompt_template,
        negative_prompt=negative_prompt, words=words, classifier=classifier,
        classifier_options=dict(classifier_options or {}), judge=judge,
        judge_options=dict(judge_options or {}), judge_data=judge_data,
        engine={"engine": engine, "workers": workers, "ray_address": ray_address,
                "threads": threads},
        storage={"format": format, "shard_size": shard_size}, progress=progress,
    )  # fmt: skip
    # 1. the options, the model's attributes, the words, the filters and the judge: checked
    #    before the first file is written (the default data, or else plan.csv)
    job.check_options()
    cells = job.model_cells()
    job.check_judge()
    # 2. the real data and the plan, checked against the model and the words file
    metadata = job.real_data()
    plan = job.plan(metadata, cells)
    if on_plan is not None:
        on_plan(plan)
    # 3. generate, filter, and retry what the filters rejected
    rounds = job.generate(plan)
    # 4. the synthetic dataset folder, combined.csv, plan.csv with the outcome, what the
    #    judge read, results.json
    result = job.write(plan, metadata, rounds)
    if report:
        from evaluations.synthesis_report import write_synthesis_report

        write_synthesis_report(job.out, result)
    return result


def _consistency_threshold(threshold: float | None, prompt_template: str | None) -> float:
    """`threshold`, by default `defaults.SYNTHESIS_CONSISTENCY_THRESHOLD` with a label model
    and `defaults.TEXT_CONSISTENCY_THRESHOLD` with a text-to-image one."""
    if threshold is not None:
        return threshold
    if prompt_template is None:
        return defaults.SYNTHESIS_CONSISTENCY_THRESHOLD
    return defaults.TEXT_CONSISTENCY_THRESHOLD


def synthesis_settings(generation: GenerationSettings | Mapping[str, Any] | None,
                       text: bool = False) -> GenerationSettings:  # fmt: skip
    """The settings synthesis generates with: `generation` (default: the toolkit's). With a
    label-conditioned model (not `text`), steps it leaves out are `defaults.SYNTHESIS_STEPS`
    and guidance it does not name `defaults.SYNTHESIS_GUIDANCE` (tuned on colored digits);
    a text-to-image model keeps its family's own (an LCM has no branch for CFG)."""
    settings = toolkit.GenerationSettings.from_mapping(generation or {})
    if settings.filters:
        raise toolkit.DtkError("synthesis filters with its own filters (--filters), not with "
                               "safety filters of the generation settings")  # fmt: skip
    if not text and settings.steps is None:
        settings = settings.replace(steps=defaults.SYNTHESIS_STEPS)
    if not text and settings.guidance is None:
        settings = settings.replace(**defaults.SYNTHESIS_GUIDANCE)
    return settings


@dataclasses.dataclass
class _Cells:
    """The cells a plan can fill: the group values and the classes the model can draw (a
    text-to-image model draws any: None until the data says which)."""

    values: list[str] | None
    classes: list[str] | None


@dataclasses.dataclass
class _Rounds:
    """What the generation rounds gave: the accepted and the rejected samples' metadata per
    round, each round's counts, and the samples still missing after the last."""

    accepted: list[pandas.DataFrame] = dataclasses.field(default_factory=list)
    rejected: list[pandas.DataFrame] = dataclasses.field(default_factory=list)
    rounds: list[SynthesisRound] = dataclasses.field(default_factory=list)
    shortfall: int = 0


@dataclasses.dataclass
class _Synthesis:
    """One `synthesize` run: its options, and its steps (see `synthesize`)."""

    out: pathlib.Path
    data: str | pathlib.Path | None
    model: str | pathlib.Path | None
    attribute: str
    by: str | None
    target: str | Mapping[str, float]
    budget: int | None
    filters: list[str]
    consistency_threshold: float
    memorization_threshold: float
    max_rounds: int
    seed: int
    settings: GenerationSettings
    prompt_template: str | None
    negative_prompt: str | None
    words: str | pathlib.Path | None
    classifier: str
    classifier_options: dict[str, Any]
    judge: str | None
    judge_options: dict[str, Any]
    judge_data: str | pathlib.Path | None
    #: how each round generates: toolkit.generate's engine, workers, ray_address, threads
    engine: dict[str, Any]
    #: how the rounds and OUT/synthetic store the images: format and shard_size
    storage: dict[str, Any]
    progress: bool
    #: attribute -> value -> its words in prompts (from the words file)
    spoken: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    shares: dict[str, float] = dataclasses.field(default_factory=dict)
    #: whether the filters are known to start (checked before the first file is written)
    filters_checked: bool = False
    #: the judge's classifier per attribute, and their identities (`fidelity.identity`)
    judges: dict[str, Any] = dataclasses.field(default_factory=dict)
    judge_identities: dict[str, str] = dataclasses.field(default_factory=dict)
    #: whether the real data is the default (colored digits), decided before it is written
    default_data: bool = False

    @property
    def text(self) -> bool:
        return self.prompt_template is not None

    @property
    def names(self) -> list[str]:
        return [self.attribute] + ([self.by] if self.by else [])

    def check_options(self) -> None:
        if self.budget is not None and self.budget < 1:
            raise toolkit.DtkError("--budget must be at least 1")
        if self.max_rounds < 1:
            raise toolkit.DtkError("--max-rounds must be at least 1")
        toolkit.check_format(self.storage["format"], self.storage["shard_size"])
        toolkit.check_engine(**self.engine)
        unknown = sorted(set(self.filters) - set(DEFAULT_FILTERS))
        if unknown:
            raise toolkit.DtkError(f"unknown synthesis filter {unknown[0]!r}; choose from "
                                   f"{', '.join(DEFAULT_FILTERS)}")  # fmt: skip
        self.model = pathlib.Path(self.model) if self.model is not None else toolkit.default_model()
        if self.model is None:
            raise toolkit.DtkError("no --model given, and this installation ships no default model")
        if self.by == self.attribute:
            raise toolkit.DtkError("--by must differ from --attribute")
        if self.words is not None and not self.text:
            raise toolkit.DtkError("--words needs --prompt-template: the words fill its fields")
        if self.text:
            _check_template(self.prompt_template, self.names)
            if self.data is None:
                raise toolkit.DtkError("--prompt-template needs --data: the real dataset folder")

    def model_cells(self) -> _Cells:
        """A label model's values of `attribute` and `by`; for a text-to-image model, the
        words the prompts say instead (checked: the file must list `attribute`)."""
        if self.text:
            if self.words is not None:
                table = toolkit.read_words(self.words)
                # the audited attribute is the one the words are for; a file without it is
                # most likely spelled for another attribute name
                toolkit.attribute_words(table, self.attribute, source=f"--words {self.words}")
                self.spoken = {name: table[name] for name in self.names if name in table}
            return _Cells(None, None)
        space = toolkit.label_space(self.model)
        if space is None:
            raise toolkit.DtkError(
                f"{self.model} takes no attribute labels; synthesis needs a label-conditioned "
                "model, or a text-to-image model with --prompt-template"
            )
        classes = list(space.attribute(self.by).values) if self.by else None
        return _Cells(list(space.attribute(self.attribute).values), classes)

    def judged(self) -> list[str]:
        """The attributes a judge reads: those label_consistency checks (a text model's
        prompts alone say its class)."""
        return [self.attribute] + ([self.by] if self.by and not self.text else [])

    def filter_identities(self) -> dict[str, str]:
        """The filter's classifier per attribute it checks (`fidelity.identity`)."""
        if "label_consistency" not in self.filters:
            return {}
        return {a: judging.identity(self.classifier, self.classifier_options, a)
                for a in self.judged()}  # fmt: skip

    def check_judge(self) -> None:
        """Resolve ``auto``, load the judges and refuse one that is the filter's classifier."""
        self.default_data = self.data is None
        if self.judge == "auto":
            shipped = toolkit.judge_attributes()
            own_filter = self.classifier == "cnn" and "path" not in self.classifier_options
            ready = own_filter and not self.text and set(self.judged()) <= set(shipped)
            self.judge = judging.DEFAULT_JUDGE if ready else None
        if self.judge is None:
            if self.judge_data is not None or self.judge_options:
                raise toolkit.DtkError("--judge-data and --judge-option need a --judge")
            return
        self.judges, self.judge_identities = judging.make_judges(
            self.judge, self.judge_options, self.judged()
        )
        judging.check_independent(self.judge_identities, self.filter_identities(),
                                  what="--judge")  # fmt: skip

    def consistency(self) -> dict[str, Any] | None:
        """The label_consistency filter's options (a text model's classes are checked by its
        prompts alone, so it checks `attribute` only)."""
        if "label_consistency" not in self.filters:
            return None
        return {"attributes": [self.attribute] + ([self.by] if self.by and not self.text else []),
                "threshold": self.consistency_threshold, "classifier": self.classifier,
                "classifier_options": self.classifier_options}  # fmt: skip

    def real_data(self) -> pandas.DataFrame:
        """The real data's metadata; the default data is written first, once the filters
        are known to start (else the filters are checked once the plan is)."""
        if self.data is None:
            _check_consistency(self.consistency())
            self.data = self.out / "real"
            toolkit.write_colored_digits(self.data, "train", progress=self.progress)
            self.filters_checked = True
        self.data = pathlib.Path(self.data)
        return toolkit.read_metadata(self.data, self.names)

    def plan(self, metadata: pandas.DataFrame, cells: _Cells) -> pandas.DataFrame:
        """The plan (written to plan.csv), once the data's values are known to the model,
        every value a prompt says has words, and the seeds it needs exist."""
        values = cells.values
        if values is None:  # a text model can draw any value: the data's values are the groups
            values = sorted(metadata[self.attribute].astype(str).unique(), key=natural_key)
        self.shares = toolkit.target_distribution(self.target, values, what="--target")
        foreign = sorted(set(metadata[self.attribute].astype(str)) - set(values), key=natural_key)
        if foreign:
            raise toolkit.DtkError(f"{self.data}: {self.attribute} values {foreign} are unknown "
                                   f"to the model ({', '.join(values)})")  # fmt: skip
        classes = self.classes(metadata, cells)
        plan = make_plan(metadata, attribute=self.attribute, values=values, target=self.shares,
                         by=self.by, classes=classes, budget=self.budget)  # fmt: skip
        _check_words(plan, self.spoken, self.words)
        # each round takes the seeds after the previous round's and retries at most what that
        # round made: a run uses at most planned x rounds seeds
        toolkit.check_seed(self.seed, int(plan["generate"].sum()) * self.max_rounds, what="--seed")
        if not self.filters_checked:
            _check_consistency(self.consistency())
        write_csv(self.out / "plan.csv", plan)
        return plan

    def classes(self, metadata: pandas.DataFrame, cells: _Cells) -> list[str] | None:
        """The data's classes (values of `by`), which a label model must know."""
        if not self.by:
            return None
        classes = sorted(metadata[self.by].astype(str).unique(), key=natural_key)
        unknown = [c for c in classes if c not in cells.classes] if cells.classes else []
        if unknown:
            raise toolkit.DtkError(f"{self.data}: {self.by} values {unknown} are unknown to the "
                                   f"model ({', '.join(cells.classes)})")  # fmt: skip
        return classes

    def generate(self, plan: pandas.DataFrame) -> _Rounds:
        """Round after round until the plan is met or `max_rounds` are spent: each round
        generates the samples still missing, with the seeds after the previous round's."""
        # synthesis's own filters; a rejected sample is dropped, and retried next round
        chosen = [f for f in DEFAULT_FILTERS if f in self.filters]
        settings = self.settings.replace(filters=chosen, filter_options=self.filter_options(),
                                         on_flag="drop")  # fmt: skip
        pending = [_condition(row, self.attribute, self.by)
                   for _, row in plan.iterrows() for _ in range(int(row["generate"]))]  # fmt: skip
        done, seed = _Rounds(), self.seed
        with toolkit.reuse_models():  # one model load for every round
            self._rounds(done, pending, seed, settings)
        return done

    def _rounds(self, done: _Rounds, pending: list[dict[str, str]], seed: int,
                settings: GenerationSettings) -> None:  # fmt: skip
        for index in range(self.max_rounds):
            if not pending:
                break
            kept, dropped = self.generate_round(index, pending, seed, settings)
            done.accepted.append(kept)
            done.rejected.append(dropped)
            done.rounds.append(SynthesisRound(index, seed, len(pending), len(kept), len(dropped)))
            seed += len(pending)
            pending = [_condition(row, self.attribute, self.by) for _, row in dropped.iterrows()]
        done.shortfall = len(pending)

    def generate_round(
        self, index: int, pending: list[dict[str, str]], seed: int, settings: GenerationSettings
    ) -> tuple[pandas.DataFrame, pandas.DataFrame]:
        """One round, an ordinary generation folder (so a rerun resumes it): the accepted
        samples' metadata and the rejected ones'."""
        folder = self.out / "rounds" / f"round-{index}"
        prompts: dict[str, Any] = {}
        if self.text:
            prompts = {"prompt": [self.prompt_template.format(**_said(c, self.spoken))
                                  for c in pending],
                       "negative_prompt": self.negative_prompt}  # fmt: skip
        kept = toolkit.generate(self.model, out=folder, conditions=pending, n=len(pending),
                                seed=seed, settings=settings, progress=self.progress,
                                **prompts, **self.engine, **self.storage)  # fmt: skip
        if "status" in kept.columns:  # an empty frame when every sample was rejected
            kept = kept[kept["status"] == "ok"]
        return kept.assign(round=index, folder=str(folder)), _rejected(folder).assign(round=index)

    def filter_options(self) -> dict[str, dict[str, Any]]:
        options: dict[str, dict[str, Any]] = {}
        consistency = self.consistency()
        if consistency is not None:
            options["label_consistency"] = consistency
        if "memorization" in self.filters:
            options["memorization"] = {"data": self.data, "threshold": self.memorization_threshold}
        return options

    def write(self, plan: pandas.DataFrame, metadata: pandas.DataFrame, rounds: _Rounds
              ) -> SynthesisResult:  # fmt: skip
        """The synthetic dataset folder with its rejected.csv, combined.csv, plan.csv with
        what each cell got, and results.json."""
        import pandas

        synthetic = _write_synthetic(self.out / "synthetic", rounds.accepted, self.attribute,
                                     self.by, **self.storage)  # fmt: skip
        rejected = (
            pandas.concat(rounds.rejected, ignore_index=True)
            if rounds.rejected
            else pandas.DataFrame()
        )
        write_csv(self.out / "synthetic" / "rejected.csv", rejected)
        # which classifiers filtered these images: an audit of them must not use those
        write_json(self.out / "synthetic" / judging.FILTERED,
                   {"name": "synthetic", "command": "synthesize",
                    "filtered_by": self.filter_identities()})  # fmt: skip
        combined = _combined(self.out, self.data, metadata, synthetic, self.attribute, self.by)
        write_csv(self.out / "combined.csv", combined)
        achieved = _achieved(plan, synthetic, self.attribute, self.by)
        write_csv(self.out / "plan.csv", achieved)
        result = SynthesisResult(
            created=now(), config=self.config(), plugins=self.plugins(), versions=versions(),
            planned=int(plan["generate"].sum()), accepted=len(synthetic),
            shortfall=rounds.shortfall, rounds=rounds.rounds,
            rejections=_rejection_reasons(rejected), plan=achieved, synthetic=synthetic,
            fidelity=self.fidelity(synthetic),
        )  # fmt: skip
        write_json(self.out / "results.json", result.to_json())
        return result

    def fidelity(self, synthetic: pandas.DataFrame) -> Fidelity | None:
        """The judge's reading of the accepted images against the same cells' real images
        (None without a judge or accepted images)."""
        if not self.judges or synthetic.empty:
            return None
        reference = self.judge_reference()
        seed = self.colored_digits_seed()
        if seed is not None and self.judge_data is None:
            toolkit.write_colored_digits(reference, "test", seed=seed, progress=self.progress)
        cells = [*([self.by] if self.by else []), self.attribute]
        return judging.measure_fidelity(
            toolkit.load_image_folder(self.out / "synthetic", cells),
            toolkit.load_image_folder(reference, cells), self.judges, judge=self.judge,
            judge_options=self.judge_options, identities=self.judge_identities, cells=cells,
        )  # fmt: skip

    def judge_reference(self) -> pathlib.Path:
        """Real labeled images for the judge: `judge_data`; with colored digits for data,
        their test split (shapes neither the generator nor the shipped judges saw), written
        to ``OUT/judge-reference``; else the real data."""
        if self.judge_data is not None:
            return pathlib.Path(self.judge_data)
        if self.colored_digits_seed() is not None:
            return self.out / "judge-reference"
        return pathlib.Path(self.data)

    def colored_digits_seed(self) -> int | None:
        """The seed of the colored-digits data (the default, or a folder `dtk data
        colored-digits` wrote), None for other data."""
        if self.default_data:
            return 0
        try:
            info = json.loads((pathlib.Path(self.data) / "dataset.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(info, dict) or info.get("name") != COLORED_DIGITS:
            return None
        return int(info.get("seed", 0))

    def config(self) -> SynthesisConfig:
        from evaluations.report import shown_path

        words = None if self.words is None else {"path": str(self.words), "words": self.spoken}
        return SynthesisConfig(
            data=shown_path(self.data), model=shown_path(self.model), out=str(self.out),
            attribute=self.attribute, by=self.by,
            target=self.target if isinstance(self.target, str) else dict(self.target),
            target_shares=self.shares, budget=self.budget, filters=list(self.filters),
            consistency_threshold=self.consistency_threshold,
            memorization_threshold=self.memorization_threshold, max_rounds=self.max_rounds,
            seed=self.seed, generation=self.settings, prompt_template=self.prompt_template,
            negative_prompt=self.negative_prompt, words=words, classifier=self.classifier,
            classifier_options=self.classifier_options, judge=self.judge,
            judge_options=self.judge_options,
            judge_data=None if self.judge is None else shown_path(self.judge_reference()),
            format=self.storage["format"], shard_size=self.storage["shard_size"],
        )  # fmt: skip

    def plugins(self) -> list[dict[str, str]]:
        """The filters' provenance, and label_consistency's classifier's."""
        used = [provenance("safety_filter", f) for f in self.filters]
        if "label_consistency" in self.filters:
            used.append(provenance("attribute_classifier", self.classifier))
        return used


def _check_template(template: str, names: list[str]) -> None:
    """Every ``{field}`` of the prompt template must be one of `names`."""
    import string

    hint = ", ".join("{" + n + "}" for n in names)
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise toolkit.DtkError(f"--prompt-template {template!r}: {exc}") from None
    unknown = [f for f in fields if f not in names]
    if unknown:
        raise toolkit.DtkError(
            f"--prompt-template {template!r}: unknown field {{{unknown[0]}}}; use {hint}"
        )
    if not fields:
        raise toolkit.DtkError(f"--prompt-template {template!r} names no attribute; use {hint}")


def _check_words(
    plan: pandas.DataFrame, spoken: Mapping[str, Mapping[str, str]], words: Any
) -> None:
    """Every value a prompt will say must have words, checked before anything is generated."""
    generated = plan[plan["generate"] > 0]
    for name, said in spoken.items():
        missing = [v for v in dict.fromkeys(generated[name].astype(str)) if v not in said]
        if missing:
            raise toolkit.DtkError(
                f"--words {words} has no words for {name} value {missing[0]!r}, which the "
                f'plan generates; add {missing[0]} = "..." to its [{name}] table'
            )


def _said(condition: Mapping[str, str], spoken: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    """A cell's template fields: the words of the values the words file lists, else the value."""
    return {k: spoken[k][v] if k in spoken else v for k, v in condition.items()}


def _condition(row: Any, attribute: str, by: str | None) -> dict[str, str]:
    condition = {attribute: str(row[attribute])}
    if by:
        condition = {by: str(row[by]), **condition}
    return condition


def _check_consistency(options: dict[str, Any] | None) -> None:
    """The label_consistency filter can be made with `options`: its classifiers exist and
    take their options."""
    if options is not None:
        toolkit.create_plugin("safety_filter", "label_consistency", options)


def _rejected(folder: pathlib.Path) -> pandas.DataFrame:
    import pandas

    path = folder / "rejected.csv"
    if not path.is_file():
        return pandas.DataFrame()
    return pandas.read_csv(path, dtype=str, keep_default_na=False)


def _write_synthetic(
    root: pathlib.Path,
    accepted: list[pandas.DataFrame],
    attribute: str,
    by: str | None,
    format: str = "imagefolder",
    shard_size: int | None = None,
) -> pandas.DataFrame:
    """The accepted images of every round in one dataset folder of `format`, made whole
    again on every run: its metadata.csv goes first and comes back last, so a folder cut
    short is no dataset; the images are read a round's shard at a time."""
    import pandas

    frame = pandas.concat(accepted, ignore_index=True) if accepted else pandas.DataFrame()
    (root / "metadata.csv").unlink(missing_ok=True)
    records = [_synthetic_record(row, attribute, by) for _, row in frame.iterrows()]
    sources: list[Any] = [None] * len(frame)
    for folder, rows in frame.groupby("folder", sort=False) if len(frame) else ():
        for position, source in zip(rows.index, toolkit.image_sources(folder, rows)):
            sources[position] = source
    images = toolkit.iter_image_bytes(sources)
    if format == "imagefolder":
        for position, data in images:
            toolkit.atomic_write(root / records[position]["file_name"], data)
    else:
        # an index per synthetic sample (the rounds' indices repeat), the shard's key
        samples = (({**records[p], "index": p}, data) for p, data in images)
        written = toolkit.write_shards(root, format, samples, part="synthetic",
                                       shard_size=shard_size)  # fmt: skip
        records = sorted(written, key=lambda r: r["index"])
    columns = ["file_name", *([by] if by else []), attribute, "synthetic"]
    metadata = pandas.DataFrame(records, columns=None if records else columns)
    write_csv(root / "metadata.csv", metadata)
    return metadata


def _synthetic_record(row: pandas.Series, attribute: str, by: str | None) -> dict[str, Any]:
    """An accepted sample's metadata row, named for its round and index in that round."""
    parent = pathlib.PurePosixPath(row["file_name"]).parent
    record = {"file_name": f"{parent}/r{row['round']}-{int(row['index']):06d}.png"}
    if by:
        record[by] = row[by]
    record[attribute] = row[attribute]
    record["synthetic"] = True
    record.update({k: row[k] for k in row.index if k.startswith("filter_")})
    # whole numbers, though a round that accepted nothing makes pandas read them as floats
    record.update({"seed": int(row["seed"]), "round": int(row["round"]), "sha256": row["sha256"]})
    return record


def _combined(
    out: pathlib.Path,
    data: pathlib.Path,
    real: pandas.DataFrame,
    synthetic: pandas.DataFrame,
    attribute: str,
    by: str | None,
) -> pandas.DataFrame:
    """Real + synthetic rows, paths relative to `out`, ready for training; rows of a
    sharded folder also name their ``shard`` (relative to `out`) and ``index``."""
    import pandas

    columns = [*([by] if by else []), attribute]
    relative = pathlib.PurePosixPath(os.path.relpath(data.resolve(), out.resolve()))
    parts = [_relocated(real, relative, columns).assign(synthetic=False)]
    if len(synthetic):
        parts.append(_relocated(synthetic, pathlib.PurePosixPath("synthetic"), columns)
                     .assign(synthetic=True))  # fmt: skip
    return pandas.concat(parts, ignore_index=True)


def _relocated(rows: pandas.DataFrame, folder: pathlib.PurePosixPath, columns: list[str]
               ) -> pandas.DataFrame:  # fmt: skip
    """`rows` of the dataset folder `folder`, their paths made relative to its parent."""
    kept = rows[["file_name", *columns]].assign(
        file_name=[(folder / f).as_posix() for f in rows["file_name"]]
    )
    if "shard" in rows.columns and "index" in rows.columns:
        kept = kept.assign(shard=[(folder / s).as_posix() for s in rows["shard"]],
                           index=rows["index"].astype("Int64"))  # fmt: skip
    return kept


def _achieved(
    plan: pandas.DataFrame, synthetic: pandas.DataFrame, attribute: str, by: str | None
) -> pandas.DataFrame:
    """The plan with what was actually accepted per cell (``generated``)."""
    key = class_column(by, attribute)
    if len(synthetic):
        got = (
            synthetic.assign(**{key: synthetic[by] if by else ALL}).groupby([key, attribute]).size()
        )
    else:
        got = {}
    plan = plan.copy()
    plan["generated"] = [
        int(got.get((str(r[key]), str(r[attribute])), 0)) for _, r in plan.iterrows()
    ]
    return plan


def _rejection_reasons(rejected: pandas.DataFrame) -> dict[str, int]:
    """How many rejections each filter made (a sample may be flagged by both)."""
    counts = {}
    for column in rejected.columns:
        if column.startswith("filter_") and column.endswith("_flagged"):
            name = column[len("filter_") : -len("_flagged")]
            counts[name] = int((rejected[column].astype(str) == "True").sum())
    return counts
