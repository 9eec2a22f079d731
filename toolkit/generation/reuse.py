"""Loaded models kept for the next run in the same process, inside `reuse_models`.

Each `toolkit.generate` call loads its model (and compiles it, with ``--compile``): a
fraction of a second for the shipped model, much more for a large one or a compile. Work
that generates several times from one model (synthesis rounds, a benchmark's repeats) wraps
the calls in ``with toolkit.reuse_models():``, and a run whose model, weights and load
settings equal the previous run's takes the loaded model (compiled network included)
instead. Outside the block nothing is kept, so no model holds memory (an accelerator's
above all) after the call that used it; leaving the block drops the kept one.

A kept model is taken only if nothing that shapes it differs: the folder (its files' sizes
and modification times), the family's model options and image size, the LoRAs (with their
hashes), the device, precision, memory options and speed levers. A run leaves the model as
it found it (text encoders come back on demand, guidance hooks and step caches are removed
when they end), so it is as good as a fresh load.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

_kept: dict[str, Any] | None = None  # None: not inside reuse_models
_keep = 1


@contextlib.contextmanager
def reuse_models(keep: int = 1) -> Iterator[None]:
    """Inside, a run takes a loaded model of an earlier run when it would load the same one
    (see the module docstring): the `keep` last used are kept (one by default; more for
    work that alternates between models or settings, memory permitting). Nested blocks
    share the outer one's."""
    global _kept, _keep
    if _kept is not None:
        yield
        return
    if keep < 1:
        raise ValueError(f"reuse_models keeps at least one model, not {keep}")
    _kept, _keep = {}, keep
    try:
        yield
    finally:
        _kept, _keep = None, 1


def loaded(key: Callable[[], dict[str, Any]], load: Callable[[], Any]) -> Any:
    """`load()`, or inside `reuse_models` the model kept under ``key()`` (asked only there:
    it reads the folder's files)."""
    if _kept is None:
        return load()
    text = json.dumps(key(), sort_keys=True, default=str)
    if text in _kept:
        _kept[text] = _kept.pop(text)  # the most recently used last
        return _kept[text]
    while len(_kept) >= _keep:  # before loading: never more than `keep` in memory
        _kept.pop(next(iter(_kept)))
    _kept[text] = load()
    return _kept[text]


def folder_state(path: pathlib.Path) -> list[tuple[str, int, int]]:
    """Every file under `path` with its size and modification time: a changed weight file
    is another model."""
    return [(str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns)
            for f in sorted(path.rglob("*")) if f.is_file()]  # fmt: skip
