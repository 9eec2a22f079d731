"""What a user asks for: one options object shared by every command that generates.

`GenerationSettings` says *how* images are generated (plugins and their options, steps,
batch size, device, precision, memory options): ``dtk generate``, ``dtk eval bias``,
``dtk synthesize`` and ``dtk demo`` take the same command-line options for it
(`toolkit.cli.options.generation_options`) and hand it on as it is. `GenerationRequest` adds
*what* and *where*: the model, the samples (conditions or prompts, n, seed) and the output
folder. Nothing here touches a file or imports torch; `toolkit.generation.plan` checks it.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from toolkit import defaults

Condition = Mapping[str, Any]


@dataclasses.dataclass
class GenerationSettings:
    """How images are generated (see the module docstring)."""

    #: sampler, schedule, steps: None is the model's default, each on its own
    #: (`ModelFolder.default_sampling`: deis on label UNets, else dpmpp_2m; karras, 20; unless
    #: the family has its own)
    sampler: str | None = None
    sampler_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    schedule: str | None = None
    schedule_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    steps: int | None = None
    #: None: the model's default for the request (`ModelFolder.default_guidance`)
    guidance: str | None = None
    guidance_options: Mapping[str, Any] | None = None
    #: options of the model itself (`ModelFolder.check_model_options`): a guidance-distilled
    #: model's embedded guidance scale (Flux dev, LCM), Flux's T5 prompt length
    model_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    #: the image size in pixels, each side on its own (None: the model's default), for the
    #: families that sample at several sizes (`ModelFolder.check_size`)
    width: int | None = None
    height: int | None = None
    #: LoRA adapters applied together: ``"PATH[:SCALE]"`` strings, ``(path, scale)`` pairs or
    #: paths (scale 1.0) (`toolkit.models.lora`)
    loras: Sequence[Any] = ()
    filters: Sequence[str] = ()
    filter_options: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    on_flag: str = defaults.ON_FLAG
    #: None: sized for the model's samples (`toolkit.defaults.batch_size`)
    batch_size: int | None = defaults.BATCH_SIZE
    device: str = defaults.DEVICE
    dtype: str = defaults.DTYPE
    trust_pickle: bool = False
    attention_slicing: bool = False
    vae_tiling: bool = False
    #: speed: the denoising network compiled with torch.compile in this mode (None: eager),
    #: its inductor cache kept in `compile_cache` (None: torch's default place), and its
    #: weights and inputs in channels-last memory format (`toolkit.models.speed`)
    compile: str | None = None
    compile_cache: str | None = None
    channels_last: bool = False
    #: a step cache plugin (DeepCache, First Block Cache) and its options: part of the
    #: network skipped on calls where its features barely change (None: every call in full)
    step_cache: str | None = None
    step_cache_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    #: plugin options are ``KEY=VALUE`` strings from a command line, converted by type
    options_from_strings: bool = False

    @classmethod
    def fields(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | GenerationSettings | None
                     ) -> GenerationSettings:  # fmt: skip
        """Settings from keyword arguments (unknown keys refused as a TypeError, as a
        function call would) or as they are."""
        if isinstance(values, GenerationSettings):
            return values
        values = dict(values or {})
        unknown = sorted(set(values) - cls.fields())
        if unknown:
            raise TypeError(f"unknown generation setting {unknown[0]!r}")
        return cls(**values)

    def replace(self, **changes: Any) -> GenerationSettings:
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass
class GenerationRequest:
    """One run: a model, its samples, an output folder, and the settings."""

    model: str | pathlib.Path | None
    out: str | pathlib.Path
    #: one condition for every sample, or one per sample
    conditions: Condition | Sequence[Condition] | None = None
    #: text-to-image models: one prompt for every sample, or one per sample
    prompt: str | Sequence[str] | None = None
    negative_prompt: str | Sequence[str] | None = None
    n: int = defaults.SAMPLES
    seed: int = 0
    settings: GenerationSettings = dataclasses.field(default_factory=GenerationSettings)
    #: ``K/N``: only the sample indices i with i % N == K (torchrun ranks shard themselves)
    shard: Any = None
    grid: str | pathlib.Path | None = None
    #: wait for another run holding the folder instead of stopping
    wait: bool = False
    progress: bool = True
    #: how the images are stored (`toolkit.data.shards.FORMATS`): one PNG per file, or
    #: WebDataset or Parquet shards of `shard_size` images (None: `shards.SHARD_SIZE`)
    format: str = "imagefolder"
    shard_size: int | None = None
    #: ``local`` (this process, or torchrun's ranks), or ``ray``: an actor pool of `workers`
    #: on the Ray cluster at `ray_address` (None: a local one) (`toolkit.generation.ray_engine`)
    engine: str = "local"
    workers: int | None = None
    ray_address: str | None = None
    #: torch's CPU threads per process: the local engine's (None: torch's default, every
    #: core) and each Ray worker's (None: `ray_engine.WORKER_CPUS`); on a CPU a sample's
    #: bytes depend on it (a convolution's sums are split over the threads)
    threads: int | None = None
