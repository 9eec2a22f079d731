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

import math
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import toolkit
from evaluations.common import now, provenance, versions, write_csv, write_json
from toolkit import natural_key

if TYPE_CHECKING:
    import pandas

DEFAULT_FILTERS = ("label_consistency", "memorization")
#: Weak guidance by default: on colored digits CFG 0.75 gives more varied minority samples
#: than the sampling default (CFG 2), the filters reject the ones that drift off their
#: labels, and a downstream CNN gains far more from them (docs/fairness.md has the figures).
DEFAULT_GUIDANCE = {"guidance": "cfg", "guidance_options": {"scale": 0.75}}
DEFAULT_STEPS = 20
ALL = "all"  # the one class when there is no --by


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
    values_col = metadata[attribute].astype(str)
    classes = list(classes) if classes is not None else sorted(column.unique(), key=natural_key)
    have = pandas.crosstab(column, values_col).reindex(
        index=classes, columns=list(values), fill_value=0
    )
    generate = have * 0
    if budget is None:
        for c in classes:
            positive = [v for v in values if target[v] > 0]
            total = max(have.loc[c, v] / target[v] for v in positive)
            # round up, and never below what a zero-target value already has
            for v in values:
                want = math.ceil(round(total * target[v], 9)) if target[v] > 0 else 0
                generate.loc[c, v] = max(0, want - have.loc[c, v])
    else:
        for _ in range(budget):
            current = have + generate
            totals = current.sum(axis=1)
            best, best_gap = None, None
            for c in classes:
                for v in values:
                    gap = target[v] * (totals[c] + 1) - current.loc[c, v]
                    if best_gap is None or gap > best_gap:
                        best, best_gap = (c, v), gap
            assert best is not None
            generate.loc[best] += 1
    rows = []
    for c in classes:
        for v in values:
            rows.append({by or "class": c, attribute: v, "have": int(have.loc[c, v]),
                         "generate": int(generate.loc[c, v]),
                         "want": int(have.loc[c, v] + generate.loc[c, v])})  # fmt: skip
    frame = pandas.DataFrame(rows)
    return frame[[by or "class", attribute, "have", "want", "generate"]]


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
    consistency_threshold: float = 0.5,
    memorization_threshold: float = 0.03,
    max_rounds: int = 8,
    seed: int = 0,
    generation: Mapping[str, Any] | None = None,
    prompt_template: str | None = None,
    negative_prompt: str | None = None,
    words: str | pathlib.Path | None = None,
    classifier: str = "cnn",
    classifier_options: Mapping[str, Any] | None = None,
    progress: bool = True,
    report: bool = True,
    on_plan: Callable[[pandas.DataFrame], None] | None = None,
) -> dict[str, Any]:
    """Plan, generate, filter and retry; write the synthetic dataset folder to
    ``OUT/synthetic`` and the manifest ``OUT/combined.csv``. Returns the results
    (also ``OUT/results.json``).

    `data` defaults to the colored-digits training split (written to ``OUT/real``) and
    `model` to the shipped generator trained on it. `generation` holds further
    `toolkit.generate` keyword arguments (sampler, steps, guidance, batch_size, ...); without
    a guidance there, `DEFAULT_GUIDANCE` (CFG 0.75), and `DEFAULT_STEPS` steps.
    `on_plan` is called with the plan before anything is generated.

    A text-to-image `model` takes `prompt_template` instead of label conditions: a
    ``str.format`` template over `attribute` and `by`, e.g. ``"a photo of a {gender}
    {occupation}"``, filled with each cell's values (from `data`); `negative_prompt` applies
    to all. With `words`, a words file (`toolkit.read_words`) that must list `attribute`,
    the fields of the attributes it lists are filled with each value's words instead
    (``gender=female`` may read "woman"); conditions and metadata keep the values.
    `label_consistency` then checks `attribute` with the classifier plugin `classifier` and
    `classifier_options` (e.g. ``clip`` with its path and labels, or the same words file).
    """
    import pandas

    from evaluations.report import shown_path

    out = pathlib.Path(out)
    if budget is not None and budget < 1:
        raise toolkit.DtkError("--budget must be at least 1")
    if max_rounds < 1:
        raise toolkit.DtkError("--max-rounds must be at least 1")
    unknown_filters = sorted(set(filters) - set(DEFAULT_FILTERS))
    if unknown_filters:
        raise toolkit.DtkError(
            f"unknown synthesis filter {unknown_filters[0]!r}; choose from "
            f"{', '.join(DEFAULT_FILTERS)}"
        )
    model = pathlib.Path(model) if model is not None else toolkit.default_model()
    if model is None:
        raise toolkit.DtkError("no --model given, and this installation ships no default model")
    if by == attribute:
        raise toolkit.DtkError("--by must differ from --attribute")
    text = prompt_template is not None
    names = [attribute] + ([by] if by else [])
    if words is not None and not text:
        raise toolkit.DtkError("--words needs --prompt-template: the words fill its fields")
    spoken: dict[str, dict[str, str]] = {}  # attribute -> value -> its words in prompts
    if text:
        _check_template(prompt_template, names)
        if data is None:
            raise toolkit.DtkError("--prompt-template needs --data: the real dataset folder")
        if words is not None:
            table = toolkit.read_words(words)
            # the audited attribute is the one the words are for; a file without it is
            # most likely spelled for another attribute name
            toolkit.attribute_words(table, attribute, source=f"--words {words}")
            spoken = {name: table[name] for name in names if name in table}
    else:  # the model's attributes are checked before any file is written
        space = toolkit.label_space(model)
        if space is None:
            raise toolkit.DtkError(
                f"{model} takes no attribute labels; synthesis needs a label-conditioned "
                "model, or a text-to-image model with --prompt-template"
            )
        values = list(space.attribute(attribute).values)
        model_classes = list(space.attribute(by).values) if by else None
    # the filters are checked (made once) before the first file is written: the default
    # data, or else plan.csv, once the plan has been checked against the words file
    consistency = {
        "attributes": [attribute] + ([by] if by and not text else []),
        "threshold": consistency_threshold, "classifier": classifier,
        "classifier_options": dict(classifier_options or {}),
    } if "label_consistency" in filters else None  # fmt: skip
    default_data = data is None
    if default_data:
        _check_consistency(consistency)
        data = out / "real"
        toolkit.write_colored_digits(data, "train", progress=progress)
    data = pathlib.Path(data)
    metadata = toolkit.read_metadata(data, names)
    if text:  # a text model can draw any value: the data's values are the groups
        values = sorted(metadata[attribute].astype(str).unique(), key=natural_key)
    shares = toolkit.target_distribution(target, values, what="--target")
    foreign = sorted(set(metadata[attribute].astype(str)) - set(values), key=natural_key)
    if foreign:
        raise toolkit.DtkError(
            f"{data}: {attribute} values {foreign} are unknown to the model ({', '.join(values)})"
        )
    classes = None
    if by:
        classes = sorted(metadata[by].astype(str).unique(), key=natural_key)
        unknown = [] if text else [c for c in classes if c not in model_classes]
        if unknown:
            raise toolkit.DtkError(
                f"{data}: {by} values {unknown} are unknown to the model "
                f"({', '.join(model_classes)})"
            )
    plan = make_plan(metadata, attribute=attribute, values=values, target=shares, by=by,
                     classes=classes, budget=budget)  # fmt: skip
    _check_words(plan, spoken, words)
    # each round takes the seeds after the previous round's and retries at most what that
    # round made: a run uses at most planned x rounds seeds
    toolkit.check_seed(seed, int(plan["generate"].sum()) * max_rounds, what="--seed")

    if not default_data:
        _check_consistency(consistency)
    filter_options: dict[str, dict[str, Any]] = {}
    if consistency is not None:
        filter_options["label_consistency"] = consistency
    if "memorization" in filters:
        filter_options["memorization"] = {"data": data, "threshold": memorization_threshold}
    write_csv(out / "plan.csv", plan)
    if on_plan is not None:
        on_plan(plan)

    given = dict(generation or {})
    defaults = {"steps": DEFAULT_STEPS, **({} if "guidance" in given else DEFAULT_GUIDANCE)}
    generation = {**defaults, **given}
    pending = [
        _condition(row, attribute, by)
        for _, row in plan.iterrows()
        for _ in range(int(row["generate"]))
    ]
    planned = len(pending)
    accepted: list[pandas.DataFrame] = []
    rejected: list[pandas.DataFrame] = []
    rounds = []
    offset = 0
    for round_index in range(max_rounds):
        if not pending:
            break
        folder = out / "rounds" / f"round-{round_index}"
        prompts = {}
        if text:
            prompts = {"prompt": [prompt_template.format(**_said(c, spoken)) for c in pending],
                       "negative_prompt": negative_prompt}  # fmt: skip
        kept = toolkit.generate(
            model, out=folder, conditions=pending, n=len(pending), seed=seed + offset, **prompts,
            filters=[f for f in DEFAULT_FILTERS if f in filters], filter_options=filter_options,
            on_flag="drop", progress=progress, **generation,
        )  # fmt: skip
        if "status" in kept.columns:  # an empty frame when every sample was rejected
            kept = kept[kept["status"] == "ok"]
        kept = kept.assign(round=round_index, folder=str(folder))
        dropped = _rejected(folder).assign(round=round_index)
        accepted.append(kept)
        rejected.append(dropped)
        rounds.append({"round": round_index, "seed_start": seed + offset,
                       "generated": len(pending), "accepted": len(kept),
                       "rejected": len(dropped)})  # fmt: skip
        offset += len(pending)
        pending = [_condition(row, attribute, by) for _, row in dropped.iterrows()]
    shortfall = len(pending)

    synthetic = _write_synthetic(out / "synthetic", accepted, attribute, by)
    rejected_all = pandas.concat(rejected, ignore_index=True) if rejected else pandas.DataFrame()
    write_csv(out / "synthetic" / "rejected.csv", rejected_all)
    combined = _combined(out, data, metadata, synthetic, attribute, by)
    write_csv(out / "combined.csv", combined)

    achieved = _achieved(plan, synthetic, attribute, by)
    write_csv(out / "plan.csv", achieved)
    reasons = _rejection_reasons(rejected_all)
    result = {
        "command": "synthesize",
        "created": now(),
        "config": {
            "data": shown_path(data),
            "model": shown_path(model),
            "out": str(out),
            "attribute": attribute,
            "by": by,
            "target": target if isinstance(target, str) else dict(target),
            "target_shares": shares,
            "budget": budget,
            "filters": list(filters),
            "consistency_threshold": consistency_threshold,
            "memorization_threshold": memorization_threshold,
            "max_rounds": max_rounds,
            "seed": seed,
            "generation": generation,
            "prompt_template": prompt_template,
            "negative_prompt": negative_prompt,
            "words": None if words is None else {"path": str(words), "words": spoken},
            "classifier": classifier,
            "classifier_options": dict(classifier_options or {}),
        },
        "plugins": [provenance("safety_filter", f) for f in filters]
        + [provenance("attribute_classifier", classifier)] * ("label_consistency" in filters),
        "versions": versions(),
        "planned": planned,
        "accepted": len(synthetic),
        "shortfall": shortfall,
        "rounds": rounds,
        "rejections": reasons,
        "plan": achieved.to_dict(orient="records"),
    }
    write_json(out / "results.json", result)
    if report:
        from evaluations.synthesis_report import write_synthesis_report

        write_synthesis_report(out, result, achieved, synthetic)
    return result


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
    take their options (a text model's classes are checked by its prompts alone, so it
    checks `attribute` only)."""
    if options is not None:
        toolkit.create_plugin("safety_filter", "label_consistency", options)


def _rejected(folder: pathlib.Path) -> pandas.DataFrame:
    import pandas

    path = folder / "rejected.csv"
    if not path.is_file():
        return pandas.DataFrame()
    return pandas.read_csv(path, dtype=str, keep_default_na=False)


def _write_synthetic(
    root: pathlib.Path, accepted: list[pandas.DataFrame], attribute: str, by: str | None
) -> pandas.DataFrame:
    """Copy the accepted images into one dataset folder (atomically, metadata last)."""
    import pandas

    frame = pandas.concat(accepted, ignore_index=True) if accepted else pandas.DataFrame()
    rows = []
    for _, row in frame.iterrows():
        source = pathlib.Path(row["folder"]) / row["file_name"]
        parent = pathlib.PurePosixPath(row["file_name"]).parent
        name = f"{parent}/r{row['round']}-{int(row['index']):06d}.png"
        toolkit.atomic_write(root / name, source.read_bytes())
        record = {"file_name": name}
        if by:
            record[by] = row[by]
        record[attribute] = row[attribute]
        record["synthetic"] = True
        record.update({k: row[k] for k in row.index if k.startswith("filter_")})
        record.update({"seed": row["seed"], "round": row["round"], "sha256": row["sha256"]})
        rows.append(record)
    columns = ["file_name", *([by] if by else []), attribute, "synthetic"]
    metadata = pandas.DataFrame(rows, columns=None if rows else columns)
    write_csv(root / "metadata.csv", metadata)
    return metadata


def _combined(
    out: pathlib.Path,
    data: pathlib.Path,
    real: pandas.DataFrame,
    synthetic: pandas.DataFrame,
    attribute: str,
    by: str | None,
) -> pandas.DataFrame:
    """Real + synthetic rows, paths relative to `out`, ready for training."""
    import pandas

    columns = [*([by] if by else []), attribute]
    relative = os.path.relpath(data.resolve(), out.resolve())
    real_part = real[["file_name", *columns]].assign(
        file_name=[(pathlib.PurePosixPath(relative) / f).as_posix() for f in real["file_name"]],
        synthetic=False,
    )
    parts = [real_part]
    if len(synthetic):
        parts.append(
            synthetic[["file_name", *columns]].assign(
                file_name=["synthetic/" + f for f in synthetic["file_name"]], synthetic=True
            )
        )
    return pandas.concat(parts, ignore_index=True)


def _achieved(
    plan: pandas.DataFrame, synthetic: pandas.DataFrame, attribute: str, by: str | None
) -> pandas.DataFrame:
    """The plan with what was actually accepted per cell (``generated``)."""
    key = by or "class"
    if len(synthetic):
        got = (
            synthetic.assign(**{key: synthetic[by] if by else "all"})
            .groupby([key, attribute])
            .size()
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
