"""The two standard fairness plots, rendered with Agg to PNG bytes for `evaluations.report`.

Figures are built from `matplotlib.figure.Figure` directly (never pyplot), under matplotlib's
default style, so the same input gives the same bytes whatever the caller's rcParams.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import matplotlib
import matplotlib.style
import numpy as np
import pandas
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import PercentFormatter

__all__ = ["accuracy_plot", "comparison_plot", "prompt_shares_plot", "shares_plot"]

SIZE = (6.0, 3.5)  # inches
DPI = 100
BAR = "#9ecae1"
EDGE = "#3182bd"
TARGET = "#d62728"
CORRECTED = "#2ca02c"
#: a suite plot names its prompts on the axis up to this many
NAMED_PROMPTS = 24
PALETTE = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3")
RC = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.grid.axis": "y",
    "grid.alpha": 0.35,
    "axes.axisbelow": True,
}


def _number(value: Any) -> float:
    """`value` as a float; None, NaN and non-numbers become NaN."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number


def _interval_bars(
    ax: Any, x: np.ndarray, means: np.ndarray, lows: np.ndarray, highs: np.ndarray, **style: Any
) -> bool:
    """Black error bars where the mean and both ends are known; whether any was drawn."""
    known = np.isfinite(means) & np.isfinite(lows) & np.isfinite(highs)
    if not known.any():
        return False
    # matplotlib wants distances from the mean; an interval not enclosing it still plots
    m, low, high = means[known], lows[known], highs[known]
    errors = np.clip(np.vstack([m - low, high - m]), 0.0, None)
    ax.errorbar(x[known], m, yerr=errors, fmt="none", ecolor="black", **style)
    return True


def _render(draw: Callable[[Figure], None]) -> bytes:
    with matplotlib.style.context("default"), matplotlib.rc_context(RC):
        fig = Figure(figsize=SIZE, dpi=DPI, layout="constrained")
        FigureCanvasAgg(fig)
        draw(fig)
        buffer = io.BytesIO()
        # no Software/timestamp metadata: identical inputs give identical files
        fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def _tick_labels(ax, labels: Sequence[str]) -> None:
    ax.set_xticks(range(len(labels)))
    crowded = len(labels) > 6 or sum(len(s) for s in labels) > 60
    if crowded:
        ax.set_xticklabels(labels, rotation=30, ha="right", rotation_mode="anchor")
    else:
        ax.set_xticklabels(labels)


def _no_data(ax) -> None:
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])


def shares_plot(
    groups: Mapping[str, Mapping[str, Any]],
    target: Mapping[str, float] | None,
    *,
    title: str = "",
    corrected: Mapping[str, float] | None = None,
) -> bytes:
    """Share per label as bars with 95% intervals, the target and corrected shares marked.

    `groups` maps each label to its ``share``, ``ci_low`` and ``ci_high``."""
    target = dict(target or {})
    corrected = dict(corrected or {})
    # a targeted label that never occurred is still a label, with share 0
    labels = [str(k) for k in groups] + [str(k) for k in target if k not in groups]
    stats = {str(k): v for k, v in groups.items()}
    shares = _Shares(
        labels,
        share=np.array([_number(stats.get(k, {}).get("share", 0.0)) for k in labels]),
        low=np.array([_number(stats.get(k, {}).get("ci_low")) for k in labels]),
        high=np.array([_number(stats.get(k, {}).get("ci_high")) for k in labels]),
        target=np.array([_number(target.get(k)) for k in labels]),
        corrected=np.array([_number(corrected.get(k)) for k in labels]),
    )

    def draw(fig: Figure) -> None:
        ax = fig.add_subplot()
        if title:
            ax.set_title(title)
        if not labels:
            _no_data(ax)
            return
        handles = shares.draw(ax)
        fig.legend(handles=handles, loc="outside right upper", fontsize=8, frameon=False)

    return _render(draw)


