"""Run a `Plan`: load the weights, hold the output folder, generate what is missing, merge.

The steps, in order (each a function below): pick the device and shard; load the model and
make the plugins; hold the shard's lock and claim the folder; then, window after window of
batches (a few thousand samples), on a text model encode the window's distinct prompts and
let the text encoders leave the accelerator, and batch after batch let request filters
refuse samples, sample the rest, judge the images with the image filters, write images and
records; merge the part logs; warn about failed samples; draw the grid.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import os
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING, Any

from toolkit.data.images import contact_sheet, to_pixels
from toolkit.data.output import WRITTEN, Merged, OutputFolder, PartWriter, atomic_write
from toolkit.errors import DtkError, GenerationWarning
from toolkit.generation.distributed import Shard, barrier, resolve_shard
from toolkit.generation.plan import Plan, PluginUse
from toolkit.generation.record import IDENTITY, NON_FINITE, sample_record, status
from toolkit.generation.reuse import folder_state, loaded
from toolkit.lazy import lazy_import
from toolkit.models import Model
from toolkit.models.speed import accelerate
from toolkit.registry.protocols import SampleRequest, Verdict, optional
from toolkit.sampling.engine import encode_batch, release_text_encoders, sample_images
from toolkit.sampling.safety import is_request_stage, run_filter

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_import("torch")


def resolve_device(name: str) -> torch.device:
    """``auto`` = cuda, then mps, then cpu; under torchrun each rank takes its local GPU."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise DtkError(f"--device {name!r}: {exc}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DtkError("--device cuda: no CUDA device is available")
        if device.index is None and "LOCAL_RANK" in os.environ:
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


@dataclasses.dataclass
class Runner:
    """What the steps share once the weights are loaded."""

    plan: Plan
    model: Model
    shard: Shard
    sampler: Any
    sigmas: torch.Tensor
    request_filters: list[PluginUse]
    image_filters: list[PluginUse]
    failed: int = 0
    #: guide-model branch -> its loaded guide model (`Plan.guides`)
    guides: dict[str, Model] = dataclasses.field(default_factory=dict)

    @property
    def guidance(self) -> Any:
        return self.plan.guidance.instance

    @property
    def step_cache(self) -> Any:
        return None if self.plan.step_cache is None else self.plan.step_cache.make()


def run(plan: Plan) -> Merged | None:
    """Generate what `plan` asks for into its folder (see the module docstring); returns
    how many images (this run's and any earlier run's in the folder) and rejected samples
    the merge listed, or None on a torchrun rank that does not merge. The metadata stays in
    metadata.csv: a run's memory does not grow with n (`toolkit.generate` reads it back).
    The local engine's; `toolkit.generation.generate.execute` picks the plan's."""
    runner = _start(plan)
    folder = OutputFolder(plan.out)
    with folder.hold(runner.shard.name, wait=plan.request.wait, split=str(runner.shard.count)):
        if runner.shard.is_main or not runner.shard.distributed:
            folder.claim({**plan.record, "sigmas": [float(s) for s in runner.sigmas]}, IDENTITY)
        barrier(runner.shard)
        done = folder.done(below=plan.samples.n)
        total = _count_pending(plan, done, runner.shard)
        progress = _progress(total, plan.request.progress and runner.shard.is_main,
                             runner.shard)  # fmt: skip
        writer = folder.part_writer(runner.shard.name, plan.request.format,
                                    plan.request.shard_size)  # fmt: skip
        with writer as writer, torch.inference_mode():
            for window in _windows(runner, plan.pending(done, runner.shard)):
                _encode_prompts(runner, window)
                for batch in window.batches:
                    _run_batch(runner, [plan.samples[i] for i in batch], writer)
                    progress.update(len(batch))
        progress.close()
        barrier(runner.shard)
        main = runner.shard.is_main or not runner.shard.distributed
        merged = folder.merge() if main else None
    _warn_failed(runner, total)
    if plan.grid is not None and runner.shard.is_main and merged is not None:
        _write_grid(folder, plan)
    return merged


def _start(plan: Plan) -> Runner:
    """Device and shard, weights, plugins and sigmas."""
    settings = plan.settings
    device = resolve_device(settings.device)
    shard = resolve_shard(plan.shard if plan.shard.count > 1 else None, device.type)
    load = dict(device=device, dtype=getattr(torch, settings.dtype),
                trust_pickle=settings.trust_pickle, attention_slicing=settings.attention_slicing,
                vae_tiling=settings.vae_tiling)  # fmt: skip
    model = loaded(lambda: _model_key(plan, load), lambda: _load(plan, load))
    for use in (plan.sampler, plan.schedule, *plan.filters):
        use.make()
    sigmas = plan.schedule.instance(settings.steps, model.noise_levels)
    request_filters = [f for f in plan.filters if is_request_stage(f.instance)]
    image_filters = [f for f in plan.filters if not is_request_stage(f.instance)]
    return Runner(plan, model, shard, plan.sampler.instance, sigmas, request_filters,
                  image_filters, guides=_load_guides(plan, load))  # fmt: skip


