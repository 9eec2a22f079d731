"""Plan, then run: a `GenerationRequest` checked and resolved from configs alone.

`make_plan` reads no weights and imports no torch: every mistake a user can make (a count,
a seed out of range, an output path, a plugin name or option, a model folder of the wrong
family, a condition the model does not know, guidance the model cannot serve, a folder
holding another run) is reported before anything is loaded or written. The `Plan` it gives
holds the model folder, the plugins (validated; only guidance is made here, since its
branches decide what the model must serve), the run record, and `Samples`, which makes each
sample's request on demand, so a plan's memory does not grow with ``n``.
``toolkit.generation.run`` then loads the weights and loops.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from typing import Any

from toolkit import defaults
from toolkit.checks import check_positive, check_seed, check_writable
from toolkit.data.output import OutputFolder, different_run
from toolkit.errors import DtkError
from toolkit.generation.distributed import Shard, parse_shard
from toolkit.generation.record import IDENTITY, run_record
from toolkit.generation.request import GenerationRequest, GenerationSettings
from toolkit.installed import versions
from toolkit.models import ModelFolder, open_model
from toolkit.models.lora import check_loras, sha256
from toolkit.registry.manager import Registry, get_registry
from toolkit.registry.protocols import SampleRequest, optional
from toolkit.sampling.denoiser import branch_conditions, guide_models
from toolkit.sampling.safety import ON_FLAG


@dataclasses.dataclass
class PluginUse:
    """A plugin a run uses: its validated options (converted, as run.json records them),
    its provenance, and, once made, the instance."""

    kind: str
    name: str
    options: dict[str, Any]
    provenance: dict[str, str]
    instance: Any = None

    @classmethod
    def validated(cls, registry: Registry, kind: str, name: str,
                  options: Mapping[str, Any] | None, strings: bool) -> PluginUse:  # fmt: skip
        # recorded converted (``scale=2`` from a command line is the number 2), so metadata,
        # run.json and resuming see the same options from the CLI and from Python
        options = registry.validate(kind, name, options, from_strings=strings)
        return cls(kind, name, options, registry.get(kind, name).provenance())

    def make(self, registry: Registry | None = None) -> Any:
        """The plugin instance (made once)."""
        if self.instance is None:
            registry = registry or get_registry()
            self.instance = registry.instantiate(self.kind, self.name, self.options)
        return self.instance

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "options": self.options}


@dataclasses.dataclass
class Guide:
    """A guide model a run loads beside the model (a guidance's ``guide_models``): its
    folder, checked against the model's, and the sha256 of its network's files."""

    folder: ModelFolder
    sha256: str

    def describe(self) -> dict[str, Any]:
        """As run.json records it."""
        return {"path": str(self.folder.path.resolve()), "family": self.folder.family,
                "sha256": self.sha256}  # fmt: skip


class Samples:
    """The per-sample requests of a run, made on demand: sample ``i`` has seed ``seed + i``,
    its condition (completed by the guidance's ``assign`` hook, if any, and checked by the
    model) and, on a text model, its prompt and negative prompt."""

    def __init__(self, request: GenerationRequest, folder: ModelFolder) -> None:
        self.n, self.seed, self.folder = request.n, request.seed, folder
        self._shared, self._each = _conditions(request.conditions, request.n)
        text = folder.takes_prompts
        self._prompts = _Prompts(request.prompt, request.n, "prompt", "" if text else None)
        self._negatives = _Prompts(request.negative_prompt, request.n, "negative prompt",
                                   "" if text else None)  # fmt: skip
        self._assign: Callable[..., Mapping[str, str]] | None = None
        self._checked: dict[tuple, dict[str, str]] = {}

    def __len__(self) -> int:
        return self.n

    def given(self) -> list[dict[str, str]]:
        """The distinct conditions as given (before any guidance completes them)."""
        if self._each is None:
            return [self._shared]
        return list({tuple(sorted(c.items())): c for c in self._each}.values())

    @property
    def prompted(self) -> bool:
        """Whether any sample has a (non-empty) prompt or negative prompt."""
        return self._prompts.any() or self._negatives.any()

    def use_assign(self, assign: Callable[..., Mapping[str, str]] | None) -> None:
        self._assign = assign

    def condition(self, i: int) -> dict[str, str]:
        condition = self._shared if self._each is None else self._each[i]
        if self._assign is not None:
            chosen = self._assign(dict(condition), self.seed + i, self.folder.attributes)
            condition = {str(k): str(v) for k, v in chosen.items()}
        key = tuple(sorted(condition.items()))
        if key not in self._checked:
            if len(self._checked) > 4096:  # a bounded cache: per-sample conditions vary
                self._checked.clear()
            self._checked[key] = self.folder.validate(condition)
        return self._checked[key]

    def __getitem__(self, i: int) -> SampleRequest:
        return SampleRequest(
            index=i,
            seed=self.seed + i,
            conditions=self.condition(i),
            prompt=self._prompts(i),
            negative_prompt=self._negatives(i),
        )


@dataclasses.dataclass
class Plan:
    """Everything a run needs but the weights (see the module docstring)."""

    request: GenerationRequest
    folder: ModelFolder
    sampler: PluginUse
    schedule: PluginUse
    guidance: PluginUse
    filters: list[PluginUse]
    samples: Samples
    shard: Shard
    out: pathlib.Path
    grid: pathlib.Path | None
    attribute_order: list[str]
    record: dict[str, Any]
    #: guide-model branch -> the guide model it runs through (`Guide`); the run loads each
    #: once, beside the model
    guides: dict[str, Guide] = dataclasses.field(default_factory=dict)
    #: the step cache (`toolkit.StepCache`), made and checked against the network; None: none
    step_cache: PluginUse | None = None

    @property
    def settings(self) -> Any:
        return self.request.settings

    def plugins(self) -> list[PluginUse]:
        """Every plugin the run uses."""
        cache = [self.step_cache] if self.step_cache is not None else []
        return [self.sampler, self.schedule, self.guidance, *self.filters, *cache]

    def common_columns(self) -> dict[str, Any]:
        """The metadata columns every sample of the run shares."""
        columns: dict[str, Any] = {"model": str(self.folder.path)}
        for use in (self.sampler, self.schedule):
            columns[use.kind] = use.name
            columns[f"{use.kind}_options"] = json.dumps(use.options, sort_keys=True, default=str)
        columns["steps"] = self.settings.steps
        columns["guidance"] = self.guidance.name
        columns["guidance_options"] = json.dumps(self.guidance.options, sort_keys=True,
                                                 default=str)  # fmt: skip
        if self.folder.model_options:  # a model that takes options (Flux, LCM)
            columns["model_options"] = json.dumps(dict(self.folder.model_options),
                                                  sort_keys=True, default=str)  # fmt: skip
        if self.folder.image_size is not None:  # a size other than the model's default
            columns["height"], columns["width"] = self.folder.image_size
        if self.folder.loras:
            columns["loras"] = json.dumps([lora.describe() for lora in self.folder.loras])
        if self.step_cache is not None:
            columns["step_cache"] = self.step_cache.name
            columns["step_cache_options"] = json.dumps(self.step_cache.options, sort_keys=True,
                                                       default=str)  # fmt: skip
        return columns

    def pending(self, done: AbstractSet[int], shard: Shard) -> Iterator[int]:
        """The indices `shard` still has to generate, in order (lazily)."""
        return (i for i in range(shard.index, self.samples.n, shard.count) if i not in done)

    def describe(self) -> str:
        """The plan as ``--dry-run`` prints it."""
        settings, n = self.settings, self.samples.n
        first = self.samples[0]
        options = ", ".join(f"{k}={v}" for k, v in self.folder.model_options.items())
        lines = [
            f"model     {self.folder.path} ({self.folder.family}, samples "
            f"{'x'.join(map(str, self.folder.sample_shape))})"
            + (f", options {options}" if options else ""),
            _size_text(self.folder),
            *([f"loras     {_loras_text(self.folder.loras)}"] if self.folder.loras else []),
            f"samples   {n:,} (indices 0..{n - 1}, seeds {self.request.seed}.."
            f"{self.request.seed + n - 1}); sample 0: {_sample_text(first)}",
            f"sampler   {_plugin_text(self.sampler)}, {settings.steps} steps, schedule "
            f"{_plugin_text(self.schedule)}",
            f"guidance  {_plugin_text(self.guidance)}",
            *([f"cache     {_plugin_text(self.step_cache)}"] if self.step_cache else []),
            *[
                f"guide     {b}: {g.folder.path} ({g.folder.family}, sha256 {g.sha256[:12]})"
                for b, g in self.guides.items()
            ],
            f"filters   {', '.join(_plugin_text(f) for f in self.filters) or 'none'}"
            f" (flagged images: {settings.on_flag})",
            f"batches   {settings.batch_size} samples each, {settings.dtype} on "
            f"{settings.device}"
            + (f", shard {self.shard.index}/{self.shard.count}" if self.shard.count > 1 else ""),
            f"output    {self.out}"
            + _format_words(self.request)
            + (f", grid {self.grid}" if self.grid else ""),
        ]
        return "\n".join(lines)


def make_plan(request: GenerationRequest, registry: Registry | None = None) -> Plan:
    """Check `request` and resolve it into a `Plan` (see the module docstring)."""
    registry = registry or get_registry()
    check_positive("n", request.n)
    check_seed(request.seed, request.n)
    _check_settings(request.settings, registry)  # what is named, before the folder is read
    out, grid = _check_outputs(request)
    shard = _parse_shard(request.shard)
    strings = request.settings.options_from_strings

    folder = _model_folder(request.model)
    # before anything reads the folder's shape or noise levels (which depend on the size)
    _check_model(folder, request.settings)
    # the plan, run.json and the metadata hold the sampling actually used
    request = dataclasses.replace(request, settings=resolve_sampling(request.settings, folder))
    sampler, schedule, filters = _check_settings(request.settings, registry)
    assert sampler is not None and schedule is not None  # resolved above
    samples = Samples(request, folder)
    folder.check_request(samples.given(), request.prompt is not None,
                         request.negative_prompt is not None,
                         _memory(request.settings))  # fmt: skip
    guidance = _guidance(registry, request, folder, samples, strings)
    guides = _guides(folder, guidance)
    step_cache = _step_cache(registry, request.settings, folder)
    plan = Plan(request, folder, sampler, schedule, guidance, filters, samples, shard, out,
                grid, folder.attribute_order([*samples.given(), samples.condition(0)]),
                {}, guides, step_cache)  # fmt: skip
    plan.record = run_record(plan, versions())
    _check_folder_state(plan)
    return plan


# -- the steps ---------------------------------------------------------------------------


def check_settings(settings: GenerationSettings, model: Any = None) -> GenerationSettings:
    """Check generation settings: counts, precision, the flag policy, and that every plugin
    exists and takes its options (none is made). A sampler, schedule or steps left at None
    is `model`'s default (its folder's configs are read), or without a model the toolkit's
    (`toolkit.defaults`, the shipped model's). Returns the settings with those filled in,
    as a run records them. `make_plan` does the same with the request's model; a command
    that generates later (after writing other files) checks first."""
    if model is None:
        resolved = _sampling(settings, (defaults.LABEL_SAMPLER, defaults.SCHEDULE, defaults.STEPS),
                             {})  # fmt: skip
    else:
        folder = open_model(model)
        _check_model(folder, settings)
        resolved = resolve_sampling(settings, folder)
    _check_settings(resolved, get_registry())
    return resolved


def resolve_sampling(settings: GenerationSettings, folder: ModelFolder) -> GenerationSettings:
    """`settings` with the sampler, schedule and steps it leaves at None (each on its own)
    taken from the model's `ModelFolder.default_sampling`: the toolkit's defaults, or a
    family's own (SD 3: its pipeline's ``euler`` on the ``flow`` schedule, 28 steps); and a
    batch size left at None sized for the model's samples (`toolkit.defaults.batch_size`)."""
    resolved = _sampling(settings, folder.default_sampling(), folder.default_schedule_options())
    if resolved.batch_size is None:
        resolved = resolved.replace(batch_size=defaults.batch_size(folder.sample_shape))
    return resolved


