"""Paths the toolkit derives from data, made safe: every file it writes stays inside its
output folder, whatever a model folder's label values, a prompt or a condition say.

Two layers, because either alone has failed before: `safe_name` turns any text into one
harmless path component (no separators, no ``.``/``..``, not empty, not hidden), and
`inside` checks the final path against the folder after resolving it, so a name that
slipped through (or a symlink planted in the folder) is refused instead of followed.
"""

from __future__ import annotations

import pathlib

from toolkit.errors import DtkError

#: characters kept as they are in a derived file or folder name; anything else becomes "-"
_KEPT = frozenset("-_.=")


def safe_name(text: str, *, limit: int | None = None, fallback: str = "_") -> str:
    """`text` as one path component that cannot leave or hide in its folder.

    Characters other than letters, digits and ``-_.=`` become ``-``; leading dots become
    ``_`` (so ``.``, ``..`` and ``.hidden`` are ordinary visible names); an empty result is
    `fallback`. `limit` cuts long names (before the checks, so a cut cannot undo them).
    """
    name = "".join(c if c.isalnum() or c in _KEPT else "-" for c in str(text))
    if limit is not None:
        name = name[:limit]
    stripped = name.lstrip(".")
    name = "_" * (len(name) - len(stripped)) + stripped
    return name or fallback


def inside(root: str | pathlib.Path, relative: str | pathlib.Path) -> pathlib.Path:
    """``root / relative``, refused unless it lies strictly inside `root` once resolved."""
    root = pathlib.Path(root)
    relative = pathlib.PurePath(relative)
    if relative.is_absolute() or not relative.parts or ".." in relative.parts:
        raise DtkError(f"{str(relative)!r} is not a path inside {root}")
    path = root / relative
    base = root.resolve()
    if not path.resolve().is_relative_to(base) or path.resolve() == base:
        raise DtkError(f"{path} resolves outside {root}")
    return path