@dataclasses.dataclass
class _Shares:
    """A shares plot's numbers per label (NaN where unknown), and how each is drawn."""

    labels: list[str]
    share: np.ndarray
    low: np.ndarray
    high: np.ndarray
    target: np.ndarray
    corrected: np.ndarray

    def draw(self, ax: Any) -> list[Any]:
        """Bars, intervals, target and corrected marks; the legend's handles."""
        x = np.arange(len(self.labels), dtype=float)
        ax.bar(x, np.nan_to_num(self.share), width=0.6, color=BAR, edgecolor=EDGE, linewidth=0.8)
        handles: list[Any] = [Patch(facecolor=BAR, edgecolor=EDGE, label="share")]
        if _interval_bars(ax, x, self.share, self.low, self.high, elinewidth=1, capsize=4):
            handles.append(
                Line2D([], [], color="black", marker="|", markersize=8, label="95% interval")
            )
        has = np.isfinite(self.target)
        if has.any():
            ax.hlines(self.target[has], x[has] - 0.4, x[has] + 0.4, colors=TARGET,
                      linestyles="--", linewidth=1.8)  # fmt: skip
            handles.append(Line2D([], [], color=TARGET, linestyle="--", label="target"))
        has = np.isfinite(self.corrected)
        if has.any():
            ax.plot(x[has], self.corrected[has], linestyle="none", marker="D", markersize=6,
                    color=CORRECTED, markeredgecolor="white")  # fmt: skip
            handles.append(
                Line2D([], [], color=CORRECTED, marker="D", linestyle="none", label="corrected")
            )
        self.axes(ax)
        return handles

    def axes(self, ax: Any) -> None:
        """Room above the highest mark (at most 105%), percent ticks, the labels."""
        values = np.concatenate([self.share, self.high, self.target, self.corrected])
        top = np.nanmax(values[np.isfinite(values)], initial=0.0)
        ax.set_ylim(0.0, min(1.05, max(top * 1.15, top + 0.02, 0.1)))
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.set_ylabel("share")
        _tick_labels(ax, self.labels)
        ax.set_xlim(-0.6, len(self.labels) - 0.4)


def accuracy_plot(summary: pandas.DataFrame, *, groups: list[str], title: str = "") -> bytes:
    """Mean accuracy of each group under each method, as grouped bars with 95% intervals."""
    missing = [f"accuracy_{g}_mean" for g in groups if f"accuracy_{g}_mean" not in summary]
    if "method" not in summary:
        missing.insert(0, "method")
    if missing:
        raise ValueError(f"accuracy_plot: summary lacks column(s) {', '.join(missing)}")
    methods = [str(m) for m in summary["method"]]

    def draw(fig: Figure) -> None:
        ax = fig.add_subplot()
        if title:
            ax.set_title(title)
        if not methods or not groups:
            _no_data(ax)
            return
        _group_bars(ax, summary, groups)
        ax.set_ylim(0.0, 1.05)
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.set_ylabel("accuracy")
        _tick_labels(ax, methods)
        fig.legend(loc="outside right upper", fontsize=8, frameon=False, title="group",
                   title_fontsize=8)  # fmt: skip

    return _render(draw)


def _group_bars(ax: Any, summary: pandas.DataFrame, groups: list[str]) -> None:
    """Per method (a row of `summary`), one bar per group with its interval."""

    def column(name: str) -> np.ndarray:
        if name not in summary:
            return np.full(len(summary), math.nan)
        return np.array([_number(v) for v in summary[name]], dtype=float)

    x = np.arange(len(summary), dtype=float)
    width = 0.8 / len(groups)
    for i, group in enumerate(groups):
        mean = column(f"accuracy_{group}_mean")
        low, high = column(f"accuracy_{group}_ci_low"), column(f"accuracy_{group}_ci_high")
        at = x - 0.4 + width * (i + 0.5)
        color = PALETTE[i % len(PALETTE)]
        ax.bar(at, np.nan_to_num(mean), width=width * 0.92, color=color, label=str(group))
        _interval_bars(ax, at, mean, low, high, elinewidth=0.9, capsize=3)
        # an absent mean must not read as an accuracy of zero
        for where in at[~np.isfinite(mean)]:
            ax.text(where, 0.01, "n/a", ha="center", va="bottom", fontsize=7, color="0.4")


