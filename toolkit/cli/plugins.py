"""``dtk plugins``: list every installed plugin and its status."""

from __future__ import annotations

import json

import click

from toolkit.registry.manager import KINDS, get_registry


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
