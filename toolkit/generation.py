"""`generate`: a model folder -> a dataset folder of images, through the plugins.

The data flow (docs/architecture.md): load the model (`toolkit.model`), wrap it as a
sigma-space denoiser with guidance (`toolkit.denoiser`), take sigmas from the schedule
plugin, integrate with the sampler plugin from per-sample noise, judge with the safety
filter plugins (`toolkit.safety`), write images and metadata atomically (`toolkit.output`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from toolkit._lazy import lazy_import
from toolkit.checks import check_positive, check_seed, check_writable
from toolkit.conditions import folder_name
from toolkit.denoiser import GuidedDenoiser, TextConditioning, UNetDenoiser, check_guidance
from toolkit.distributed import Shard, barrier, resolve_shard
from toolkit.errors import DtkError, GenerationWarning
from toolkit.images import contact_sheet, to_pixels, to_unit
from toolkit.installed import versions
from toolkit.model import LoadedModel, label_space, load_model
from toolkit.output import WRITTEN, OutputFolder, atomic_write
from toolkit.registry import Registry, get_registry
from toolkit.safety import ON_FLAG, SampleRequest, Verdict, is_request_stage, run_filter
from toolkit.text_model import TextModel, is_text_model

if TYPE_CHECKING:
    import pandas
    import torch
else:
    torch = lazy_import("torch")

DTYPES = ("float32", "float16", "bfloat16")
#: run.json keys that must agree for a rerun to resume an existing folder
IDENTITY = ("model", "conditions", "prompt", "negative_prompt", "seed", "sampler", "schedule",
            "steps", "guidance", "filters", "on_flag", "dtype")  # fmt: skip
#: guidance for a prompted text model when none is named, as diffusers' StableDiffusionPipeline
TEXT_GUIDANCE = ("cfg", {"scale": 7.5})
#: the reason recorded for a sample whose result is not finite
NON_FINITE = "non-finite values (NaN or inf) in the result"


def default_model() -> pathlib.Path | None:
    """The generator shipped with the package, if this installation has one."""
    path = pathlib.Path(__file__).parent / "assets" / "generator"
    return (
        path if (path / "config.json").is_file() or (path / "model_index.json").is_file() else None
    )


def resolve_device(name: str) -> torch.device:
    """``auto`` = cuda, then mps, then cpu; under torchrun each rank takes its local GPU."""
    import os

    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
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
class _Plugin:
    name: str
    options: dict[str, Any]
    instance: Any
    provenance: dict[str, str]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "options": self.options}


def _plugin(
    registry: Registry, kind: str, name: str, options: Mapping[str, Any] | None, strings: bool
) -> _Plugin:
    # recorded converted (``scale=2`` from a command line is the number 2), so metadata,
    # run.json and resuming see the same options from the CLI and from Python
    options = registry.validate(kind, name, options, from_strings=strings)
    instance = registry.instantiate(kind, name, options)
    return _Plugin(name, options, instance, registry.get(kind, name).provenance())


def _per_sample_conditions(
    conditions: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None, n: int
) -> list[dict[str, str]]:
    if conditions is None:
        return [{} for _ in range(n)]
    if isinstance(conditions, Mapping):
        return [{k: str(v) for k, v in conditions.items()} for _ in range(n)]
    conditions = list(conditions)
    if len(conditions) != n:
        raise DtkError(f"got {len(conditions)} per-sample conditions for n={n} samples")
    return [{k: str(v) for k, v in c.items()} for c in conditions]


def _per_sample_prompts(prompt: str | Sequence[str] | None, n: int, what: str) -> list[str] | None:
    if prompt is None:
        return None
    prompts = [prompt] * n if isinstance(prompt, str) else list(prompt)
    if not all(isinstance(p, str) for p in prompts):
        raise DtkError(f"{what} must be a string or a list of strings, one per sample")
    if len(prompts) != n:
        raise DtkError(f"got {len(prompts)} per-sample {what}s for n={n} samples")
    return prompts


def generate(
    model: str | pathlib.Path | None = None,
    *,
    out: str | pathlib.Path,
    conditions: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    prompt: str | Sequence[str] | None = None,
    negative_prompt: str | Sequence[str] | None = None,
    n: int = 16,
    seed: int = 0,
    sampler: str = "dpmpp_2m",
    sampler_options: Mapping[str, Any] | None = None,
    schedule: str = "karras",
    schedule_options: Mapping[str, Any] | None = None,
    steps: int = 20,
    guidance: str | None = None,
    guidance_options: Mapping[str, Any] | None = None,
    filters: Sequence[str] = (),
    filter_options: Mapping[str, Mapping[str, Any]] | None = None,
    on_flag: str = "drop",
    batch_size: int = 16,
    device: str = "auto",
    dtype: str = "float32",
    shard: str | Shard | None = None,
    grid: str | pathlib.Path | None = None,
    wait: bool = False,
    trust_pickle: bool = False,
    attention_slicing: bool = False,
    vae_tiling: bool = False,
    progress: bool = True,
    options_from_strings: bool = False,
) -> pandas.DataFrame:
    """Generate `n` samples from `model` into the dataset folder `out`; the same run as
    ``dtk generate``. Returns the metadata of every written image (this run's and any
    earlier run's in the same folder).

    `conditions` is one mapping for all samples (``{"digit": "3"}``) or one per sample.
    A text-to-image model (`toolkit.text_model`) takes `prompt` instead: one string for all
    samples or one per sample (its `conditions`, if any, annotate the prompts with the
    attribute values they express: metadata columns that filters see); `negative_prompt`
    likewise, the ``uncond`` branch of guidance (the empty prompt when None). `guidance`
    None picks ``cfg`` (scale 2) for a conditioned request on a model with a null label,
    ``cfg`` (scale 7.5) for a prompt, else ``none``.
    Sample ``i`` starts from
    ``torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed + i))``.
    Plugin options are checked against each plugin's signature; with
    `options_from_strings` they are converted from ``KEY=VALUE`` strings first.
    One run at a time writes a folder (or a shard of it): another run of the same part is
    refused, or with `wait` waited for. A sample whose result is not finite (NaN or inf) is
    not written: it is recorded with status ``failed`` in rejected.csv, and a
    `GenerationWarning` says how many.
    """
    # 1. Everything a user can get wrong is checked before any file is touched.
    check_positive("n", n)
    check_positive("steps", steps)
    check_positive("batch size", batch_size)
    check_seed(seed, n)
    if on_flag not in ON_FLAG:
        raise DtkError(f"on_flag must be one of {', '.join(ON_FLAG)}, got {on_flag!r}")
    if dtype not in DTYPES:
        raise DtkError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = pathlib.Path(out)
    check_writable(out)
    grid = None if grid is None else check_grid(pathlib.Path(grid), out)

    registry = get_registry()
    strings = options_from_strings
    sampler_p = _plugin(registry, "sampler", sampler, sampler_options, strings)
    schedule_p = _plugin(registry, "schedule", schedule, schedule_options, strings)
    filter_options = dict(filter_options or {})
    unknown = set(filter_options) - set(filters)
    if unknown:
        raise DtkError(f"options given for filters not requested: {', '.join(sorted(unknown))}")
    filter_ps = [
        _plugin(registry, "safety_filter", f, filter_options.get(f), strings) for f in filters
    ]

    if model is None:
        model = default_model()
        if model is None:
            raise DtkError("no --model given, and this installation ships no default model")
    model_path = pathlib.Path(model)
    torch_device = resolve_device(device)
    shard_ = resolve_shard(shard, torch_device.type)
    torch_dtype = getattr(torch, dtype)
    requested = _per_sample_conditions(conditions, n)
    prompts = _per_sample_prompts(prompt, n, "prompt")
    negatives = _per_sample_prompts(negative_prompt, n, "negative prompt")
    # read from the configs alone, so a wrong option fails before weights load
    text = is_text_model(model_path)
    _check_prompts(model_path, text, requested, prompt, negative_prompt)
    if (attention_slicing or vae_tiling) and not text:
        option = "--attention-slicing" if attention_slicing else "--vae-tiling"
        raise DtkError(f"{option} is for text-to-image (latent) models; {model_path} is not one")
    loaded = load_model(
        model_path, trust_pickle=trust_pickle, device=torch_device, dtype=torch_dtype
    )
    if attention_slicing:
        loaded.unet.set_attention_slice("auto")
    if vae_tiling:
        loaded.vae.enable_tiling()

    if text:
        prompts = prompts or [""] * n
        negatives = negatives or [""] * n
    prompted = text and any(prompts + negatives)
    if guidance is None:
        usable = loaded.labels is not None and loaded.labels.null_label is not None
        if prompted:
            guidance, guidance_options = TEXT_GUIDANCE
        else:
            guidance, guidance_options = (
                ("cfg", {"scale": 2.0}) if any(requested) and usable else ("none", {})
            )
    guidance_p = _plugin(registry, "guidance", guidance, guidance_options, strings)
    per_sample = assign_conditions(guidance_p.instance, loaded, requested, seed)
    # a text model's conditions only annotate its prompts: metadata columns, seen by filters
    labels = None if text else _labels(loaded, per_sample)
    conditional = prompted if text else any(per_sample)
    check_guidance(guidance_p.instance, loaded, conditional)
    sigmas = schedule_p.instance(steps, loaded.noise_levels)

    if text:
        attribute_order = list(dict.fromkeys(k for c in per_sample for k in c))
    else:
        attribute_order = loaded.labels.names if loaded.labels else []
    run = {
        "command": "generate",
        "model": str(model_path.resolve()),
        "model_info": loaded.describe(),
        "conditions": requested[0]
        if isinstance(conditions, Mapping) or conditions is None
        else requested,
        "prompt": prompt if isinstance(prompt, str) or prompt is None else prompts,
        "negative_prompt": negative_prompt
        if isinstance(negative_prompt, str) or negative_prompt is None
        else negatives,
        "n": n,
        "seed": seed,
        "sampler": sampler_p.describe(),
        "schedule": schedule_p.describe(),
        "steps": steps,
        "sigmas": [float(s) for s in sigmas],
        "guidance": guidance_p.describe(),
        "filters": [f.describe() for f in filter_ps],
        "on_flag": on_flag,
        "dtype": dtype,
        "memory": {"attention_slicing": attention_slicing, "vae_tiling": vae_tiling},
        "plugins": [p.provenance for p in (sampler_p, schedule_p, guidance_p, *filter_ps)],
        "versions": versions(),
    }

    # 2. The folder: hold this part's lock, claim the folder (or resume it), then
    # generate what is missing.
    folder = OutputFolder(out)
    with folder.hold(shard_.name, wait=wait):
        if shard_.is_main or not shard_.distributed:
            folder.claim(run, IDENTITY)
        barrier(shard_)
        done = folder.done()
        todo = [i for i in range(n) if shard_.owns(i) and i not in done]
        common = {
            "model": str(model_path),
            "sampler": sampler,
            "sampler_options": json.dumps(sampler_p.options, sort_keys=True, default=str),
            "schedule": schedule,
            "schedule_options": json.dumps(schedule_p.options, sort_keys=True, default=str),
            "steps": steps,
            "guidance": guidance,
            "guidance_options": json.dumps(guidance_p.options, sort_keys=True, default=str),
        }
        requests = [
            SampleRequest(
                index=i,
                seed=seed + i,
                conditions=per_sample[i],
                prompt=prompts[i] if text else None,
                negative_prompt=negatives[i] if text else None,
            )
            for i in todo
        ]
        request_filters = [f for f in filter_ps if is_request_stage(f.instance)]
        image_filters = [f for f in filter_ps if not is_request_stage(f.instance)]
        progress_bar = _progress(len(todo), progress and shard_.is_main, shard_)
        failed = 0

        with folder.part_writer(shard_.name) as writer, torch.inference_mode():
            # request-stage filters refuse before any compute
            refusals = _judge(request_filters, None, requests)
            to_compute = []
            for request, verdicts in zip(requests, refusals):
                if any(v.flagged for v in verdicts.values()):
                    record = _record(request, common, attribute_order, verdicts, "refused")
                    writer.write(record, None)
                    progress_bar.update(1)
                else:
                    to_compute.append(request)
            writer.flush()

            denoiser = UNetDenoiser(loaded)
            for start in range(0, len(to_compute), batch_size):
                batch = to_compute[start : start + batch_size]
                batch_labels = None if labels is None else labels[[r.index for r in batch]]
                images = sample_images(
                    denoiser,
                    sampler_p.instance,
                    guidance_p.instance,
                    sigmas,
                    seeds=[r.seed for r in batch],
                    conditions=[r.conditions for r in batch],
                    labels=batch_labels,
                    null_label=loaded.labels.null_label if loaded.labels else None,
                    conditioning=_text_conditioning(loaded, batch, guidance_p) if text else None,
                )
                # the pixels to save are fixed before any filter sees the images
                pixels = to_pixels(images)
                finite = torch.isfinite(images).flatten(1).all(1).tolist()
                verdicts = _judge(image_filters, images, batch)
                for k, request in enumerate(batch):
                    status = _status(verdicts[k], on_flag) if finite[k] else "failed"
                    failed += not finite[k]
                    record = _record(request, common, attribute_order, verdicts[k], status)
                    if not finite[k]:
                        record["reason"] = NON_FINITE
                    image = pixels[k] if status != "blank" else pixels[k] * 0
                    writer.write(record, image if status in WRITTEN else None)
                writer.flush()
                progress_bar.update(len(batch))
        progress_bar.close()

        barrier(shard_)
        metadata = folder.merge() if shard_.is_main or not shard_.distributed else None
    if failed:
        warnings.warn(
            f"{failed} of {len(todo)} samples had non-finite values ({NON_FINITE}) and were "
            f"not written; see {out / 'rejected.csv'}",
            GenerationWarning,
            stacklevel=2,
        )
    if grid is not None and shard_.is_main:
        _write_grid(folder, grid, metadata)
    if metadata is None:
        import pandas

        metadata = pandas.DataFrame()
    return metadata


def check_grid(grid: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """The ``--grid`` path, checked before any compute: a writable ``.png`` file path."""
    if grid.suffix.lower() != ".png":
        raise DtkError(f"--grid {grid}: the contact sheet is a PNG; give a path ending in .png")
    if grid.is_dir():
        raise DtkError(f"--grid {grid} is a folder; give the path of a .png file")
    if grid.exists() and not os.access(grid, os.W_OK):
        raise DtkError(f"--grid {grid} is not writable")
    check_writable(grid.parent, what="--grid's folder")
    return grid


def _status(verdicts: Mapping[str, Verdict], on_flag: str) -> str:
    if not any(v.flagged for v in verdicts.values()):
        return "ok"
    return {"drop": "dropped", "blank": "blank", "tag": "tagged"}[on_flag]


def sample_images(
    denoiser: UNetDenoiser,
    sampler: Any,
    guidance: Any,
    sigmas: torch.Tensor,
    *,
    seeds: Sequence[int],
    conditions: Sequence[Mapping[str, str]] | None = None,
    labels: torch.Tensor | None = None,
    null_label: int | None = None,
    conditioning: TextConditioning | None = None,
) -> torch.Tensor:
    """One batch through guidance and sampler: float images ``[B, C, H, W]`` in [0, 1].

    Sample ``k`` starts from ``torch.randn(shape, generator=Generator("cpu").manual_seed(
    seeds[k]))`` scaled to the prior at ``sigmas[0]``, and its generator alone supplies its
    later noise, so a sample's result does not depend on the batch it is in. For a latent
    model, `shape` is the latent's and the result is decoded by its VAE; `conditioning`
    then carries the prompt embeddings. A guidance with a `start_batch` method is given the
    batch's per-sample `conditions` first (and resets any state it keeps across steps).
    """
    start_batch = getattr(guidance, "start_batch", None)
    if start_batch is not None:
        start_batch(list(conditions) if conditions is not None else [{} for _ in seeds])
    device = next(denoiser.unet.parameters()).device
    shape = denoiser.model.sample_shape
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    eps = torch.stack([torch.randn(shape, generator=g) for g in generators])
    x = (eps * math.sqrt(float(sigmas[0]) ** 2 + 1)).to(device)

    def noise(sigma: float, sigma_next: float) -> torch.Tensor:
        return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)

    guided = GuidedDenoiser(denoiser, guidance, labels, null_label, conditioning=conditioning)
    with torch.inference_mode():
        x0 = sampler(guided, x, sigmas, noise=noise)
        decode = getattr(denoiser.model, "decode", None)
        return to_unit(decode(x0) if decode is not None else x0)


def _text_conditioning(
    model: TextModel, batch: Sequence[SampleRequest], guidance: _Plugin
) -> TextConditioning:
    cond = model.embed([r.prompt or "" for r in batch])
    uncond = model.embed([r.negative_prompt or "" for r in batch])
    # a guidance's own prompts (sld's safety concept), each encoded once per model (cached)
    declared = getattr(guidance.instance, "text_branches", None) or {}
    extra = {name: model.embed([prompt]) for name, prompt in declared.items()}
    return TextConditioning(cond, uncond, extra)


def _check_prompts(
    path: pathlib.Path,
    text: bool,
    requested: list[dict[str, str]],
    prompt: Any,
    negative_prompt: Any,
) -> None:
    if text and any(requested) and prompt is None:
        raise DtkError(
            f"{path} is a text-to-image model: give --prompt (there --condition only annotates "
            "prompts with the attribute values they express)"
        )
    if not text and (prompt is not None or negative_prompt is not None):
        option = "--prompt" if prompt is not None else "--negative-prompt"
        conditional = label_space(path) is not None  # read only to word the error
        kind = "class-conditional: use --condition KEY=VALUE" if conditional else "unconditional"
        raise DtkError(f"{path} takes no {option}: it is not a text-to-image model "
                       f"({kind})")  # fmt: skip


def assign_conditions(
    guidance: Any, loaded: LoadedModel, requested: list[dict[str, str]], seed: int
) -> list[dict[str, str]]:
    """Each sample's condition after the guidance's `assign` hook, if it has one.

    A guidance method may complete every sample's condition itself (``fair`` draws the
    audited attribute's value from a target distribution):
    ``assign(condition, seed, attributes) -> condition``, where `attributes` maps each of the
    model's attribute names to its values (empty for a text-to-image model, whose attributes
    live in its prompts) and `seed` is the sample's own seed, so the choice does not depend
    on batch, shard or rank.
    """
    assign = getattr(guidance, "assign", None)
    if assign is None:
        return requested
    if isinstance(loaded, TextModel):
        attributes: dict[str, list[str]] = {}
    elif loaded.labels is None:
        raise DtkError(
            f"guidance {guidance.name!r} chooses attribute values, and {loaded.path} is "
            "unconditional"
        )
    else:
        attributes = {a.name: list(a.values) for a in loaded.labels.attributes}
    assigned = []
    for i, condition in enumerate(requested):
        result = assign(dict(condition), seed + i, attributes)
        assigned.append({str(k): str(v) for k, v in result.items()})
    return assigned


def _labels(loaded: LoadedModel, per_sample: list[dict[str, str]]) -> torch.Tensor | None:
    if loaded.labels is None:
        if any(per_sample):
            raise DtkError(f"{loaded.path} is unconditional; it takes no --condition")
        return None
    cache: dict[tuple, int] = {}
    values = []
    for condition in per_sample:
        key = tuple(sorted(condition.items()))
        if key not in cache:
            cache[key] = loaded.labels.label(condition)
        values.append(cache[key])
    return torch.tensor(values, dtype=torch.long, device=loaded.unet.device)


def prompt_folder(prompt: str, limit: int = 60) -> str:
    """The class subfolder of a prompted sample: the prompt made a safe, bounded name
    (image-folder loaders then label each image with its prompt)."""
    words = "".join(c if c.isalnum() or c in "-_." else "_" for c in prompt.strip())
    return words[:limit].strip("._") or "prompt"


def _judge(
    filters: Sequence[_Plugin], images: torch.Tensor | None, requests: Sequence[SampleRequest]
) -> list[dict[str, Verdict]]:
    verdicts: list[dict[str, Verdict]] = [{} for _ in requests]
    for flt in filters:
        # each filter judges its own copy: one that changes its input changes nothing else
        seen = None if images is None else images.clone()
        for k, verdict in enumerate(run_filter(flt.name, flt.instance, seen, requests)):
            verdicts[k][flt.name] = verdict
    return verdicts


def _record(
    request: SampleRequest,
    common: Mapping[str, Any],
    attribute_order: Iterable[str],
    verdicts: Mapping[str, Verdict],
    status: str,
) -> dict[str, Any]:
    if request.prompt:
        folder = prompt_folder(request.prompt)
    else:
        folder = folder_name(request.conditions, list(attribute_order))
    record: dict[str, Any] = {
        "file_name": f"{folder}/{request.index:06d}.png",
        "index": request.index,
        "seed": request.seed,
    }
    for name in attribute_order:
        record[name] = request.conditions.get(name, "")
    if request.prompt is not None:
        record["prompt"] = request.prompt
        record["negative_prompt"] = request.negative_prompt or ""
    record.update(common)
    for name, verdict in verdicts.items():
        record[f"filter_{name}_flagged"] = verdict.flagged
        record[f"filter_{name}_score"] = verdict.score
        record[f"filter_{name}_reason"] = verdict.reason
    record["status"] = status
    return record


def _write_grid(folder: OutputFolder, path: pathlib.Path, metadata: Any) -> None:
    if metadata is None or metadata.empty:
        return
    files = [folder.path(f) for f in metadata["file_name"].head(64)]
    atomic_write(path, contact_sheet(files))


def _progress(total: int, enabled: bool, shard: Shard) -> Any:
    from tqdm.auto import tqdm

    label = "generating" if shard.count == 1 else f"generating ({shard.index}/{shard.count})"
    return tqdm(total=total, desc=label, unit="img", file=sys.stderr, disable=not enabled)
