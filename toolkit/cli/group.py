"""The ``dtk`` command line.

Keep module-level imports light: ``dtk --help`` and ``dtk plugins`` must not import torch.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from typing import Any

import click

from toolkit.errors import DtkError, GenerationWarning, PluginLoadWarning
from toolkit.registry.manager import get_registry


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


def main() -> None:
    """Entry point of the ``dtk`` console script."""
    try:
        cli.main(prog_name="dtk")
    except SystemExit as exc:
        _end(exc.code)
        raise


def _end(code: Any) -> None:
    """End a process that imported torch at once: its outputs are durable by now (every
    file is fsynced before it is renamed into place), and the interpreter's orderly
    shutdown, tearing down torch's and diffusers' modules, takes a second on a CPU. The
    standard streams and log handlers are flushed first; a process without torch ends the
    usual way. ``DTK_ORDERLY_EXIT=1`` keeps the orderly shutdown (for profilers and
    coverage tools that write their results at exit)."""
    import os

    if "torch" not in sys.modules or os.environ.get("DTK_ORDERLY_EXIT") == "1":
        return
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken stream
            stream.flush()
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message") prints the message and exits 1
        print(code, file=sys.stderr, flush=True)
        status = 1
    os._exit(status)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
