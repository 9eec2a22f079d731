"""Installed versions: what a run records, to trace its results to the code that made them."""

from __future__ import annotations

import functools
import importlib.metadata

#: what every run depends on: the toolkit, and the libraries its numbers come from
CORE = ("diffusion-toolkit", "torch", "diffusers", "transformers")


def versions(*extra: str) -> dict[str, str]:
    """Installed versions of the core distributions and of `extra` ones (``""`` where one is
    not installed), for ``run.json`` and results files."""
    return {dist: _version(dist) for dist in dict.fromkeys((*CORE, *extra))}


# a distribution's metadata is found by scanning sys.path (about 3 ms each); a process does
# not change its installed versions under itself, and every run of a process asks again
@functools.cache
def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""
