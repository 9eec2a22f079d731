"""The ``dtk`` command line.

Keep module-level imports light: ``dtk --help`` and ``dtk plugins`` must not import torch.
"""

from __future__ import annotations

import json
import pathlib
import sys
import warnings
from typing import Any

import click

from toolkit.errors import DtkError, GenerationWarning, PluginLoadWarning
from toolkit.registry import KINDS, get_registry


class UserError(click.ClickException):
    """A mistake in the user's input: one clear line on stderr, exit status 2."""

    exit_code = 2


def _show_plugin_warning(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
    if issubclass(category, (PluginLoadWarning, GenerationWarning)):
        click.echo(f"dtk: warning: {message}", err=True)
    else:
        _default_showwarning(message, category, *args, **kwargs)


_default_showwarning = warnings.showwarning


class DtkGroup(click.Group):
    """The ``dtk`` group. Its subcommands are the registry's commands (the
    ``register_commands`` hook: the core's own, `evaluations`' and third-party ones, under
    the registry's rules), and a `DtkError` from any subcommand is a user error: one line,
    exit status 2."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        # before anything loads the registry (resolving the subcommand does), so its load
        # warnings come out as one "dtk: warning:" line each
        warnings.showwarning = _show_plugin_warning
        return super().make_context(*args, **kwargs)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *get_registry().commands()})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return self.commands.get(name) or get_registry().commands().get(name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DtkError as exc:
            raise UserError(str(exc)) from None


@click.group(cls=DtkGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="diffusion-toolkit", prog_name="dtk")
def cli() -> None:
    """diffusion-toolkit: diffusion-model generation and fairness tooling.

    Every schedule, sampler, guidance method, safety filter and attribute classifier is a
    plugin. `dtk plugins` lists what is installed; `pip install` a plugin package and it
    shows up at once.

    \b
    Environment:
      DTK_LOAD_PLUGINS=a,b   load only these third-party plugin distributions ('' = none)
      DTK_STRICT_PLUGINS=1   raise on a broken plugin instead of skipping it
    """


@click.command("plugins")
@click.option(
    "--kind",
    type=click.Choice(list(KINDS)),
    help="Only list plugins of this kind.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of records on stdout.")
def plugins_command(kind: str | None, as_json: bool) -> None:
    """List installed plugins: name, kind, distribution, version, status, error.

    Status is `ok`, `clash` (another distribution registers the same name: pick one as
    DIST:NAME), `error` (the plugin failed to load and was skipped), `disabled` (not in
    DTK_LOAD_PLUGINS) or `not installed` (named in DTK_LOAD_PLUGINS but absent).

    \b
    Examples:
      dtk plugins
      dtk plugins --kind sampler
      dtk plugins --json | jq '.[] | select(.status != "ok")'
    """
    rows = get_registry().rows(kind)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no plugins found (is diffusion-toolkit installed with pip?)", err=True)
        return
    columns = ["name", "kind", "distribution", "version", "status", "error"]
    # one line per row: multi-line errors (pluggy validation messages) are joined
    table = [[" ".join(str(row[c] or "").split()) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in table)) for i, c in enumerate(columns)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip())
    for r in table:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())


def _split_filter_options(pairs: tuple[str, ...], filters: tuple[str, ...]) -> dict:
    """``--filter-option NAME.KEY=VALUE`` (or ``KEY=VALUE`` when one filter is given)."""
    from toolkit.options import parse_key_values

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


def _prompts(kw: dict[str, Any]) -> tuple[Any, Any, int]:
    """(prompt, negative prompt, n) from --prompt, --negative-prompt, --prompts-file, -n."""
    if kw["prompts_file"] is None:
        return kw["prompt"], kw["negative_prompt"], kw["n"]
    from toolkit.prompts import read_prompts_file

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


@click.command("generate")
@click.option(
    "--model",
    type=click.Path(path_type=pathlib.Path),
    help="A local diffusers model folder (pipeline or UNet2DModel). Default: the shipped model.",
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
@click.option("-n", "--num", "n", type=int, default=16, show_default=True, help="Samples.")
@click.option("--seed", type=int, default=0, show_default=True, help="Sample i uses seed+i.")
@click.option("--sampler", default="dpmpp_2m", show_default=True, help="Sampler plugin.")
@click.option("--sampler-option", multiple=True, metavar="KEY=VALUE", help="Repeatable.")
@click.option("--schedule", default="karras", show_default=True, help="Schedule plugin.")
@click.option("--schedule-option", multiple=True, metavar="KEY=VALUE", help="Repeatable.")
@click.option("--steps", type=int, default=20, show_default=True, help="Sampling steps.")
@click.option(
    "--guidance",
    default=None,
    help="Guidance plugin. Default: cfg (scale 2) when conditioned on a model with a null "
    "label, cfg (scale 7.5) with a prompt, else none.",
)
@click.option("--guidance-option", multiple=True, metavar="KEY=VALUE", help="Repeatable.")
@click.option(
    "--filter", "filters", multiple=True, metavar="NAME", help="Safety filter; repeatable."
)
@click.option("--filter-option", multiple=True, metavar="[NAME.]KEY=VALUE", help="Repeatable.")
@click.option(
    "--on-flag",
    type=click.Choice(["drop", "blank", "tag"]),
    default="drop",
    show_default=True,
    help="What happens to an image a filter flags (all verdicts are recorded).",
)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto = cuda, mps, cpu.")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    default="float32",
    show_default=True,
    help="The network's precision (the sampler's state stays float32).",
)
@click.option(
    "--out",
    type=click.Path(path_type=pathlib.Path),
    default=pathlib.Path("dtk-out"),
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
@click.option("--trust-pickle", is_flag=True, help="Allow pickled (.bin) weights.")
@click.option(
    "--attention-slicing",
    is_flag=True,
    help="Text-to-image models: compute attention in slices (less GPU memory, a little slower).",
)
@click.option(
    "--vae-tiling",
    is_flag=True,
    help="Text-to-image models: decode latents in overlapping tiles (large images on small GPUs).",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def generate_command(**kw: Any) -> None:
    """Generate a dataset of images with any registered sampler, schedule, guidance
    and filters.

    The output folder holds class subfolders of PNGs, metadata.csv (one row per image),
    rejected.csv and run.json; it loads with datasets' "imagefolder". Rerunning the same
    command (or with a larger -n) resumes without redoing or duplicating a sample.
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
      torchrun --nproc-per-node 4 $(which dtk) generate -n 50000 --out big
    """
    from toolkit.conditions import parse_conditions
    from toolkit.generation import generate
    from toolkit.options import parse_key_values

    prompt, negative, n = _prompts(kw)
    metadata = generate(
        kw["model"],
        out=kw["out"],
        conditions=parse_conditions(kw["conditions"]),
        prompt=prompt,
        negative_prompt=negative,
        n=n,
        seed=kw["seed"],
        sampler=kw["sampler"],
        sampler_options=parse_key_values(kw["sampler_option"], what="--sampler-option"),
        schedule=kw["schedule"],
        schedule_options=parse_key_values(kw["schedule_option"], what="--schedule-option"),
        steps=kw["steps"],
        guidance=kw["guidance"],
        guidance_options=parse_key_values(kw["guidance_option"], what="--guidance-option"),
        filters=kw["filters"],
        filter_options=_split_filter_options(kw["filter_option"], kw["filters"]),
        on_flag=kw["on_flag"],
        batch_size=kw["batch_size"],
        device=kw["device"],
        dtype=kw["dtype"],
        shard=kw["shard"],
        grid=kw["grid"],
        wait=kw["wait"],
        trust_pickle=kw["trust_pickle"],
        attention_slicing=kw["attention_slicing"],
        vae_tiling=kw["vae_tiling"],
        progress=not kw["quiet"],
        options_from_strings=True,
    )
    click.echo(f"{len(metadata)} images in {kw['out']}", err=True)


@click.command("merge")
@click.argument("out", type=click.Path(path_type=pathlib.Path, file_okay=False, exists=True))
def merge_command(out: pathlib.Path) -> None:
    """Join the metadata of shard jobs into OUT/metadata.csv and OUT/rejected.csv.

    Each `dtk generate --shard K/N` job (or torchrun rank) logs its finished samples in
    OUT/.dtk/parts/; the last job to finish merges them, and `dtk merge` does it again by
    hand, after jobs ran on machines that did not all finish, say. Merging never drops a
    sample that metadata.csv already lists: a folder copied without its hidden .dtk/
    folder, or with a damaged part log, is refused with the file and line at fault.

    \b
    Examples:
      dtk generate -n 1000 --shard 0/2 --out big &
      dtk generate -n 1000 --shard 1/2 --out big
      dtk merge big
    """
    from toolkit.output import OutputFolder

    folder = OutputFolder(out)
    run = folder.read_run()
    if run is None:
        raise DtkError(f"{out} is not a dtk output folder (no run.json)")
    metadata = folder.merge()
    missing = run.get("n", 0) - len(folder.records())
    click.echo(f"{len(metadata)} images in {out}", err=True)
    if missing > 0:
        click.echo(f"{missing} samples not generated yet (rerun the missing shards)", err=True)


def main() -> None:
    """Entry point of the ``dtk`` console script."""
    cli.main(prog_name="dtk")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
