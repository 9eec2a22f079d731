"""A step cache (`toolkit.StepCache`) over the network calls of one batch.

A cache keeps features from one call for later ones, which only makes sense while every
call's row ``r`` is the same sample's same branch. The denoiser tells `CacheRuns` the layout
of each call (its branches and rows) before making it; the cache's state (`attach`) is
entered at the first call, and left and entered afresh whenever the layout changes (a
guidance that drops its unconditional branch at some noise levels), so it never reuses
features of other rows. Leaving it at the end of the batch puts the network back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable
from typing import Any


class CacheRuns:
    """`cache` attached to `network` for runs of calls with one layout (see the module
    docstring); a context manager that detaches at exit. With no `cache`, nothing."""

    def __init__(self, cache: Any, network: Any) -> None:
        self.cache, self.network = cache, network
        self.layout: Hashable | None = None
        self._attached = contextlib.ExitStack()

    def before_call(self, layout: Hashable) -> None:
        """Called before each network call with its layout (hashable)."""
        if self.cache is None or layout == self.layout:
            return
        self._attached.close()
        self._attached.enter_context(self.cache.attach(self.network))
        self.layout = layout

    def __enter__(self) -> CacheRuns:
        return self

    def __exit__(self, *exc: object) -> None:
        self._attached.close()
        self.layout = None
