"""The ``dtk`` command line.

Keep module-level imports light: ``dtk --help`` and ``dtk plugins`` must not import torch.
"""

from __future__ import annotations

import json
import sys
import warnings
from typing import Any

import click

from toolkit.errors import DtkError, PluginLoadWarning
from toolkit.registry import KINDS, get_registry


class UserError(click.ClickException):
    """A mistake in the user's input: one clear line on stderr, exit status 2."""

    exit_code = 2


def _show_plugin_warning(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
    if issubclass(category, PluginLoadWarning):
        click.echo(f"dtk: warning: {message}", err=True)
    else:
        _default_showwarning(message, category, *args, **kwargs)


_default_showwarning = warnings.showwarning


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
    warnings.showwarning = _show_plugin_warning


@cli.command("plugins")
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
    try:
        rows = get_registry().rows(kind)
    except DtkError as exc:
        raise UserError(str(exc)) from None
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no plugins found (is diffusion-toolkit installed with pip?)", err=True)
        return
    columns = ["name", "kind", "distribution", "version", "status", "error"]
    table = [[str(row[c] or "") for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in table)) for i, c in enumerate(columns)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip())
    for r in table:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())


def main() -> None:
    """Entry point of the ``dtk`` console script."""
    cli.main(prog_name="dtk")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
