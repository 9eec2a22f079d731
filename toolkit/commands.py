"""The core's own ``dtk`` subcommands, registered through the ``register_commands`` hook
like `evaluations`' and third-party ones (pyproject.toml's ``dtk`` entry point
``commands``), so one rule decides every command name: a built-in keeps it.

Keep imports light: ``dtk --help`` loads this module and must not import torch.
"""

from __future__ import annotations

import toolkit
from toolkit.cli import generate_command, merge_command, plugins_command
from toolkit.commands_classifier import train_classifier_command
from toolkit.commands_data import data_group
from toolkit.commands_train import train_command


@toolkit.hookimpl
def register_commands(register: toolkit.hookspecs.Register) -> None:
    for command in (
        generate_command,
        plugins_command,
        merge_command,
        train_command,
        train_classifier_command,
        data_group,
    ):
        register(command)