def _sampling(settings: GenerationSettings, sampling: tuple[str, str, int],
              schedule_options: dict[str, Any]) -> GenerationSettings:  # fmt: skip
    sampler, schedule, steps = sampling
    if settings.schedule is None:  # the default schedule with its options, then the user's
        schedule_options = {**schedule_options, **dict(settings.schedule_options or {})}
    else:
        schedule_options = dict(settings.schedule_options or {})
    return settings.replace(
        sampler=sampler if settings.sampler is None else settings.sampler,
        schedule=schedule if settings.schedule is None else settings.schedule,
        schedule_options=schedule_options,
        steps=steps if settings.steps is None else settings.steps,
    )


def _check_settings(settings: GenerationSettings, registry: Registry
                    ) -> tuple[PluginUse | None, PluginUse | None, list[PluginUse]]:  # fmt: skip
    """The named plugins validated; a sampler or schedule left at None (the model's) is
    None here."""
    if settings.steps is not None:
        check_positive("steps", settings.steps)
    if settings.batch_size is not None:
        check_positive("batch size", settings.batch_size)
    if settings.on_flag not in ON_FLAG:
        raise DtkError(f"on_flag must be one of {', '.join(ON_FLAG)}, got {settings.on_flag!r}")
    if settings.dtype not in defaults.DTYPES:
        raise DtkError(f"dtype must be one of {', '.join(defaults.DTYPES)}, got "
                       f"{settings.dtype!r}")  # fmt: skip
    if settings.compile is not None and settings.compile not in defaults.COMPILE_MODES:
        raise DtkError(f"compile must be one of {', '.join(defaults.COMPILE_MODES)}, got "
                       f"{settings.compile!r}")  # fmt: skip
    if settings.compile_cache is not None and settings.compile is None:
        raise DtkError("a compile cache needs --compile")
    if settings.step_cache is not None:
        if settings.compile is not None:
            # a cache decides per call in Python, which a compiled graph would break at
            raise DtkError("--step-cache and --compile do not go together: a step cache "
                           "decides in Python on every call; use one of them")  # fmt: skip
        PluginUse.validated(registry, "step_cache", settings.step_cache,
                            settings.step_cache_options,
                            settings.options_from_strings)  # fmt: skip
    strings = settings.options_from_strings
    sampler = schedule = None
    if settings.sampler is not None:
        sampler = PluginUse.validated(registry, "sampler", settings.sampler,
                                      settings.sampler_options, strings)  # fmt: skip
    if settings.schedule is not None:
        schedule = PluginUse.validated(registry, "schedule", settings.schedule,
                                       settings.schedule_options, strings)  # fmt: skip
    filters = _filters(registry, settings, strings)
    if settings.guidance is not None:  # checked before the model folder is even read
        PluginUse.validated(registry, "guidance", settings.guidance,
                            settings.guidance_options, strings)  # fmt: skip
    return sampler, schedule, filters


