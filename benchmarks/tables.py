"""Markdown tables for the benchmarks' printouts (pandas' to_markdown needs `tabulate`)."""

from __future__ import annotations

import pandas


def markdown(frame: pandas.DataFrame) -> str:
    """`frame` as a markdown table, floats to three decimals."""

    def cell(value: object) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |",
             "|" + "---|" * len(frame.columns)]  # fmt: skip
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(False)]
    return "\n".join(lines)
