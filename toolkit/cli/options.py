"""The command-line options of `GenerationSettings`, shared by every command that generates
(``dtk generate``, ``dtk eval bias``, ``dtk synthesize``, ``dtk demo``), so their option
lists cannot drift apart: `generation_options` adds them, `settings_from_cli` turns the
parsed values into the settings.

Public as ``toolkit.generation_options`` and ``toolkit.settings_from_cli``; keep imports
light (no torch): ``dtk --help`` loads this module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from toolkit import defaults
from toolkit.errors import DtkError
from toolkit.generation.request import GenerationSettings
from toolkit.registry.options import parse_key_values

#: the keyword names `generation_options` adds to a command's parameters
KEYS = ("sampler", "sampler_option", "schedule", "schedule_option", "steps", "guidance",
        "guidance_option", "model_option", "width", "height", "lora", "safety_filters",
        "filter_option", "on_flag", "batch_size", "device", "dtype", "trust_pickle",
        "attention_slicing", "vae_tiling", "compile", "compile_cache", "channels_last",
        "step_cache", "step_cache_option")  # fmt: skip


#: what a sampler, schedule or steps left out is (`ModelFolder.default_sampling`)
MODEL_DEFAULT = "the model's: {}, or its pipeline's ({})"


def generation_options(
    *,
    steps: int | None = None,
    guidance_help: str = "cfg (scale 2) when conditioned on a model with a null label, cfg "
    "(scale 7.5) with a prompt, else none",
    steps_help: str | None = None,
    filters: bool = True,
) -> Callable[[Any], Any]:
    """A decorator adding the generation options to a click command; a command with its own
    notion of filters (``dtk synthesize``) leaves `filters` out. Sampler, schedule and (unless
    the command gives `steps`) steps default to None: the model's default, or the command's
    own where it says so in `steps_help` (what follows "Default: ")."""
    pipelines = "SD 3 and Flux dev: 28; Flux schnell and LCM: 4"
    model_steps = MODEL_DEFAULT.format(defaults.STEPS, pipelines)
    steps_help = f"Sampling steps. Default: {steps_help or model_steps}."
    sampler_help = MODEL_DEFAULT.format(
        f"{defaults.LABEL_SAMPLER} for label-conditioned UNets (the shipped model), "
        f"{defaults.SAMPLER} otherwise", "SD 3 and Flux: euler; LCM: lcm")  # fmt: skip
    schedule_help = MODEL_DEFAULT.format(defaults.SCHEDULE, "SD 3 and Flux: flow; LCM: lcm")
    options = [
        click.option("--sampler", default=None,
                     help="Sampler plugin (dtk plugins --kind sampler). Default: "
                     + sampler_help + "."),
        click.option("--sampler-option", multiple=True, metavar="KEY=VALUE",
                     help="An option of the sampler; repeatable."),
        click.option("--schedule", default=None,
                     help="Noise-schedule plugin. Default: "
                     + schedule_help + "."),
        click.option("--schedule-option", multiple=True, metavar="KEY=VALUE",
                     help="An option of the schedule; repeatable."),
        click.option("--steps", type=int, default=steps, show_default=steps is not None,
                     help="Sampling steps." if steps is not None else steps_help),
        click.option("--guidance", default=None,
                     help=f"Guidance plugin. Default: {guidance_help}."),
        click.option("--guidance-option", multiple=True, metavar="KEY=VALUE",
                     help="An option of the guidance; repeatable."),
        click.option("--model-option", multiple=True, metavar="KEY=VALUE",
                     help="An option of the model itself; repeatable. Flux: guidance "
                     "(dev: the embedded guidance scale, default 3.5), max_sequence_length; "
                     "LCM: guidance (default 8.5); PixArt: resolution_binning (default "
                     "true)."),
        click.option("--width", type=int, default=None,
                     help="Image width in pixels (SD, SDXL, SD 3, Flux, PixArt). Default: the "
                     "model's."),
        click.option("--height", type=int, default=None,
                     help="Image height in pixels (SD, SDXL, SD 3, Flux, PixArt). Default: the "
                     "model's."),
        click.option("--lora", multiple=True, metavar="PATH[:SCALE]",
                     help="A LoRA (.safetensors) applied at SCALE (default 1.0); repeatable, "
                     "combined (SD, SDXL, SD 3, Flux)."),
    ]  # fmt: skip
    if filters:
        options += [
            click.option("--filter", "safety_filters", multiple=True, metavar="NAME",
                         help="Safety filter; repeatable."),
            click.option("--filter-option", multiple=True, metavar="[NAME.]KEY=VALUE",
                         help="An option of a filter; repeatable."),
            click.option("--on-flag", type=click.Choice(["drop", "blank", "tag"]),
                         default=defaults.ON_FLAG, show_default=True,
                         help="What happens to an image a filter flags (every verdict is "
                         "recorded)."),
        ]  # fmt: skip
    options += [
        click.option("--batch-size", type=int, default=None,
                     help="Samples per batched forward pass. Default: sized for the model's "
                     f"samples, at most {defaults.MAX_BATCH} (the shipped model: 64; SD 1.5: "
                     "16; SDXL: 4; SD 3 and Flux: 1)."),
        click.option("--device", default=defaults.DEVICE, show_default=True,
                     help="auto = cuda, mps, cpu."),
        click.option("--dtype", type=click.Choice(list(defaults.DTYPES)),
                     default=defaults.DTYPE, show_default=True,
                     help="The network's precision (the sampler's state stays float32)."),
        click.option("--trust-pickle", is_flag=True, help="Allow pickled (.bin) weights."),
        click.option("--attention-slicing", is_flag=True,
                     help="Text-to-image models: compute attention in slices (less GPU "
                     "memory, a little slower)."),
        click.option("--vae-tiling", is_flag=True,
                     help="Text-to-image models: decode latents in overlapping tiles (large "
                     "images on small GPUs)."),
        click.option("--compile", "compile", is_flag=False, flag_value="default", default=None,
                     type=click.Choice(defaults.COMPILE_MODES), metavar="[MODE]",
                     help="Compile the denoising network with torch.compile (MODE: default "
                     "or max-autotune): slow to start, faster per step; once per process, "
                     "not again for a smaller last batch."),
        click.option("--compile-cache", type=click.Path(file_okay=False), default=None,
                     help="With --compile: keep inductor's compiled kernels in this folder, "
                     "so the next run starts fast."),
        click.option("--channels-last", is_flag=True,
                     help="Keep the network's weights and activations in channels-last "
                     "memory format (faster convolutions on most accelerators)."),
        click.option("--step-cache", default=None, metavar="NAME",
                     help="Skip part of the network on steps where its features barely "
                     "change: deepcache (UNets), first_block_cache (transformers) or another "
                     "step-cache plugin (dtk plugins --kind step_cache). Faster, slightly "
                     "different images; see docs/performance.md for when it beats fewer "
                     "steps."),
        click.option("--step-cache-option", multiple=True, metavar="KEY=VALUE",
                     help="An option of the step cache (deepcache: interval, branch; "
                     "first_block_cache: threshold); repeatable."),
    ]  # fmt: skip

    def decorate(function: Any) -> Any:
        for option in reversed(options):
            function = option(function)
        return function

    return decorate


def settings_from_cli(kw: dict[str, Any]) -> GenerationSettings:
    """The settings from the options `generation_options` added, popped from `kw`."""
    values = {key: kw.pop(key) for key in KEYS if key in kw}
    filters = tuple(values.pop("safety_filters", ()))
    guidance_options = values.pop("guidance_option")
    if guidance_options and values["guidance"] is None:
        raise DtkError("--guidance-option needs --guidance NAME")
    cache_options = values.pop("step_cache_option", ())
    if cache_options and values.get("step_cache") is None:
        raise DtkError("--step-cache-option needs --step-cache NAME")
    return GenerationSettings(
        sampler_options=parse_key_values(values.pop("sampler_option"), what="--sampler-option"),
        schedule_options=parse_key_values(values.pop("schedule_option"), what="--schedule-option"),
        guidance_options=parse_key_values(guidance_options, what="--guidance-option"),
        model_options=parse_key_values(values.pop("model_option", ()), what="--model-option"),
        step_cache_options=parse_key_values(cache_options, what="--step-cache-option"),
        loras=tuple(values.pop("lora", ())),
        filters=filters,
        filter_options=_filter_options(values.pop("filter_option", ()), filters),
        options_from_strings=True,
        **values,
    )


def _filter_options(pairs: tuple[str, ...], filters: tuple[str, ...]) -> dict:
    """``--filter-option NAME.KEY=VALUE`` (or ``KEY=VALUE`` when one filter is given)."""
    result: dict[str, dict[str, str]] = {}
    for key, value in parse_key_values(pairs, what="--filter-option").items():
        name, dot, option = key.partition(".")
        if not dot:
            if len(filters) != 1:
                raise DtkError(
                    f"--filter-option {key}=...: write FILTER.{key}=... when several or no "
                    "--filter are given"
                )
            name, option = filters[0], key
        result.setdefault(name, {})[option] = value
    return result


def format_options(function: Any) -> Any:
    """``--format`` and ``--shard-size`` (`toolkit.data.shards`): how the images are stored."""
    function = click.option(
        "--shard-size", type=int,
        help="webdataset and parquet: images per shard (default 1000; a shard also closes at "
        "1 GiB). A killed run costs the shard being filled.",
    )(function)  # fmt: skip
    return click.option(
        "--format", "fmt", type=click.Choice(["imagefolder", "webdataset", "parquet"]),
        default="imagefolder", show_default=True,
        help="imagefolder: a PNG per image in class folders. webdataset: tar shards "
        "(train-PART-NNNNNN.tar, <key>.png and <key>.json per sample). parquet: Parquet "
        "shards with an image column and every metadata column. All three load with "
        "datasets' load_dataset(FORMAT, data_dir=FOLDER), and with every dtk command that "
        "reads a dataset folder.",
    )(function)  # fmt: skip


def engine_options(function: Any) -> Any:
    """``--engine``, ``--workers``, ``--ray-address`` and ``--threads``
    (`toolkit.generation.engines`)."""
    function = click.option(
        "--threads", type=int,
        help="torch's CPU threads per process: the local engine's (default: every core) or "
        "each Ray worker's (default 1). On a CPU an image's bytes depend on it: give both "
        "engines the same count for the same bytes.",
    )(function)  # fmt: skip
    function = click.option(
        "--ray-address", metavar="ADDR",
        help="--engine ray: the cluster to join (as ray.init takes it: auto, "
        "ray://HOST:10001); default: start a local one.",
    )(function)  # fmt: skip
    function = click.option(
        "--workers", type=int, help="--engine ray: actors in the pool (default 1)."
    )(function)
    return click.option(
        "--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
        help="local: this process (or torchrun's ranks). ray: a Ray Data actor pool, one "
        "model load per actor, writing from the workers; needs pip install "
        "'diffusion-toolkit[ray]'.",
    )(function)  # fmt: skip