def _format_words(request: GenerationRequest) -> str:
    """How the dry run names a sharded format ('' for an imagefolder)."""
    if request.format == "imagefolder":
        return ""
    from toolkit.data.shards import SHARD_SIZE

    return f" ({request.format}, shards of {request.shard_size or SHARD_SIZE} images)"


def _check_outputs(request: GenerationRequest) -> tuple[pathlib.Path, pathlib.Path | None]:
    from toolkit.data.shards import check_format
    from toolkit.generation.engines import check_engine

    out = pathlib.Path(request.out)
    check_writable(out)
    check_format(request.format, request.shard_size)
    check_engine(request)
    if request.grid is None:
        return out, None
    grid = pathlib.Path(request.grid)
    if grid.suffix.lower() != ".png":
        raise DtkError(f"--grid {grid}: the contact sheet is a PNG; give a path ending in .png")
    if grid.is_dir():
        raise DtkError(f"--grid {grid} is a folder; give the path of a .png file")
    check_writable(grid.parent, what="--grid's folder")
    return out, grid


def _parse_shard(shard: Any) -> Shard:
    if shard is None:
        return Shard()
    return shard if isinstance(shard, Shard) else parse_shard(shard)


def _filters(registry: Registry, settings: Any, strings: bool) -> list[PluginUse]:
    options = dict(settings.filter_options or {})
    unknown = set(options) - set(settings.filters)
    if unknown:
        raise DtkError(f"options given for filters not requested: {', '.join(sorted(unknown))}")
    return [PluginUse.validated(registry, "safety_filter", f, options.get(f), strings)
            for f in settings.filters]  # fmt: skip


