"""What `dtk` writes when run inside the checkout stays out of git: `dtk demo --out demo`, as
docs/fairness.md suggests, and the default --out of every command that has one."""

from __future__ import annotations

import pathlib

import click

from toolkit.cli import cli

ROOT = pathlib.Path(__file__).resolve().parent.parent


def default_outs(group: click.Group, parent: click.Context) -> dict[str, str]:
    """Command path -> default --out folder, over every command of `dtk` that has one."""
    found = {}
    for name in group.list_commands(parent):
        command = group.get_command(parent, name)
        context = click.Context(command, info_name=name, parent=parent)
        if isinstance(command, click.Group):
            found.update(default_outs(command, context))
            continue
        for param in command.params:
            if param.name == "out" and not param.required and param.default is not None:
                found[context.command_path] = str(param.default)
    return found


def test_demo_and_default_outputs_are_ignored_at_the_repository_root():
    outs = default_outs(cli, click.Context(cli, info_name="dtk"))
    assert {"dtk generate", "dtk eval bias", "dtk demo"} <= set(outs)  # the walk found them
    patterns = {line.strip() for line in (ROOT / ".gitignore").read_text().splitlines()}
    for folder in ["demo", *outs.values()]:
        # anchored: a demo/ or dtk-out/ folder deeper in the tree is not ignored with it
        assert f"/{folder}/" in patterns, folder
