"""The core's own ``dtk`` subcommands, registered through the ``register_commands`` hook
like the recipes', `evaluations`' and third-party ones (pyproject.toml's ``dtk`` entry
point ``commands``), so one rule decides every command name: a built-in keeps it.

Keep imports light: ``dtk --help`` loads this module and must not import torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import toolkit
from toolkit.cli.generate import generate_command
from toolkit.cli.merge import merge_command
from toolkit.cli.plugins import plugins_command


@toolkit.hookimpl
def register_commands(register: Callable[[Any], None]) -> None:
    for command in (generate_command, plugins_command, merge_command):
        register(command)