def _check_model(folder: ModelFolder, settings: GenerationSettings) -> None:
    """The model's own settings checked and set on `folder`: its model options, the image
    size (None at the family's default) and the LoRAs (hashed)."""
    strings = settings.options_from_strings
    folder.model_options = folder.check_model_options(settings.model_options, strings)
    folder.image_size = folder.check_size(settings.height, settings.width)
    folder.loras = check_loras(settings.loras, folder, settings.trust_pickle)


def _step_cache(registry: Registry, settings: GenerationSettings, folder: ModelFolder
                ) -> PluginUse | None:  # fmt: skip
    """The step cache, made and checked against the model's network, built from its config
    without weights (the cache's optional ``check``)."""
    if settings.step_cache is None:
        return None
    use = PluginUse.validated(registry, "step_cache", settings.step_cache,
                              settings.step_cache_options,
                              settings.options_from_strings)  # fmt: skip
    check = optional("step_cache", use.make(registry), "check")
    if check is not None:
        from toolkit.models.attention import skeleton

        check(skeleton(folder))
    return use


def _model_folder(model: Any) -> ModelFolder:
    if model is None:
        from toolkit.assets import generator_path

        model = generator_path()
        if model is None:
            raise DtkError("no --model given, and this installation ships no default model")
    return open_model(model)


