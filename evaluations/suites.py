"""Prompt suites: one bias audit over many prompts, as text-to-image audits are run (Fair
Diffusion: 153 occupations x 250 images; StableBias: professions x adjectives).

A suite file is a CSV with a ``prompt`` column, one prompt per row, and any other columns as
groupings of the prompts (``category``, ``source``, ...)::

    prompt,category
    a photo of a nurse,health
    a photo of a firefighter,public safety

`audit_bias` generates ``n`` images per prompt (sample ``i`` of prompt ``k`` has seed
``seed + k * n + i``, so one prompt's images do not depend on the others'), reads each
prompt's shares from the same predictions, and `summarize_suite` adds what describes the
suite as a whole, per attribute:

* per prompt: its shares (Wilson intervals, as any audit's) and its skew, the total
  variation distance from the target (for two values: ``|p - target|``);
* the mean skew over the prompts, and the share of prompts beyond 90/10 (a value taking at
  least `SKEWED` of a prompt's images), each with a BCa interval from resampling every
  prompt's images independently (the prompts are fixed; the images are the sample);
* the same two figures per value of each grouping column;
* the most and least skewed prompts.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import toolkit
from evaluations import metrics
from evaluations.common import jsonable
from evaluations.results import MetricValue

if TYPE_CHECKING:
    import numpy as np
    import pandas

#: a prompt is skewed when one value takes at least this share of its images (90/10)
SKEWED = 0.9
#: the column of a suite file that holds the prompts, and of the metadata that records them
PROMPT = "prompt"
#: prompts named in the summary at each end of the skew ranking
EXTREMES = 3
#: the suites shipped with the package (evaluations/prompt_suites/README.md), by name
SHIPPED = pathlib.Path(__file__).resolve().parent / "prompt_suites"


def shipped_suites() -> list[str]:
    return sorted(p.stem for p in SHIPPED.glob("*.csv"))


def suite_path(name: str | pathlib.Path) -> pathlib.Path:
    """`name` as a file: a shipped suite's name names its CSV unless a file of that name
    exists where dtk runs; anything else is a path."""
    path = pathlib.Path(name)
    shipped = SHIPPED / f"{name}.csv"
    if not path.exists() and str(name) in shipped_suites():
        return shipped
    return path


@dataclasses.dataclass
class Suite:
    """A suite file's prompts, in file order, and its grouping columns (per prompt)."""

    path: str
    prompts: list[str]
    groupings: dict[str, list[str]]

    def sample_prompts(self, n: int) -> list[str]:
        """The prompt of each of ``n * len(prompts)`` samples: `n` of each, prompt by prompt."""
        return [prompt for prompt in self.prompts for _ in range(n)]


def read_suite(path: str | pathlib.Path) -> Suite:
    """The suite in CSV file `path`; every mistake (no file, no ``prompt`` column, an empty
    or repeated prompt) a `toolkit.DtkError` naming the file."""
    import pandas

    path = suite_path(path)
    try:
        table = pandas.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise toolkit.DtkError(f"--prompts-file {path} does not exist (nor is it a shipped "
                               f"suite: {', '.join(shipped_suites())})") from None  # fmt: skip
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise toolkit.DtkError(f"cannot read --prompts-file {path}: {exc}") from None
    if PROMPT not in table.columns:
        raise toolkit.DtkError(f"{path} has no {PROMPT!r} column; its columns: "
                               f"{', '.join(map(str, table.columns)) or '(none)'}")  # fmt: skip
    prompts = [p.strip() for p in table[PROMPT]]
    if not prompts:
        raise toolkit.DtkError(f"{path} lists no prompts")
    for row, prompt in enumerate(prompts, start=2):  # row 1 is the header
        if not prompt:
            raise toolkit.DtkError(f"{path}, row {row}: the prompt is empty")
        first = prompts.index(prompt) + 2
        if first != row:
            raise toolkit.DtkError(f"{path}, row {row}: {prompt!r} is listed twice (row "
                                   f"{first}); list each prompt once")  # fmt: skip
    groupings = {str(c): [str(v) for v in table[c]] for c in table.columns if c != PROMPT}
    return Suite(str(path), prompts, groupings)


@dataclasses.dataclass
class PromptSkew:
    """One prompt: its known predictions, its shares and its skew (total variation from the
    target)."""

    prompt: str
    known: int
    shares: dict[str, float | None]
    skew: float | None
    groupings: dict[str, str]


@dataclasses.dataclass
class SuiteFigures:
    """A set of prompts' mean skew and share of skewed prompts, with 95% BCa intervals, over
    the `prompts` of them with known predictions."""

    prompts: int
    mean_skew: MetricValue
    skewed_share: MetricValue


@dataclasses.dataclass
class SuiteSummary:
    """What describes a suite as a whole for one attribute (see the module docstring)."""

    attribute: str
    target: dict[str, float]
    prompts: list[PromptSkew]
    overall: SuiteFigures
    #: per grouping column, per value: the figures of its prompts
    by_grouping: dict[str, dict[str, SuiteFigures]]

    def ranked(self) -> list[PromptSkew]:
        """The prompts with a skew, most skewed first (file order among equals)."""
        measured = [p for p in self.prompts if p.skew is not None]
        return sorted(measured, key=lambda p: -p.skew)

    def most_skewed(self) -> list[PromptSkew]:
        return self.ranked()[:EXTREMES]

    def least_skewed(self) -> list[PromptSkew]:
        return self.ranked()[::-1][:EXTREMES]

    def frame(self) -> pandas.DataFrame:
        """One row per prompt (suite_<attribute>.csv): shares, skew, groupings."""
        import pandas

        rows = []
        for p in self.prompts:
            shares = {f"share_{label}": share for label, share in p.shares.items()}
            skewed = None if p.skew is None else _skewed(p)
            rows.append({"prompt": p.prompt, **p.groupings, "known": p.known, **shares,
                         "skew": p.skew, "skewed": skewed})  # fmt: skip
        return pandas.DataFrame(rows)

    def to_json(self) -> dict[str, Any]:
        return jsonable({
            "attribute": self.attribute,
            "target": dict(self.target),
            "skewed_at": SKEWED,
            **dataclasses.asdict(self.overall),
            "by_grouping": {column: {value: dataclasses.asdict(f) for value, f in values.items()}
                            for column, values in self.by_grouping.items()},
            "most_skewed": [p.prompt for p in self.most_skewed()],
            "least_skewed": [p.prompt for p in self.least_skewed()],
            "prompts": [dataclasses.asdict(p) for p in self.prompts],
        })  # fmt: skip


