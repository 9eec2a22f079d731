"""``dtk generate``: a dataset of images from a model folder, with any registered plugins."""

from __future__ import annotations

import pathlib
from typing import Any

import click

from toolkit import defaults
from toolkit.cli.options import (
    engine_options,
    format_options,
    generation_options,
    settings_from_cli,
)
from toolkit.errors import DtkError


@click.command("generate")
@click.option(
    "--model",
    type=click.Path(path_type=pathlib.Path),
    help="A local diffusers model folder (pipeline or UNet2DModel), or a shipped model's "
    "name: digits (label-conditioned, the default) or text-digits (text-to-image).",
)
@click.option(
    "--condition",
    "conditions",
    multiple=True,
    metavar="KEY=VALUE",
    help="An attribute value for every sample, e.g. --condition digit=3. Repeatable; "
    "attributes left out are unspecified.",
)
@click.option("--prompt", help="Text-to-image models: the prompt of every sample.")
@click.option(
    "--negative-prompt",
    help="Text-to-image models: what guidance steers away from (default: the empty prompt).",
)
@click.option(
    "--prompts-file",
    type=click.Path(path_type=pathlib.Path),
    help="Text-to-image models: a CSV with columns prompt, optional count (samples per row, "
    "default 1) and negative_prompt; -n defaults to the total count.",
)
@click.option("-n", "--num", "n", type=int, default=defaults.SAMPLES, show_default=True,
              help="Samples.")  # fmt: skip
@click.option("--seed", type=int, default=0, show_default=True, help="Sample i uses seed+i.")
@generation_options()
@click.option(
    "--out",
    type=click.Path(path_type=pathlib.Path),
    default=pathlib.Path(defaults.OUT),
    show_default=True,
    help="The dataset folder; rerunning the same command resumes it.",
)
@click.option("--shard", metavar="K/N", help="Generate only sample indices i with i % N == K.")
@click.option(
    "--wait",
    is_flag=True,
    help="If another run is writing the same --out (and shard), wait for it to finish "
    "instead of stopping.",
)
@click.option(
    "--grid", type=click.Path(path_type=pathlib.Path), help="Also write a contact-sheet PNG."
)
@engine_options
@format_options
@click.option(
    "--dry-run",
    is_flag=True,
    help="Check everything and print the plan (model, samples, plugins, output); load no "
    "weights and write nothing.",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def generate_command(**kw: Any) -> None:
    """Generate a dataset of images with any registered sampler, schedule, guidance
    and filters.

    The output folder holds class subfolders of PNGs (or, with --format, WebDataset or
    Parquet shards), metadata.csv (one row per image), rejected.csv and run.json; it loads
    with datasets' "imagefolder" (or "webdataset", "parquet"). Rerunning the same command
    (or with a larger -n) resumes without redoing or duplicating a sample.
    Sample i starts from seed+i, so it does not depend on --batch-size or --shard.

    \b
    Examples:
      dtk generate --condition digit=7 -n 16 --grid grid.png
      dtk generate --model ./my-ddpm --sampler ddim --schedule leading --steps 50
      dtk generate --model ./my-sd --prompt "a photo of a cat" --negative-prompt blurry
      dtk generate --sampler dpmpp_2m_sde --sampler-option solver_type=heun
      dtk generate --filter blocklist --filter-option words=violent,gore
      dtk generate --guidance fair --condition digit=3      # group drawn 50/50
      dtk generate --model ./my-sd --prompt "a photo of a doctor" --guidance fair \\
          --guidance-option attribute=gender --guidance-option values=female,male
      dtk generate -n 1000000 --dry-run                    # the plan, nothing run
      torchrun --nproc-per-node 4 $(which dtk) generate -n 50000 --out big
      dtk generate -n 100000 --format webdataset --out shards   # 100 tar shards
      dtk generate -n 100000 --format webdataset --engine ray --workers 8 --out shards
    """
    from toolkit.conditions.labels import parse_conditions
    from toolkit.generation.plan import make_plan
    from toolkit.generation.request import GenerationRequest

    prompt, negative, n = _prompts(kw)
    request = GenerationRequest(
        model=kw["model"], out=kw["out"], conditions=parse_conditions(kw["conditions"]),
        prompt=prompt, negative_prompt=negative, n=n, seed=kw["seed"],
        settings=settings_from_cli(kw), shard=kw["shard"], grid=kw["grid"], wait=kw["wait"],
        progress=not kw["quiet"], format=kw["fmt"], shard_size=kw["shard_size"],
        engine=kw["engine"], workers=kw["workers"], ray_address=kw["ray_address"],
        threads=kw["threads"],
    )  # fmt: skip
    plan = make_plan(request)
    if kw["dry_run"]:
        click.echo(plan.describe())
        return
    from toolkit.generation.generate import execute

    merged = execute(plan)  # counts only: the metadata stays on disk
    click.echo(f"{merged.images if merged else 0} images in {kw['out']}", err=True)


def _prompts(kw: dict[str, Any]) -> tuple[Any, Any, int]:
    """(prompt, negative prompt, n) from --prompt, --negative-prompt, --prompts-file, -n."""
    if kw["prompts_file"] is None:
        return kw["prompt"], kw["negative_prompt"], kw["n"]
    from toolkit.conditions.prompts import read_prompts_file

    if kw["prompt"] is not None:
        raise DtkError("give --prompt or --prompts-file, not both")
    prompts, negatives = read_prompts_file(kw["prompts_file"])
    if negatives is not None and kw["negative_prompt"] is not None:
        raise DtkError("--negative-prompt and a negative_prompt column in --prompts-file: give one")
    n = kw["n"]
    explicit_n = click.get_current_context().get_parameter_source("n")
    if explicit_n is click.core.ParameterSource.DEFAULT:
        n = len(prompts)
    elif n != len(prompts):
        raise DtkError(f"-n {n}, but --prompts-file {kw['prompts_file']} asks for "
                       f"{len(prompts)} samples")  # fmt: skip
    return prompts, negatives if negatives is not None else kw["negative_prompt"], n
