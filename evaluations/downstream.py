"""`dtk eval downstream`: does synthetic data make a classifier fairer?

A classifier for `label` (e.g. ``digit``) is trained several ways and tested on a held-out
set that holds every `attribute` group (e.g. ``group``); fairlearn's `MetricFrame` gives the
accuracy of each group, the worst of them and the gap between the best and the worst.

Methods (every one gets the same number of optimizer steps, so only the data differs):

* ``real``: the real training data as it is;
* ``oversample``: the real data with each label's smaller groups duplicated up to its
  largest group (the trivial baseline);
* ``jitter``: the real data under a generic color jitter (brightness, contrast, saturation,
  hue), drawn afresh for every image at every step;
* ``synthetic``: real and synthetic data pooled;
* ``pretrain_finetune``: the first half of the steps on synthetic data, the rest on real
  data ("fake it till you make it"). `dtk synthesize` makes only the missing (minority)
  cells, so here the pretraining sees one group; the method is meant for synthetic sets
  that cover every cell, and is reported for comparison.

Models: ``cnn`` (three small conv layers, made for 16x16 images) and ``logreg``
(multinomial logistic regression on the pixels, a linear layer). Images of other sizes are
resized to 16x16. Each (model, method, seed) is one run; ``gap_reduction`` compares every
run's gap with the ``real`` run of the same model and seed, so seed-to-seed noise shared by
both cancels.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

import toolkit
from evaluations.common import jsonable
from toolkit import natural_key

if TYPE_CHECKING:
    import torch

__all__ = [
    "METHODS",
    "MODELS",
    "DownstreamConfig",
    "DownstreamResult",
    "build_model",
    "color_jitter",
    "evaluate",
    "mean_interval",
    "oversample_index",
    "run_downstream",
    "summarize_runs",
    "t_interval",
]

METHODS = ("real", "oversample", "jitter", "synthetic", "pretrain_finetune")
NEEDS_SYNTHETIC = ("synthetic", "pretrain_finetune")
MODELS = ("cnn", "logreg")
IMAGE_SIZE = 16
#: optimizer steps per run when `steps` is not given (see `run_downstream` for the choice)
DEFAULT_STEPS = {"cnn": 300, "logreg": 300}
LEARNING_RATE = {"cnn": 3e-3, "logreg": 1e-2}
WEIGHT_DECAY = 1e-4
SUMMARY_METRICS = ("overall", "worst_group", "gap", "gap_reduction")


# --------------------------------------------------------------------------------------------
# Statistics


def t_interval(values: Iterable[float], confidence: float = 0.95) -> tuple[Any, Any]:
    """Student-t interval for the mean of `values` (``scipy.stats.t.interval`` around the
    mean with the standard error); ``(None, None)`` below two values.

    Identical values give a zero-width interval rather than scipy's NaN for a zero scale.
    """
    from scipy.stats import sem, t

    array = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if len(array) < 2:
        return None, None
    mean, scale = float(array.mean()), float(sem(array))
    if scale == 0:
        return mean, mean
    low, high = t.interval(confidence, len(array) - 1, loc=mean, scale=scale)
    return float(low), float(high)


def mean_interval(name: str, values: np.ndarray, confidence: float = 0.95) -> dict[str, Any]:
    """``{name}_mean``, ``{name}_ci_low`` and ``{name}_ci_high`` of `values` over seeds (the
    mean None when there are none)."""
    low, high = t_interval(values, confidence)
    mean = float(values.mean()) if len(values) else None
    return {f"{name}_mean": mean, f"{name}_ci_low": low, f"{name}_ci_high": high}


def evaluate(y_true: Sequence[Any], y_pred: Sequence[Any], groups: Sequence[Any]) -> dict:
    """Accuracy overall and per group (fairlearn), its worst group and the best-worst gap."""
    from fairlearn.metrics import MetricFrame
    from sklearn.metrics import accuracy_score

    frame = MetricFrame(
        metrics=accuracy_score,
        y_true=np.asarray(y_true),
        y_pred=np.asarray(y_pred),
        sensitive_features=pd.Series(np.asarray(groups), name="group"),
    )
    by_group = {str(g): float(v) for g, v in frame.by_group.items()}
    return {
        "overall": float(frame.overall),
        "worst_group": float(frame.group_min()),
        "gap": float(frame.difference()),
        "by_group": dict(sorted(by_group.items(), key=lambda item: natural_key(item[0]))),
    }


def summarize_runs(
    runs: pd.DataFrame, confidence: float = 0.95, *, models: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
) -> pd.DataFrame:  # fmt: skip
    """Per model and method: the mean and t-interval over seeds of overall accuracy, worst
    group accuracy, gap and ``gap_reduction`` (1 - gap / gap of ``real``, paired by seed).

    A seed whose ``real`` gap is zero has no relative reduction and is left out of that
    mean; without ``real`` runs every reduction is None.
    """
    models = list(models) if models is not None else list(dict.fromkeys(runs["model"]))
    methods = list(methods) if methods is not None else list(dict.fromkeys(runs["method"]))
    real_gap = runs[runs["method"] == "real"].set_index(["model", "seed"])["gap"]
    rows = []
    for model in models:
        for method in methods:
            chosen = runs[(runs["model"] == model) & (runs["method"] == method)]
            if chosen.empty:
                continue
            keys = pd.MultiIndex.from_arrays([chosen["model"], chosen["seed"]])
            baseline = real_gap.reindex(keys).to_numpy(dtype=float)
            with np.errstate(divide="ignore", invalid="ignore"):
                reduction = 1.0 - chosen["gap"].to_numpy(dtype=float) / baseline
            row: dict[str, Any] = {"model": model, "method": method, "seeds": len(chosen)}
            columns = {
                "overall": chosen["overall"].to_numpy(dtype=float),
                "worst_group": chosen["worst_group"].to_numpy(dtype=float),
                "gap": chosen["gap"].to_numpy(dtype=float),
                "gap_reduction": reduction[np.isfinite(reduction)],
            }
            for name, values in columns.items():
                row.update(mean_interval(name, values, confidence))
            rows.append(row)
    columns = ["model", "method", "seeds"] + [
        f"{name}_{part}" for name in SUMMARY_METRICS for part in ("mean", "ci_low", "ci_high")
    ]
    return pd.DataFrame(rows, columns=columns)


# --------------------------------------------------------------------------------------------
# Training data


def oversample_index(labels: Sequence[Any], groups: Sequence[Any], seed: int = 0) -> np.ndarray:
    """Row indices in which, within each label, every group has its largest group's count.

    Every row is kept; a smaller group is repeated whole as often as fits, and the remainder
    is drawn from it without replacement, so the numbers of copies of two rows of a group
    differ by at most one. Groups absent from a label stay absent (there is nothing to copy).
    """
    labels, groups = np.asarray(labels), np.asarray(groups)
    if len(labels) != len(groups):
        raise toolkit.DtkError(f"{len(labels)} labels but {len(groups)} groups")
    rng = np.random.default_rng(seed)
    parts = []
    for value in sorted(set(labels.tolist()), key=natural_key):
        in_label = labels == value
        cells = [np.flatnonzero(in_label & (groups == g)) for g in sorted(set(groups[in_label]))]
        target = max(len(c) for c in cells)
        for cell in cells:
            repeats, rest = divmod(target, len(cell))
            parts += [np.tile(cell, repeats), rng.choice(cell, rest, replace=False)]
    return np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)


def color_jitter(
    images: torch.Tensor,
    generator: torch.Generator,
    *,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    hue: float = 0.1,
) -> torch.Tensor:
    """Random brightness, contrast, saturation and hue per image (torchvision's ranges).

    Hue is a rotation of every pixel's color about the gray axis by up to ``hue`` of a full
    turn: a channel mix that keeps gray gray, cheap enough to run on every batch.
    """
    import torch

    n = images.shape[0]

    def factor(spread: float) -> torch.Tensor:
        u = torch.rand(n, 1, 1, 1, generator=generator).to(images.device)
        return 1 - spread + 2 * spread * u

    luma = torch.tensor([0.299, 0.587, 0.114], device=images.device).view(1, 3, 1, 1)

    def gray(x: torch.Tensor) -> torch.Tensor:
        return (x * luma).sum(1, keepdim=True)

    x = (images * factor(brightness)).clamp(0, 1)
    mean = gray(x).mean((2, 3), keepdim=True)
    x = ((x - mean) * factor(contrast) + mean).clamp(0, 1)
    g = gray(x)
    x = ((x - g) * factor(saturation) + g).clamp(0, 1)
    angle = (2 * torch.rand(n, generator=generator) - 1) * hue * 2 * math.pi
    axis = torch.full((3,), 1 / math.sqrt(3))
    cross = torch.tensor(
        [[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]]
    )
    cos, sin = angle.cos().view(n, 1, 1), angle.sin().view(n, 1, 1)
    rotation = cos * torch.eye(3) + sin * cross + (1 - cos) * torch.outer(axis, axis)
    x = torch.einsum("nij,njhw->nihw", rotation.to(images.device), x)
    return x.clamp(0, 1)


def build_model(name: str, num_labels: int) -> torch.nn.Module:
    """A fresh, randomly initialised classifier for ``[B, 3, 16, 16]`` inputs."""
    from torch import nn

    if name == "cnn":
        return nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * (IMAGE_SIZE // 4) ** 2, num_labels),
        )
    if name == "logreg":
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * IMAGE_SIZE**2, num_labels))
    raise toolkit.DtkError(f"unknown model {name!r}; choose from: {', '.join(MODELS)}")


@dataclasses.dataclass
class _Data:
    images: torch.Tensor  # [N, 3, 16, 16] in [0, 1], on the training device
    labels: torch.Tensor  # label codes
    groups: np.ndarray  # attribute values as strings ("" where the folder has none)


def _load(data: Any, columns: Sequence[str], what: str) -> toolkit.ImageDataset:
    if isinstance(data, toolkit.ImageDataset):
        missing = [c for c in columns if c not in data.metadata.columns]
        if missing:
            raise toolkit.DtkError(f"{what} data has no {missing[0]!r} column")
        return data
    if isinstance(data, (str, os.PathLike)):
        return toolkit.load_image_folder(data, list(columns))
    raise toolkit.DtkError(f"{what} data must be an ImageDataset or a folder, not {data!r}")


def _prepare(
    dataset: toolkit.ImageDataset, label: str, attribute: str, labels: list[str], device: Any
) -> _Data:
    import torch.nn.functional as F

    images = dataset.images.float()
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise toolkit.DtkError(f"{dataset.root}: images must be [N, 1 or 3, H, W]")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    if tuple(images.shape[2:]) != (IMAGE_SIZE, IMAGE_SIZE):
        images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear",
                               antialias=True, align_corners=False)  # fmt: skip
    metadata = dataset.metadata
    groups = (
        metadata[attribute].astype(str).to_numpy()
        if attribute in metadata.columns
        else np.full(len(metadata), "", dtype=object)
    )
    return _Data(
        images.clamp(0, 1).contiguous().to(device),
        dataset.codes(label, labels).to(device),
        groups,
    )


def _subset(data: _Data, index: np.ndarray) -> _Data:
    import torch

    rows = torch.as_tensor(index, dtype=torch.long, device=data.images.device)
    return _Data(data.images[rows], data.labels[rows], data.groups[index])


def _pool(*parts: _Data) -> _Data:
    import torch

    return _Data(
        torch.cat([p.images for p in parts]),
        torch.cat([p.labels for p in parts]),
        np.concatenate([p.groups for p in parts]),
    )


# --------------------------------------------------------------------------------------------
# Training and one run


def _batches(n: int, steps: int, batch_size: int, generator: torch.Generator) -> Iterator:
    """`steps` index batches walking through fresh permutations of ``range(n)``: every row is
    seen once per pass, however the batch size divides `n`."""
    import torch

    order = torch.zeros(0, dtype=torch.long)
    for _ in range(steps):
        while len(order) < batch_size:
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        yield order[:batch_size]
        order = order[batch_size:]


def _train(
    network: torch.nn.Module,
    phases: Sequence[tuple[_Data, int]],
    *,
    lr: float,
    batch_size: int,
    order: torch.Generator,
    augment: torch.Generator | None,
) -> None:
    import torch
    import torch.nn.functional as F

    network.train()
    for data, steps in phases:
        # A fresh optimizer per phase: finetuning starts without the pretraining moments.
        optimizer = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
        for index in _batches(len(data.labels), steps, batch_size, order):
            index = index.to(data.images.device)
            x = data.images[index]
            if augment is not None:
                x = color_jitter(x, augment)
            loss = F.cross_entropy(network(x - 0.5), data.labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


def _predict(network: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    import torch

    network.eval()
    with torch.no_grad():
        chunks = [
            network(images[i : i + 1024] - 0.5).argmax(1) for i in range(0, len(images), 1024)
        ]
    return torch.cat(chunks).cpu().numpy()


def _seed(*parts: int) -> int:
    # SeedSequence mixes the parts, so neighbouring seeds give unrelated streams.
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> 1)


def _run(
    model: str,
    method: str,
    seed: int,
    *,
    real: _Data,
    synthetic: _Data | None,
    test: _Data,
    num_labels: int,
    steps: int,
    batch_size: int,
) -> dict[str, Any]:
    import torch

    model_id = MODELS.index(model)
    # Initial weights and batch order depend on (model, seed) only: every method of a seed
    # starts from the same network, which pairs the runs that gap_reduction compares.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed(seed, model_id))
        network = build_model(model, num_labels).to(real.images.device)
    order = torch.Generator().manual_seed(_seed(seed, model_id, 1))
    augment = None
    if method == "real":
        phases = [(real, steps)]
    elif method == "oversample":
        index = oversample_index(real.labels.cpu().numpy(), real.groups, seed)
        phases = [(_subset(real, index), steps)]
    elif method == "jitter":
        phases = [(real, steps)]
        augment = torch.Generator().manual_seed(_seed(seed, model_id, 2))
    elif method == "synthetic":
        assert synthetic is not None
        phases = [(_pool(real, synthetic), steps)]
    else:
        assert synthetic is not None
        phases = [(synthetic, steps // 2), (real, steps - steps // 2)]
    _train(network, phases, lr=LEARNING_RATE[model], batch_size=batch_size, order=order,
           augment=augment)  # fmt: skip
    predicted = _predict(network, test.images)
    figures = evaluate(test.labels.cpu().numpy(), predicted, test.groups)
    return {"model": model, "method": method, "seed": seed, **figures}


# --------------------------------------------------------------------------------------------
# Public entry point


@dataclasses.dataclass
class DownstreamConfig:
    """What `run_downstream` ran, on what, and how long it took."""

    label: str
    attribute: str
    labels: list[str]
    #: the `attribute` values of the test set: the groups accuracy is reported for
    groups: list[str]
    methods: list[str]
    models: list[str]
    seeds: list[int]
    steps: dict[str, int]
    batch_size: int
    learning_rate: dict[str, float]
    device: str
    threads: int
    sizes: dict[str, int | None]
    real_group_counts: dict[str, int]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return jsonable(dataclasses.asdict(self))


@dataclasses.dataclass
class DownstreamResult:
    """`runs`: one row per (model, method, seed); `summary`: one row per (model, method);
    `skipped`: methods not run, with the reason; `config`: what was run, on what, how long."""

    runs: pd.DataFrame
    summary: pd.DataFrame
    skipped: dict[str, str]
    config: DownstreamConfig

    def summary_records(self) -> list[dict[str, Any]]:
        """The summary's rows, missing figures (NaN) as None."""
        return jsonable(self.summary.to_dict("records"))

    def to_json(self) -> dict[str, Any]:
        """Plain Python types only; NaN (and missing intervals) as None."""
        return jsonable(
            {
                "config": self.config.to_json(),
                "skipped": self.skipped,
                "summary": self.summary.to_dict("records"),
                "runs": self.runs.to_dict("records"),
            }
        )


def _choose(given: Iterable[str] | None, known: Sequence[str], what: str) -> list[str]:
    chosen = list(known) if given is None else list(dict.fromkeys(given))
    unknown = [c for c in chosen if c not in known]
    if unknown:
        raise toolkit.DtkError(f"unknown {what} {unknown[0]!r}; choose from: {', '.join(known)}")
    if not chosen:
        raise toolkit.DtkError(f"no {what} chosen")
    return chosen


def _seeds(seeds: int | Iterable[int]) -> list[int]:
    chosen = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not chosen or any(s < 0 for s in chosen) or len(set(chosen)) != len(chosen):
        raise toolkit.DtkError(f"seeds must be a positive count or distinct seeds >= 0: {seeds}")
    return chosen


def run_downstream(
    real: toolkit.ImageDataset | str | os.PathLike,
    test: toolkit.ImageDataset | str | os.PathLike,
    synthetic: toolkit.ImageDataset | str | os.PathLike | None = None,
    *,
    label: str = "digit",
    attribute: str = "group",
    methods: Iterable[str] | None = None,
    models: Iterable[str] = ("cnn",),
    seeds: int | Iterable[int] = 5,
    steps: int | None = None,
    batch_size: int = 64,
    progress: bool = True,
    device: str = "cpu",
    threads: int | None = None,
) -> DownstreamResult:
    """Train a `label` classifier per model, method and seed; test each on `test`.

    `real`, `test` and `synthetic` are `toolkit.ImageDataset`s or dataset folders; `real`
    and `test` need the `label` and `attribute` columns, `synthetic` the `label` column.
    `methods` defaults to every one of `METHODS`; those needing synthetic data are skipped
    (and listed in ``skipped``) without it. `seeds` is a count (seeds 0..n-1) or the seeds.
    `steps` is the optimizer-step budget of every run (default: `DEFAULT_STEPS`: long enough
    that the real-only gap on colored digits has stopped shrinking, and 5 methods x 5 seeds
    of ``cnn`` take about a minute on a CPU core).

    `threads`, if given, is torch's intra-op thread count while this runs (restored after).
    These networks are too small to gain from several threads, and on a CPU shared with
    other work the threads' synchronisation makes each step many times slower: 1 is the
    fastest setting there. None leaves torch's setting alone.
    """
    started = time.perf_counter()
    # 1. the choices, checked before any data is read
    methods, models = _choose(methods, METHODS, "method"), _choose(models, MODELS, "model")
    seed_list = _seeds(seeds)
    _check_budgets(steps, batch_size, threads)
    skipped = {}
    if synthetic is None:
        skipped = {m: "no synthetic data given" for m in methods if m in NEEDS_SYNTHETIC}
        methods = [m for m in methods if m not in skipped]
    # 2. the data, as tensors on the training device, the labels coded alike in every set
    data = _Datasets.load(real, test, synthetic, label=label, attribute=attribute,
                          device=device)  # fmt: skip
    # 3. one run per model, method and seed
    plan = [(model, method, seed) for model in models for method in methods for seed in seed_list]
    runs, used_threads = _run_all(plan, data, steps=steps, batch_size=batch_size,
                                  threads=threads, progress=progress)  # fmt: skip
    # 4. the summary over seeds, and what was run
    config = DownstreamConfig(
        label=label, attribute=attribute, labels=data.labels, groups=data.groups,
        methods=methods, models=models, seeds=seed_list,
        steps={m: steps or DEFAULT_STEPS[m] for m in models}, batch_size=batch_size,
        learning_rate={m: LEARNING_RATE[m] for m in models}, device=str(data.device),
        threads=used_threads, sizes=data.sizes(), real_group_counts=_counts(data.real.groups),
        seconds=round(time.perf_counter() - started, 1),
    )  # fmt: skip
    return DownstreamResult(runs, summarize_runs(runs, models=models, methods=methods), skipped,
                            config)  # fmt: skip


def _check_budgets(steps: int | None, batch_size: int, threads: int | None) -> None:
    if steps is not None and steps < 2:
        raise toolkit.DtkError(f"steps must be at least 2 (pretrain_finetune halves it): {steps}")
    if batch_size < 1:
        raise toolkit.DtkError(f"batch_size must be at least 1: {batch_size}")
    if threads is not None and threads < 1:
        raise toolkit.DtkError(f"threads must be at least 1: {threads}")


@dataclasses.dataclass
class _Datasets:
    """The real, test and (optional) synthetic data of the runs, prepared for training."""

    real: _Data
    test: _Data
    synthetic: _Data | None
    labels: list[str]
    #: the test set's groups, the ones each run's accuracy is broken down by
    groups: list[str]
    device: Any
    loaded: dict[str, toolkit.ImageDataset | None]

    @classmethod
    def load(cls, real: Any, test: Any, synthetic: Any, *, label: str, attribute: str,
             device: str) -> _Datasets:  # fmt: skip
        sets = {
            "real": _load(real, [label, attribute], "real"),
            "test": _load(test, [label, attribute], "test"),
            "synthetic": None if synthetic is None else _load(synthetic, [label], "synthetic"),
        }
        # the union of every set's labels, so a label missing from one set keeps its code
        labels = sorted({v for s in sets.values() if s is not None for v in s.values(label)},
                        key=natural_key)  # fmt: skip
        torch_device = toolkit.resolve_device(device)
        prepared = {name: None if s is None else _prepare(s, label, attribute, labels,
                                                          torch_device)
                    for name, s in sets.items()}  # fmt: skip
        groups = sorted(set(prepared["test"].groups.tolist()), key=natural_key)
        return cls(prepared["real"], prepared["test"], prepared["synthetic"], labels, groups,
                   torch_device, sets)  # fmt: skip

    def sizes(self) -> dict[str, int | None]:
        return {name: None if self.loaded[name] is None else len(self.loaded[name])
                for name in ("real", "synthetic", "test")}  # fmt: skip


def _run_all(plan: list[tuple[str, str, int]], data: _Datasets, *, steps: int | None,
             batch_size: int, threads: int | None, progress: bool
             ) -> tuple[pd.DataFrame, int]:  # fmt: skip
    """Every run of `plan`, one row each, under `threads` torch threads (restored after);
    and the thread count the runs used."""
    import torch
    from tqdm.auto import tqdm

    rows = []
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        bar = tqdm(plan, desc="downstream", unit="run", file=sys.stderr, disable=not progress)
        for model, method, seed in bar:
            bar.set_postfix_str(f"{model} {method} seed {seed}", refresh=False)
            run = _run(
                model, method, seed, real=data.real, synthetic=data.synthetic, test=data.test,
                num_labels=len(data.labels), steps=steps or DEFAULT_STEPS[model],
                batch_size=batch_size,
            )  # fmt: skip
            by_group = run.pop("by_group")
            rows.append({**run, **{f"accuracy_{g}": by_group.get(g) for g in data.groups}})
        bar.close()
    finally:
        torch.set_num_threads(previous_threads)
    columns = ["model", "method", "seed", "overall", "worst_group", "gap"]
    runs = pd.DataFrame(rows, columns=columns + [f"accuracy_{g}" for g in data.groups])
    return runs, threads or previous_threads


def _counts(groups: np.ndarray) -> dict[str, int]:
    values, counts = np.unique(groups, return_counts=True)
    order = sorted(range(len(values)), key=lambda i: natural_key(values[i]))
    return {str(values[i]): int(counts[i]) for i in order}
