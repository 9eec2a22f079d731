"""The run record's schema, in one place: what run.json holds, which of its keys make two
runs the same run (so that a rerun resumes), what each sample's metadata row holds, and
the statuses a sample can end in (docs/contracts.md, "Generated datasets").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from toolkit.data.output import WRITTEN

if TYPE_CHECKING:
    from toolkit.generation.plan import Plan
    from toolkit.registry.protocols import SampleRequest, Verdict

#: run.json keys that must agree for a rerun to resume an existing folder (``n`` may grow)
IDENTITY = ("model", "model_options", "size", "loras", "conditions", "prompt",
            "negative_prompt", "seed", "sampler", "schedule", "steps", "guidance", "guides",
            "filters", "on_flag", "dtype", "step_cache", "format")  # fmt: skip
#: a sample's status: its image is written (`WRITTEN`), or it is listed in rejected.csv
#: (``dropped``/``refused`` by a filter, ``failed``: its values were not finite)
STATUSES = ("ok", "tagged", "blank", "dropped", "refused", "failed")
#: the reason recorded for a sample whose result is not finite
NON_FINITE = "non-finite values (NaN or inf) in the result"
_ON_FLAG_STATUS = {"drop": "dropped", "blank": "blank", "tag": "tagged"}

assert set(WRITTEN) <= set(STATUSES)


def run_record(plan: Plan, versions: Mapping[str, str]) -> dict[str, Any]:
    """run.json: the whole configuration, enough to redo the run (``sigmas`` is added when
    the run computes them)."""
    request, settings = plan.request, plan.settings
    conditions = request.conditions
    return {
        "command": "generate",
        "model": str(plan.folder.path.resolve()),
        "model_info": plan.folder.describe(),
        "conditions": _as_given(conditions or {}, lambda c: {str(k): str(v) for k, v in c.items()}),
        "prompt": _as_given(request.prompt, str),
        "negative_prompt": _as_given(request.negative_prompt, str),
        "n": request.n,
        "seed": request.seed,
        "sampler": plan.sampler.describe(),
        "schedule": plan.schedule.describe(),
        "steps": settings.steps,
        "guidance": plan.guidance.describe(),
        "filters": [f.describe() for f in plan.filters],
        "on_flag": settings.on_flag,
        "dtype": settings.dtype,
        "memory": {
            "attention_slicing": settings.attention_slicing,
            "vae_tiling": settings.vae_tiling,
        },
        # how fast, not what: left out of the run's identity, so a resume may change it
        "speed": {"compile": settings.compile, "channels_last": settings.channels_last},
        "plugins": [p.provenance for p in plan.plugins()],
        "versions": dict(versions),
        # only for families that take options (Flux, LCM): folders of the others, written
        # before model options existed, still resume
        **({"model_options": dict(plan.folder.model_options)} if plan.folder.model_options else {}),
        # likewise only a size other than the model's default (model_info's sample_shape and
        # image_shape give the size in every case), and only LoRAs given
        **_size(plan.folder.image_size),
        **({"loras": [lora.describe() for lora in plan.folder.loras]} if plan.folder.loras else {}),
        # likewise only a step cache used: it changes the images, so it is the run's too
        **({"step_cache": plan.step_cache.describe()} if plan.step_cache else {}),
        # likewise only guide models a guidance loads (autoguidance's), hashed
        **({"guides": {b: g.describe() for b, g in plan.guides.items()}} if plan.guides else {}),
        # likewise only a sharded format: a folder is one format; the shard size may change
        **(
            {"format": request.format, "shard_size": request.shard_size}
            if request.format != "imagefolder"
            else {}
        ),
    }


def _size(size: tuple[int, int] | None) -> dict[str, Any]:
    return {} if size is None else {"size": {"height": size[0], "width": size[1]}}


def status(verdicts: Mapping[str, Verdict], on_flag: str, finite: bool) -> str:
    """A finished sample's status from its filters' verdicts."""
    if not finite:
        return "failed"
    if not any(v.flagged for v in verdicts.values()):
        return "ok"
    return _ON_FLAG_STATUS[on_flag]


def sample_record(
    sample: SampleRequest,
    folder_name: str,
    common: Mapping[str, Any],
    attribute_order: Iterable[str],
    verdicts: Mapping[str, Verdict],
    status: str,
) -> dict[str, Any]:
    """One sample's metadata row (``sha256`` is added when its image is written)."""
    record: dict[str, Any] = {
        "file_name": f"{folder_name}/{sample.index:06d}.png",
        "index": sample.index,
        "seed": sample.seed,
    }
    for name in attribute_order:
        record[name] = sample.conditions.get(name, "")
    if sample.prompt is not None:
        record["prompt"] = sample.prompt
        record["negative_prompt"] = sample.negative_prompt or ""
    record.update(common)
    for name, verdict in verdicts.items():
        record[f"filter_{name}_flagged"] = verdict.flagged
        record[f"filter_{name}_score"] = verdict.score
        record[f"filter_{name}_reason"] = verdict.reason
    record["status"] = status
    if status == "failed":
        record["reason"] = NON_FINITE
    return record


def _as_given(value: Any, convert: Any) -> Any:
    """One value for all samples as it is; per-sample values as a list."""
    if value is None or isinstance(value, (str, Mapping)):
        return None if value is None else convert(value)
    return [convert(v) for v in value]
