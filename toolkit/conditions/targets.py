"""Target distributions over an attribute's values: what "fair" means for one audit or plan.

A target is written ``uniform`` (also ``balanced``: every value equally often) or as shares,
``light=0.5,dark=0.5``; values not named get share 0. The same spelling is used by
``dtk eval bias --target``, ``dtk synthesize --target`` and the ``fair`` guidance plugin.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from toolkit.errors import DtkError

UNIFORM = ("uniform", "balanced")


def target_distribution(
    spec: str | Mapping[str, float], values: Sequence[str], *, what: str = "target"
) -> dict[str, float]:
    """`spec` as shares over `values` (in their order), checked: known values, shares >= 0
    summing to 1 (within 0.01; then renormalised exactly)."""
    values = [str(v) for v in values]
    if not values:
        raise DtkError(f"{what}: the attribute has no values")
    if isinstance(spec, str):
        text = spec.strip()
        if text.lower() in UNIFORM:
            return {v: 1 / len(values) for v in values}
        shares = _parse_shares(text, what)
    else:
        shares = {str(k): v for k, v in spec.items()}
    unknown = [k for k in shares if k not in values]
    if unknown:
        raise DtkError(
            f"{what}: unknown value {unknown[0]!r}; the attribute's values: {', '.join(values)}"
        )
    try:
        numbers = {k: float(v) for k, v in shares.items()}
    except (TypeError, ValueError):
        raise DtkError(f"{what}: shares must be numbers, got {dict(shares)}") from None
    if any(not math.isfinite(x) or x < 0 for x in numbers.values()):
        raise DtkError(f"{what}: shares must be finite and >= 0, got {numbers}")
    total = sum(numbers.values())
    if abs(total - 1) > 0.01:
        raise DtkError(f"{what}: shares must sum to 1, got {total:g} ({spec})")
    return {v: numbers.get(v, 0.0) / total for v in values}


def _parse_shares(text: str, what: str) -> dict[str, str]:
    shares: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise DtkError(
                f"{what}: expected 'uniform' or VALUE=SHARE pairs like light=0.5,dark=0.5; "
                f"got {text!r}"
            )
        if key in shares:
            raise DtkError(f"{what}: value {key!r} given twice")
        shares[key] = value
    return shares


def quantile_draw(u: float, target: Mapping[str, float]) -> str:
    """The value whose cumulative-share interval holds `u` in [0, 1)."""
    cumulative = 0.0
    last = None
    for value, share in target.items():
        if share <= 0:
            continue
        cumulative += share
        last = value
        if u < cumulative:
            return value
    assert last is not None, "a target has at least one positive share"
    return last  # u within rounding of 1


#: 1/golden ratio: consecutive seeds give the best-spread fractional parts (a Weyl sequence)
_WEYL = (math.sqrt(5) - 1) / 2


def seeded_uniform(seed: int, salt: str = "") -> float:
    """A number in [0, 1) fixed by `seed`, spread as evenly as possible over consecutive seeds.

    ``frac(seed / golden ratio + offset)`` is a low-discrepancy sequence: over ``n``
    consecutive seeds every interval of [0, 1) receives its share of draws to within about
    ``log(n) / n``, so draws from a target distribution match it far more closely than
    independent random draws would (binomial error ``sqrt(p(1-p)/n)``), while each draw still
    depends only on its own seed. `salt` shifts the sequence, so that two attributes drawn for
    the same seeds are not locked together.
    """
    offset = 0.0
    for ch in salt:
        offset = (offset * 31 + ord(ch)) % 1009
    return (seed * _WEYL + offset * _WEYL / 1009) % 1.0
