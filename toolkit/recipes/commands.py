"""The recipes' ``dtk`` subcommands (``data``, ``train``, ``train-classifier``), registered
through the ``register_commands`` hook (pyproject.toml's ``dtk`` entry point ``recipes``),
so the core never imports the recipes.

Keep imports light: ``dtk --help`` loads this module and must not import torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import toolkit
from toolkit.recipes.classifier_command import train_classifier_command
from toolkit.recipes.data_command import data_group
from toolkit.recipes.train_command import train_command


@toolkit.hookimpl
def register_commands(register: Callable[[Any], None]) -> None:
    for command in (train_command, train_classifier_command, data_group):
        register(command)
