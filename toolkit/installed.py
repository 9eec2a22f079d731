"""Installed versions: what a run records, to trace its results to the code that made them."""

from __future__ import annotations

import importlib.metadata

#: what every run depends on: the toolkit, and the libraries its numbers come from
CORE = ("diffusion-toolkit", "torch", "diffusers", "transformers")


def versions(*extra: str) -> dict[str, str]:
    """Installed versions of the core distributions and of `extra` ones (``""`` where one is
    not installed), for ``run.json`` and results files."""
    found = {}
    for dist in dict.fromkeys((*CORE, *extra)):
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = ""
    return found
