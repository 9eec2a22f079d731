"""Per-sample prompts from a CSV file (``dtk generate --prompts-file``).

Columns: ``prompt`` (required), ``count`` (samples of that row, default 1) and
``negative_prompt`` (optional). Rows expand in file order, so sample indices, and with them
seeds, follow the file.
"""

from __future__ import annotations

import csv
import pathlib

from toolkit.errors import DtkError


def read_prompts_file(path: str | pathlib.Path) -> tuple[list[str], list[str] | None]:
    """(prompts, negative prompts or None) with one entry per sample."""
    path = pathlib.Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            rows = list(reader)
    except OSError as exc:
        raise DtkError(f"cannot read prompts file {path}: {exc.strerror}") from None
    except (csv.Error, UnicodeDecodeError) as exc:
        raise DtkError(f"prompts file {path}: not a readable CSV file: {exc}") from None
    if "prompt" not in columns:
        raise DtkError(f"prompts file {path}: needs a 'prompt' column (got {columns})")
    unknown = set(columns) - {"prompt", "count", "negative_prompt"}
    if unknown:
        raise DtkError(
            f"prompts file {path}: unknown columns {sorted(unknown)}; "
            "accepted: prompt, count, negative_prompt"
        )
    prompts: list[str] = []
    negatives: list[str] = []
    for line, row in enumerate(rows, start=2):
        text = (row.get("count") or "1").strip()
        try:
            count = int(text)
        except ValueError:
            count = -1
        if count < 1:
            raise DtkError(f"{path}:{line}: count must be a whole number >= 1, got {text!r}")
        prompts += [row["prompt"] or ""] * count
        negatives += [row.get("negative_prompt") or ""] * count
    if not prompts:
        raise DtkError(f"prompts file {path} has no prompts")
    return prompts, negatives if "negative_prompt" in columns else None