def _load(plan: Plan, load: dict[str, Any]) -> Model:
    """The model's weights loaded as `load` says, with the speed levers applied."""
    settings = plan.settings
    model = plan.folder.load(**load)
    accelerate(model, compile=settings.compile, cache=settings.compile_cache,
               channels_last=settings.channels_last)  # fmt: skip
    return model


def _model_key(plan: Plan, load: dict[str, Any]) -> dict[str, Any]:
    """Everything that shapes the loaded model (`toolkit.generation.reuse`)."""
    folder, settings = plan.folder, plan.settings
    return {"family": folder.family, "path": str(folder.path.resolve()),
            "files": folder_state(folder.path), "load": load,
            "model_options": dict(folder.model_options), "size": folder.image_size,
            "loras": [lora.describe() for lora in folder.loras],
            "speed": [settings.compile, settings.compile_cache,
                      settings.channels_last]}  # fmt: skip


def _load_guides(plan: Plan, load: dict[str, Any]) -> dict[str, Model]:
    """Each guide model of the plan loaded once, as the model is (device, precision); a
    text model's text encoders leave the accelerator at once (the guide is handed the
    model's prompt embeddings: `toolkit.GuideModel`)."""
    loaded: dict[int, Model] = {}
    guides = {}
    for branch, guide in plan.guides.items():
        if id(guide) not in loaded:
            loaded[id(guide)] = guide.folder.load(**load)
            release_text_encoders(loaded[id(guide)])
        guides[branch] = loaded[id(guide)]
    return guides


def _count_pending(plan: Plan, done: AbstractSet[int], shard: Shard) -> int:
    """How many samples `shard` still has to generate, counted without listing them."""
    owned = len(range(shard.index, plan.samples.n, shard.count))
    return owned - sum(1 for i in done if i < plan.samples.n and shard.owns(i))


def _batches(indices: Iterable[int], size: int) -> Iterator[list[int]]:
    """`indices` in lists of `size` (lazily: a run's memory does not grow with n)."""
    iterator = iter(indices)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


#: a window of the run: at most this many samples, or (a text model) this many distinct
#: prompts, whose embeddings are computed together and wait on the CPU until their batches
#: are sampled (T5-XXL's are about 4 MB each in half precision: 256 take about 1 GB)
WINDOW_SAMPLES, WINDOW_PROMPTS = 4096, 256


@dataclasses.dataclass
class Window:
    """Batches of pending indices sampled after one encoding of their prompts."""

    batches: list[list[int]] = dataclasses.field(default_factory=list)
    #: a text model's distinct (prompt, negative prompt) pairs, each with its first sample
    prompts: dict[tuple[str | None, str | None], SampleRequest] = dataclasses.field(
        default_factory=dict)  # fmt: skip
    count: int = 0


def _windows(runner: Runner, pending: Iterable[int]) -> Iterator[Window]:
    """The `pending` indices in batches, the batches in windows (lazily: memory stays flat in
    n): a window closes after the batch that brings it to `WINDOW_SAMPLES` samples or, on a
    text model, to `WINDOW_PROMPTS` distinct (prompt, negative prompt) pairs."""
    text = hasattr(runner.model, "release_text_encoders")
    window = Window()
    for batch in _batches(pending, runner.plan.settings.batch_size):
        window.batches.append(batch)
        window.count += len(batch)
        if text:
            for i in batch:
                sample = runner.plan.samples[i]
                window.prompts.setdefault((sample.prompt, sample.negative_prompt), sample)
        if window.count >= WINDOW_SAMPLES or len(window.prompts) >= WINDOW_PROMPTS:
            yield window
            window = Window()
    if window.batches:
        yield window


def _encode_prompts(runner: Runner, window: Window) -> None:
    """A text model: a window's distinct prompts (with their negative prompts and the
    guidance's own) through the text encoders, `batch_size` distinct samples at a time, then
    the encoders leave the accelerator while the window's batches are sampled
    (`toolkit.sampling.engine`; they come back for the next window's new prompts). A prompt
    is encoded once per model while its embedding is kept (`PromptEmbeddings`)."""
    if not window.prompts:  # not a text model
        return
    model = runner.model
    text_branches = optional("guidance", runner.guidance, "text_branches")
    cpu = torch.device("cpu")  # computed, not moved: the batches move their own
    for chunk in _batches(iter(window.prompts.values()), runner.plan.settings.batch_size):
        encode_batch(model, runner.guidance, chunk, text_branches, cpu)
    release_text_encoders(model)