def _memory(settings: Any) -> dict[str, bool]:
    return {"attention_slicing": settings.attention_slicing, "vae_tiling": settings.vae_tiling}


def _guidance(registry: Registry, request: GenerationRequest, folder: ModelFolder,
              samples: Samples, strings: bool) -> PluginUse:  # fmt: skip
    """The guidance (the model's default when none is named), made, its ``assign`` hook
    handed to `samples`, and checked against what the model and request can serve."""
    settings = request.settings
    conditional = samples.prompted if folder.takes_prompts else any(samples.given())
    name, options = settings.guidance, settings.guidance_options
    if name is None:
        name, options = folder.default_guidance(conditional)
    use = PluginUse.validated(registry, "guidance", name, options, strings)
    instance = use.make(registry)
    assign = optional("guidance", instance, "assign")
    if assign is not None and not folder.takes_prompts and folder.labels is None:
        raise DtkError(f"guidance {name!r} chooses attribute values, and {folder.path} is "
                       "unconditional")  # fmt: skip
    samples.use_assign(assign)
    first = samples.condition(0)  # the hook's own checks run before the model's
    if not folder.takes_prompts:
        conditional = conditional or bool(first)
    text_branches = dict(optional("guidance", instance, "text_branches"))
    # a perturbed or guide-model branch asks for the inputs of the branch it names (its
    # condition)
    perturbations = dict(optional("guidance", instance, "perturbations"))
    branches = set(branch_conditions(instance).values())
    folder.check_guidance(branches, text_branches, conditional, name)
    if perturbations:
        folder.check_perturbations(perturbations, name)
    return use


