"""``dtk eval``, ``dtk synthesize`` and ``dtk demo`` join ``dtk`` through the registry's
``register_commands`` hook (pyproject.toml's ``dtk`` entry point ``evaluations``), as any
third-party command would, so `toolkit` never imports `evaluations`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import toolkit
from evaluations.cli import demo_command, eval_group, synthesize_command


@toolkit.hookimpl
def register_commands(register: Callable[[Any], None]) -> None:
    for command in (eval_group, synthesize_command, demo_command):
        register(command)
