"""Built-in safety filters: ``nonfinite`` (image stage) and ``blocklist`` (request stage)."""

from __future__ import annotations

import pathlib
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import toolkit
from toolkit import OptionError, SampleRequest, Verdict

if TYPE_CHECKING:
    import torch


class NonFinite:
    """Flags images holding NaN or Inf, and constant images (a collapsed sample).

    The score is the image's pixel standard deviation (NaN for a non-finite image).
    """

    name = "nonfinite"

    def __init__(self, min_std: float = 1e-4) -> None:
        self.min_std = min_std

    def __call__(self, images: torch.Tensor, requests: Sequence[SampleRequest]) -> list[Verdict]:
        verdicts = []
        for image in images:
            if not bool(image.isfinite().all()):
                verdicts.append(Verdict(True, "non-finite pixels", float("nan")))
                continue
            std = float(image.float().std())
            if std < self.min_std:
                verdicts.append(Verdict(True, "constant image", std))
            else:
                verdicts.append(Verdict(False, "", std))
        return verdicts


class Blocklist:
    """Refuses requests whose conditions or prompt contain a blocked word or phrase.

    Words come from `words` (comma-separated on the command line) and/or `file` (one per
    line, ``#`` comments). Matching is case-insensitive, on whole words.
    """

    name = "blocklist"
    stage = "request"

    def __init__(self, words: list[str] | None = None, file: pathlib.Path | None = None) -> None:
        entries = [w.strip() for w in (words or []) if w.strip()]
        if file is not None:
            try:
                lines = pathlib.Path(file).read_text().splitlines()
            except OSError as exc:
                raise OptionError(f"blocklist: cannot read {file}: {exc.strerror}") from None
            entries += [ln.split("#", 1)[0].strip() for ln in lines]
        entries = [e for e in entries if e]
        if not entries:
            raise OptionError("blocklist: give words=a,b,c or file=PATH with at least one entry")
        self.entries = entries
        pattern = "|".join(re.escape(e) for e in sorted(entries, key=len, reverse=True))
        self._pattern = re.compile(rf"(?<!\w)(?:{pattern})(?!\w)", re.IGNORECASE)

    def __call__(self, requests: Sequence[SampleRequest]) -> list[Verdict]:
        verdicts = []
        for request in requests:
            match = self._pattern.search(request.text())
            if match:
                verdicts.append(Verdict(True, f"blocked term {match.group(0)!r}", 1.0))
            else:
                verdicts.append(Verdict(False, "", 0.0))
        return verdicts


@toolkit.hookimpl
def register_safety_filters(register: toolkit.Register) -> None:
    register(NonFinite)
    register(Blocklist)