def _guides(folder: ModelFolder, use: PluginUse) -> dict[str, Guide]:
    """The guidance's guide models (`toolkit.GuideModel`), each folder opened once, given the
    model's options and size, checked against the model (`ModelFolder.check_guide`) and its
    network's files hashed; no weights load."""
    instance, name = use.instance, use.name
    opened: dict[pathlib.Path, Guide] = {}
    guides = {}
    for branch, spec in guide_models(instance).items():
        if branch not in instance.branches:
            raise DtkError(f"guidance {name!r}: guide-model branch {branch!r} is not one of its "
                           "branches")  # fmt: skip
        key = spec.folder.resolve()
        if key not in opened:
            if not spec.folder.is_dir():
                raise DtkError(f"guidance {name!r}: guide {spec.folder} is not a model folder "
                               "(no such folder)")  # fmt: skip
            try:
                guide = open_model(spec.folder)
                guide.model_options = guide.check_model_options(folder.model_options)
                size = folder.image_size
                guide.image_size = None if size is None else guide.check_size(*size)
            except DtkError as exc:  # its own refusal, which names the folder
                raise DtkError(f"guidance {name!r}: guide: {exc}") from None
            folder.check_guide(guide, name)
            opened[key] = Guide(guide, _network_sha256(guide))
        guides[branch] = opened[key]
    return guides


def _network_sha256(folder: ModelFolder) -> str:
    """One sha256 over the files of `folder`'s network (each file's name and sha256)."""
    import hashlib

    digest = hashlib.sha256()
    for path in folder.network_files():
        digest.update(f"{path.name}\0{sha256(path)}\n".encode())
    return digest.hexdigest()


def _check_folder_state(plan: Plan) -> None:
    """A folder holding another run is refused now; claiming it waits for the run."""
    existing = OutputFolder(plan.out).read_run() if plan.out.is_dir() else None
    if existing is None:
        return
    stored = json.loads(json.dumps(plan.record, default=str))
    differing = [k for k in IDENTITY if existing.get(k) != stored.get(k)]
    if differing:
        raise different_run(plan.out, differing)


# -- per-sample inputs -------------------------------------------------------------------


def _conditions(conditions: Any, n: int) -> tuple[dict[str, str], list[dict[str, str]] | None]:
    """(the shared condition, or the per-sample ones)."""
    if conditions is None:
        return {}, None
    if isinstance(conditions, Mapping):
        return {str(k): str(v) for k, v in conditions.items()}, None
    each = [{str(k): str(v) for k, v in c.items()} for c in conditions]
    if len(each) != n:
        raise DtkError(f"got {len(each)} per-sample conditions for n={n} samples")
    return {}, each


class _Prompts:
    """Sample index -> its prompt: one for all, one per sample, or `missing` when none is
    given."""

    def __init__(self, prompt: Any, n: int, what: str, missing: str | None) -> None:
        self.shared, self.each = (missing, None) if prompt is None else (prompt, None)
        if prompt is not None and not isinstance(prompt, str):
            each = list(prompt)
            if not all(isinstance(p, str) for p in each):
                raise DtkError(f"{what} must be a string or a list of strings, one per sample")
            if len(each) != n:
                raise DtkError(f"got {len(each)} per-sample {what}s for n={n} samples")
            self.shared, self.each = None, each

    def __call__(self, i: int) -> str | None:
        return self.shared if self.each is None else self.each[i]

    def any(self) -> bool:
        return bool(self.shared) if self.each is None else any(self.each)


def _sample_text(sample: SampleRequest) -> str:
    parts = [f"{k}={v}" for k, v in sample.conditions.items()]
    if sample.prompt is not None:
        parts.append(f"prompt {sample.prompt!r}")
    return ", ".join(parts) or "unconditional"


def _size_text(folder: ModelFolder) -> str:
    """The image size (width x height), and whether it is the model's default."""
    _, height, width = getattr(folder, "image_shape", folder.sample_shape)
    asked = "--width/--height" if folder.image_size is not None else "the model's default"
    return f"size      {width}x{height} pixels (width x height; {asked})"


def _loras_text(loras: Any) -> str:
    return ", ".join(f"{lora.path.name} (scale {lora.scale:g}, sha256 {lora.sha256[:12]})"
                     for lora in loras)  # fmt: skip


def _plugin_text(use: PluginUse) -> str:
    options = ", ".join(f"{k}={v}" for k, v in use.options.items())
    return f"{use.name}({options})" if options else use.name