def _sorted_by(values: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """`values` as floats, and the order that sorts them (unknown ones last)."""
    numbers = np.array([_number(v) for v in values])
    return numbers, np.argsort(np.where(np.isfinite(numbers), numbers, np.inf), kind="stable")


def _titled_axes(fig: Figure, title: str, *, empty: bool) -> Any:
    """The figure's axes with its title; None (and "no data" drawn) when `empty`."""
    ax = fig.add_subplot()
    if title:
        ax.set_title(title)
    if empty:
        _no_data(ax)
        return None
    return ax


def _per_row_axes(ax: Any, names: list[str], *, target: float, label: str, sorted_by: str
                  ) -> None:  # fmt: skip
    """A share-per-row plot's frame: the target dashed, 0-100%, the rows named while there
    are at most `NAMED_PROMPTS`, else counted."""
    ax.axhline(target, color=TARGET, linestyle="--", linewidth=1.5, label="target")
    ax.set_ylim(-0.02, 1.02)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.set_ylabel(f"share {label}")
    if len(names) <= NAMED_PROMPTS:
        _tick_labels(ax, names)
    else:
        ax.set_xlabel(f"{len(names)} rows, by {sorted_by}")
        ax.set_xticks([])
    ax.set_xlim(-0.6, len(names) - 0.4)


def prompt_shares_plot(prompts: Sequence[str], shares: Sequence[Any], lows: Sequence[Any],
                       highs: Sequence[Any], *, target: float, label: str,
                       title: str = "") -> bytes:  # fmt: skip
    """One value's share in each prompt's images with its 95% interval, prompts sorted by
    that share, the target dashed: the spread of a suite's per-prompt skew at a glance."""
    share, order = _sorted_by(shares)
    low, high = np.array([_number(v) for v in lows]), np.array([_number(v) for v in highs])
    names = [str(prompts[i]) for i in order]

    def draw(fig: Figure) -> None:
        ax = _titled_axes(fig, title, empty=not names)
        if ax is None:
            return
        x = np.arange(len(names), dtype=float)
        ax.plot(x, share[order], linestyle="none", marker="o", markersize=4, color=EDGE,
                label="prompt")  # fmt: skip
        _interval_bars(ax, x, share[order], low[order], high[order], elinewidth=0.8, capsize=2)
        _per_row_axes(ax, names, target=target, label=label, sorted_by="share")
        handles, _ = ax.get_legend_handles_labels()
        interval = Line2D([], [], color="black", marker="|", markersize=8, label="95% interval")
        fig.legend(handles=[handles[0], interval, handles[1]], loc="outside right upper",
                   fontsize=8, frameon=False)  # fmt: skip

    return _render(draw)


def comparison_plot(rows: Sequence[str], shares_a: Sequence[Any], shares_b: Sequence[Any], *,
                    target: float, label: str, names: tuple[str, str],
                    title: str = "") -> bytes:  # fmt: skip
    """One value's share per row in audit A and in audit B, joined by a line, rows sorted by
    A's share, the target dashed: where a mitigation moved each prompt."""
    a, order = _sorted_by(shares_a)
    b = np.array([_number(v) for v in shares_b])
    rows_sorted = [str(rows[i]) for i in order]

    def draw(fig: Figure) -> None:
        ax = _titled_axes(fig, title, empty=not rows_sorted)
        if ax is None:
            return
        x = np.arange(len(order), dtype=float)
        ax.vlines(x, a[order], b[order], colors="0.6", linewidth=0.8)
        for values, name, color in ((a, names[0], PALETTE[0]), (b, names[1], PALETTE[1])):
            ax.plot(x, values[order], linestyle="none", marker="o", markersize=4, color=color,
                    label=name)  # fmt: skip
        _per_row_axes(ax, rows_sorted, target=target, label=label,
                      sorted_by=f"{names[0]}'s share")  # fmt: skip
        fig.legend(loc="outside right upper", fontsize=8, frameon=False)

    return _render(draw)
