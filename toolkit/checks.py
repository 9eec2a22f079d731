"""Checks of user input shared by every command, each raising one clear `DtkError` line.

They run before anything is loaded or written, so a mistake costs nothing but the message.
"""

from __future__ import annotations

import math
import os
import pathlib
from typing import Any

from toolkit.errors import DtkError

#: torch.Generator.manual_seed takes seeds in [0, 2**64); sample i of a run uses seed + i
MAX_SEED = 2**64 - 1


def check_positive(name: str, value: Any) -> None:
    """`value` is a whole number >= 1 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DtkError(f"{name} must be a whole number >= 1, got {value!r}")


def check_seed(seed: Any, n: int = 1, *, what: str = "seed") -> None:
    """`seed` .. `seed + n - 1` are all seeds a torch generator takes (0 .. 2**64 - 1)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DtkError(f"{what} must be a whole number >= 0, got {seed!r}")
    if seed > MAX_SEED:
        raise DtkError(f"{what} {seed} is too large: seeds stop at 2**64 - 1 = {MAX_SEED}")
    if seed + max(n, 1) - 1 > MAX_SEED:
        raise DtkError(
            f"{what} {seed} is too large: sample i uses seed + i, and seeds stop at "
            f"2**64 - 1 = {MAX_SEED} (with n={n}, the seed can be at most {MAX_SEED - n + 1})"
        )


def check_fraction(name: str, value: Any, *, low: float = 0.0, high: float = 1.0,
                   open_low: bool = False, open_high: bool = False) -> None:  # fmt: skip
    """`value` is a finite number in the interval from `low` to `high` (ends open or closed).

    ``high=math.inf`` leaves it unbounded above (a rate, a duration, a distance): the message
    then reads "a finite number > 0" rather than an interval that seems to admit infinity.
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if open_low else value >= low) and (
            value < high if open_high else value <= high
        )
    if not ok and math.isinf(high):
        bound = f"{'>' if open_low else '>='} {low:g}"
        raise DtkError(f"{name} must be a finite number {bound}, got {value!r}")
    if not ok:
        left, right = "(" if open_low else "[", ")" if open_high else "]"
        raise DtkError(f"{name} must be in {left}{low:g}, {high:g}{right}, got {value!r}")


def check_writable(out: pathlib.Path, what: str = "--out") -> None:
    """Fail early, before any compute, if the folder `out` cannot be created or written."""
    if out.exists() and not out.is_dir():
        raise DtkError(f"{what} {out} exists and is not a folder")
    probe_parent = out if out.exists() else next((p for p in out.parents if p.exists()), None)
    if (
        probe_parent is None
        or not probe_parent.is_dir()
        or not os.access(probe_parent, os.W_OK | os.X_OK)
    ):
        raise DtkError(f"{what} {out} is not writable")