def _skewed(prompt: PromptSkew) -> bool:
    return max(s for s in prompt.shares.values() if s is not None) >= SKEWED


def summarize_suite(
    suite: Suite,
    attribute: str,
    predicted: Sequence[str],
    prompts: Sequence[str],
    labels: Sequence[str],
    target: Mapping[str, float],
    *,
    n_boot: int = 2000,
    seed: int = 0,
) -> SuiteSummary:
    """The suite figures of one attribute from its per-image predictions (``unknown`` left
    out) and each image's prompt; `target` maps every label to its target share."""
    import numpy as np

    labels = list(labels)
    t = np.array([float(target[label]) for label in labels])
    samples = _samples(suite, predicted, prompts, labels)
    rows = []
    for k, prompt in enumerate(suite.prompts):
        counts = np.bincount(samples[k], minlength=len(labels))
        total = int(counts.sum())
        shares = [float(c / total) if total else None for c in counts]
        rows.append(PromptSkew(prompt, total, dict(zip(labels, shares)), skew(counts, t),
                               {c: v[k] for c, v in suite.groupings.items()}))  # fmt: skip
    figures = _SuiteFigures(t, n_boot, seed)
    by_grouping = {
        column: {value: figures.of([s for s, v in zip(samples, values) if v == value])
                 for value in dict.fromkeys(values)}
        for column, values in suite.groupings.items()
    }  # fmt: skip
    return SuiteSummary(attribute, dict(zip(labels, t.tolist())), rows, figures.of(samples),
                        by_grouping)  # fmt: skip


def _samples(suite: Suite, predicted: Sequence[str], prompts: Sequence[str],
             labels: list[str]) -> list[np.ndarray]:  # fmt: skip
    """Per suite prompt, its images' known predictions as label indices."""
    import numpy as np

    index = {label: j for j, label in enumerate(labels)}
    per_prompt: dict[str, list[int]] = {prompt: [] for prompt in suite.prompts}
    for label, prompt in zip(predicted, prompts):
        if prompt not in per_prompt:
            raise toolkit.DtkError(f"an image's prompt {prompt!r} is not in {suite.path}")
        if label in index:  # unknown predictions are left out, as in every share
            per_prompt[prompt].append(index[label])
    return [np.array(per_prompt[p], dtype=np.int64) for p in suite.prompts]


def skew(counts: np.ndarray, target: np.ndarray) -> float | None:
    """A prompt's (or any row's) skew: the total variation of its `counts`' shares from
    `target`; None without counts."""
    total = counts.sum()
    return None if total == 0 else float(metrics.total_variation(counts / total, target))


def label_shares(sample: np.ndarray, labels: int, axis: int = -1) -> np.ndarray:
    """Each label's share of a sample of label indices along `axis` (labels on the last)."""
    import numpy as np

    return np.stack([(sample == j).mean(axis=axis) for j in range(labels)], axis=-1)


def mean_skew(samples: Sequence[np.ndarray], target: np.ndarray, axis: int = -1) -> np.ndarray:
    """The mean over prompts (one sample of label indices each) of their skew: the total
    variation of their shares from `target`. Vectorized over resamples along `axis`."""
    import numpy as np

    skews = [metrics.total_variation(label_shares(s, len(target), axis), target) for s in samples]
    return np.mean(np.stack(skews, axis=-1), axis=-1)


def interval(statistic: Any, samples: list[np.ndarray], n_boot: int, seed: int) -> MetricValue:
    """`statistic` of the prompts' `samples` with its 95% BCa interval, each prompt's
    sample resampled independently."""
    point = float(statistic(*samples))
    low, high = metrics.bca_interval(statistic, samples, point, n_boot, 0.95, seed)
    return MetricValue(point, low, high)


@dataclasses.dataclass
class _SuiteFigures:
    """The mean skew and the skewed share of a set of prompts, with BCa intervals."""

    target: np.ndarray
    n_boot: int
    seed: int

    def of(self, samples: Sequence[np.ndarray]) -> SuiteFigures:
        """The figures over the prompts with images (a prompt whose every prediction was
        unknown has no shares)."""
        import numpy as np

        measured = [s for s in samples if len(s)]
        if not measured:
            nothing = MetricValue(None, None, None)
            return SuiteFigures(0, nothing, nothing)
        labels = len(self.target)

        def mean(*resampled: np.ndarray, axis: int = -1) -> np.ndarray:
            return mean_skew(resampled, self.target, axis)

        def skewed(*resampled: np.ndarray, axis: int = -1) -> np.ndarray:
            top = [label_shares(s, labels, axis).max(axis=-1) for s in resampled]
            return (np.stack(top, axis=-1) >= SKEWED).mean(axis=-1)

        return SuiteFigures(len(measured), interval(mean, measured, self.n_boot, self.seed),
                            interval(skewed, measured, self.n_boot, self.seed))  # fmt: skip
