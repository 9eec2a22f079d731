"""Safety-filter plumbing: verdicts, requests, and running filters fail-closed.

A filter that raises aborts the run: a safety check that silently stops checking is worse
than no run at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from toolkit.errors import DtkError
from toolkit.registry.protocols import SampleRequest, Verdict, optional

if TYPE_CHECKING:
    import torch

ON_FLAG = ("drop", "blank", "tag")


def is_request_stage(flt: Any) -> bool:
    return optional("safety_filter", flt, "stage") == "request"


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