def _run_batch(runner: Runner, batch: list[SampleRequest], writer: PartWriter) -> None:
    """Refuse, sample, judge and write one batch."""
    batch = _refuse(runner, batch, writer)
    if batch:
        images = sample_images(runner.model, runner.sampler, runner.guidance, runner.sigmas,
                               batch, guides=runner.guides,
                               step_cache=runner.step_cache)  # fmt: skip
        _write(runner, batch, images, writer)
    writer.flush()


def _refuse(runner: Runner, batch: list[SampleRequest], writer: PartWriter
            ) -> list[SampleRequest]:  # fmt: skip
    """Request filters judge the batch before any compute; refused samples are recorded."""
    if not runner.request_filters:
        return batch
    kept = []
    for sample, verdicts in zip(batch, _judge(runner.request_filters, None, batch)):
        if any(v.flagged for v in verdicts.values()):
            writer.write(_record(runner, sample, verdicts, "refused"), None)
        else:
            kept.append(sample)
    return kept


def _write(runner: Runner, batch: list[SampleRequest], images: torch.Tensor,
           writer: PartWriter) -> None:  # fmt: skip
    """Image filters judge the batch; each image is written (or withheld) with its record."""
    # the pixels to save are fixed before any filter sees the images
    pixels = to_pixels(images)
    finite = torch.isfinite(images).flatten(1).all(1).tolist()
    verdicts = _judge(runner.image_filters, images, batch)
    for k, sample in enumerate(batch):
        state = status(verdicts[k], runner.plan.settings.on_flag, finite[k])
        runner.failed += state == "failed"
        image = pixels[k] if state != "blank" else pixels[k] * 0
        writer.write(_record(runner, sample, verdicts[k], state),
                     image if state in WRITTEN else None)  # fmt: skip


def _record(runner: Runner, sample: SampleRequest, verdicts: dict[str, Verdict],
            state: str) -> dict[str, Any]:  # fmt: skip
    plan = runner.plan
    folder_name = plan.folder.folder_name(sample, plan.attribute_order)
    return sample_record(sample, folder_name, plan.common_columns(), plan.attribute_order,
                         verdicts, state)  # fmt: skip


def _judge(filters: Iterable[PluginUse], images: torch.Tensor | None,
           batch: Sequence[SampleRequest]) -> list[dict[str, Verdict]]:  # fmt: skip
    verdicts: list[dict[str, Verdict]] = [{} for _ in batch]
    for flt in filters:
        # each filter judges its own copy: one that changes its input changes nothing else
        seen = None if images is None else images.clone()
        for k, verdict in enumerate(run_filter(flt.name, flt.instance, seen, batch)):
            verdicts[k][flt.name] = verdict
    return verdicts


def _warn_failed(runner: Runner, total: int) -> None:
    if runner.failed:
        warnings.warn(
            f"{runner.failed} of {total} samples had non-finite values ({NON_FINITE}) and "
            f"were not written; see {runner.plan.out / 'rejected.csv'}",
            GenerationWarning,
            stacklevel=3,
        )


def _write_grid(folder: OutputFolder, plan: Plan) -> None:
    """The contact sheet of the first 64 images metadata.csv lists."""
    import io

    from toolkit.data.shards import read_images

    rows = _first_rows(folder, 64)
    if plan.grid is None or not rows:
        return
    if rows[0].get("shard"):  # a sharded format: the images are read out of their shards
        images: list[Any] = [io.BytesIO(b) for b in read_images(folder.root, rows)]
    else:
        images = [folder.path(row["file_name"]) for row in rows]
    atomic_write(plan.grid, contact_sheet(images))


def _first_rows(folder: OutputFolder, count: int) -> list[dict[str, str]]:
    """The first `count` rows of metadata.csv, read a row at a time (it may list
    millions)."""
    with open(folder.root / "metadata.csv", encoding="utf-8", newline="") as handle:
        return list(itertools.islice(csv.DictReader(handle), count))


def _progress(total: int, enabled: bool, shard: Shard) -> Any:
    from tqdm.auto import tqdm

    label = "generating" if shard.count == 1 else f"generating ({shard.index}/{shard.count})"
    return tqdm(total=total, desc=label, unit="img", file=sys.stderr, disable=not enabled)
