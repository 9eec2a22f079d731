"""`generate`: a model folder -> a dataset folder of images, through the plugins; the same
run as ``dtk generate``. It makes a `GenerationRequest` of its arguments, checks it into a
plan (`toolkit.generation.plan`: configs only) and runs the plan
(`toolkit.generation.run`: weights, batches, files).
"""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from toolkit import defaults
from toolkit.data.output import OutputFolder
from toolkit.generation.plan import make_plan
from toolkit.generation.request import GenerationRequest, GenerationSettings
from toolkit.generation.run import run

if TYPE_CHECKING:
    import pandas

    from toolkit.data.output import Merged
    from toolkit.generation.distributed import Shard
    from toolkit.generation.plan import Plan


def execute(plan: Plan) -> Merged | None:
    """Run `plan` with its engine: `run` (local, at the request's `threads`) or
    `toolkit.generation.ray_engine`."""
    if plan.request.engine == "ray":
        from toolkit.generation.ray_engine import run_ray

        return run_ray(plan)
    with torch_threads(plan.request.threads):
        return run(plan)


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `count` (None: left alone) in the block, then back."""
    if count is None:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def default_model() -> pathlib.Path | None:
    """The generator shipped with the package, if this installation has one."""
    from toolkit.assets import generator_path

    return generator_path()


def generate(
    model: str | pathlib.Path | None = None,
    *,
    out: str | pathlib.Path,
    conditions: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    prompt: str | Sequence[str] | None = None,
    negative_prompt: str | Sequence[str] | None = None,
    n: int = defaults.SAMPLES,
    seed: int = 0,
    shard: str | Shard | None = None,
    grid: str | pathlib.Path | None = None,
    wait: bool = False,
    progress: bool = True,
    format: str = "imagefolder",
    shard_size: int | None = None,
    engine: str = "local",
    workers: int | None = None,
    ray_address: str | None = None,
    threads: int | None = None,
    settings: GenerationSettings | None = None,
    **options: Any,
) -> pandas.DataFrame:
    """Generate `n` samples from `model` into the dataset folder `out`; the same run as
    ``dtk generate``. Returns the metadata of every written image (this run's and any
    earlier run's in the same folder).

    `conditions` is one mapping for all samples (``{"digit": "3"}``) or one per sample.
    A text-to-image model takes `prompt` instead: one string for all samples or one per
    sample (its `conditions`, if any, annotate the prompts with the attribute values they
    express: metadata columns that filters see); `negative_prompt` likewise, the ``uncond``
    branch of guidance (the empty prompt when None).

    How the images are generated is `settings` (a `toolkit.GenerationSettings`), or its
    fields given as keyword `options`: ``sampler``, ``schedule``, ``steps``, ``guidance``
    and their ``*_options``, ``model_options`` (``--model-option``: Flux's and an LCM's
    embedded guidance scale, ...), ``width`` and ``height`` (pixels), ``loras``
    (``"PATH[:SCALE]"`` strings or ``(path, scale)`` pairs), ``filters``,
    ``filter_options``, ``on_flag``, ``batch_size``, ``device``, ``dtype``,
    ``trust_pickle``, ``attention_slicing``, ``vae_tiling``, ``compile`` (a torch.compile
    mode), ``compile_cache`` (inductor's cache folder), ``channels_last`` and
    ``options_from_strings`` (plugin options as ``KEY=VALUE`` strings). A sampler,
    schedule, steps or guidance left out is the model family's default (docs/models.md):
    for guidance, ``cfg`` (scale 2) for a conditioned request on a model with a null label,
    ``cfg`` at the family's scale for a prompt (SD: 7.5), ``none`` for Flux, an LCM or an
    unconditional request.

    `format` stores the images as an ``imagefolder`` (a PNG per file, the default),
    ``webdataset`` tar shards or ``parquet`` shards of `shard_size` images
    (`toolkit.data.shards`). ``engine="ray"`` generates with a Ray Data actor pool of
    `workers` on the cluster at `ray_address` (default: a local one), the same bytes per
    sample (`toolkit.generation.ray_engine`) where `threads` is the same: torch's CPU
    threads per process (default: every core for the local engine, 1 per Ray worker).

    Sample ``i`` starts from
    ``torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed + i))``.
    One run at a time writes a folder (or a shard of it): another run of the same part is
    refused, or with `wait` waited for. A sample whose result is not finite (NaN or inf) is
    not written: it is recorded with status ``failed`` in rejected.csv, and a
    `GenerationWarning` says how many.
    """
    if settings is not None and options:
        raise TypeError("give settings= or its fields as keyword arguments, not both")
    request = GenerationRequest(
        model=model, out=out, conditions=conditions, prompt=prompt,
        negative_prompt=negative_prompt, n=n, seed=seed,
        settings=GenerationSettings.from_mapping(settings or options),
        shard=shard, grid=grid, wait=wait, progress=progress, format=format,
        shard_size=shard_size, engine=engine, workers=workers, ray_address=ray_address,
        threads=threads,
    )  # fmt: skip
    plan = make_plan(request)
    if execute(plan) is None:  # a torchrun rank that did not merge
        import pandas

        return pandas.DataFrame()
    # read back from the part logs with the records' types (``dtk generate`` skips this)
    return OutputFolder(plan.out).metadata()
