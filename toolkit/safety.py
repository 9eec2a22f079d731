"""Safety-filter plumbing: verdicts, requests, and running filters fail-closed.

A filter that raises aborts the run: a safety check that silently stops checking is worse
than no run at all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from toolkit.errors import DtkError

if TYPE_CHECKING:
    import torch

ON_FLAG = ("drop", "blank", "tag")


@dataclasses.dataclass(frozen=True)
class Verdict:
    """A filter's judgement of one image or request."""

    flagged: bool
    reason: str = ""
    score: float | None = None


@dataclasses.dataclass(frozen=True)
class SampleRequest:
    """What was asked for one sample: its index, seed and conditions (or prompt, with the
    negative prompt that guidance steers away from)."""

    index: int
    seed: int
    conditions: Mapping[str, str]
    prompt: str | None = None
    negative_prompt: str | None = None

    def text(self) -> str:
        """The request as text, for filters that match words."""
        parts = [f"{k}={v}" for k, v in self.conditions.items()]
        if self.prompt:
            parts.append(self.prompt)
        return " ".join(parts)


def is_request_stage(flt: Any) -> bool:
    return getattr(flt, "stage", "image") == "request"


def run_filter(
    name: str, flt: Any, images: torch.Tensor | None, requests: Sequence[SampleRequest]
) -> list[Verdict]:
    """Call one filter; any failure or malformed answer aborts the run (fail closed)."""
    try:
        verdicts = list(flt(requests) if images is None else flt(images, requests))
    except DtkError:
        raise
    except Exception as exc:
        raise DtkError(
            f"safety filter {name!r} failed ({type(exc).__name__}: {exc}); aborting, "
            "since safety filters fail closed"
        ) from exc
    if len(verdicts) != len(requests) or not all(isinstance(v, Verdict) for v in verdicts):
        raise DtkError(
            f"safety filter {name!r} returned {len(verdicts)} answers for {len(requests)} "
            "samples (expected one Verdict each); aborting, since safety filters fail closed"
        )
    return verdicts
