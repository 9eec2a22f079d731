"""The ``dtk`` command line: the group (`toolkit.cli.group`) and the core's commands.

Keep imports light: ``dtk --help`` and ``dtk plugins`` must not import torch.
"""

from toolkit.cli.group import UserError, cli, main

__all__ = ["UserError", "cli", "main"]
