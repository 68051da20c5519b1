"""The mine stage's figures (PNG under ``mine/stats/``): each encoder's similarity histogram with its band,
and the pairs each encoder found. Drawn with matplotlib through ``coral.report``'s helpers."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from coral import report

if TYPE_CHECKING:
    from matplotlib.figure import Figure

LOG_RATIO = 100  # the count axis turns logarithmic when its fullest bin holds this many times its emptiest


def histogram(
    values: np.ndarray, bins: int = 40, lo: float = -1.0, hi: float = 1.0
) -> tuple[list[int], list[float]]:
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    return counts.tolist(), [round(float(e), 4) for e in edges]


def histogram_figure(
    counts: list[int], edges: list[float], band: tuple[float, float], title: str, in_band: int | None = None
) -> Figure:
    """The similarity of every query to its top-k neighbours as a histogram, the band shaded between its
    bounds (``in_band``: the pairs found inside it, in the legend)."""
    fig = report.figure()
    ax = fig.add_subplot()
    ax.stairs(counts, edges, fill=True, alpha=0.8, label=f"neighbours ({sum(counts)})")
    lo, hi = band
    pairs = f", {in_band} pairs" if in_band is not None else ""
    ax.axvspan(lo, hi, color="tab:red", alpha=0.12, label=f"band {lo:g}–{hi:g}{pairs}")
    for bound in band:
        ax.axvline(bound, color="tab:red", linewidth=1.5)
    ax.set_xlim(edges[0], edges[-1])
    some = [c for c in counts if c > 0]
    log = bool(some) and max(some) > LOG_RATIO * min(some)
    if log:  # a few neighbours in the band beside thousands above it: both visible
        ax.set_yscale("log")
        ax.set_ylim(0.5, max(some) * 2)  # a bin of one neighbour shows
    ax.set_xlabel("cosine similarity to a top-k neighbour")
    ax.set_ylabel("neighbours (log scale)" if log else "neighbours")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(loc="upper left", fontsize=9)
    return fig


def histogram_png(
    counts: list[int], edges: list[float], band: tuple[float, float], title: str, in_band: int | None = None
) -> bytes:
    return report.png(histogram_figure(counts, edges, band, title, in_band))


def pairs_figure(splits: dict[str, dict], overlap: dict[str, int]) -> Figure:
    """Left: the pairs inside each encoder's band, per split (``splits``: the mine stage's statistics per
    split). Right: the kept pairs (after the cap per query) by the encoders that found them."""
    mined = {s: v for s, v in splits.items() if "encoders" in v}
    encoders = sorted({e for v in mined.values() for e in v["encoders"]})
    fig = report.figure(width=9.6)
    left, right = fig.subplots(1, 2, width_ratios=[1, 1])
    x = np.arange(len(encoders))
    width = 0.8 / max(1, len(mined))
    for i, (split, v) in enumerate(mined.items()):
        found = [v["encoders"].get(e, {}).get("pairs_in_band", 0) for e in encoders]
        bars = left.bar(x - 0.4 + width * (i + 0.5), found, width, label=split)
        left.bar_label(bars, fontsize=8, padding=2)
    left.set_xticks(x, [report.short(e) for e in encoders])
    left.set_xlabel("encoder")
    left.set_ylabel("pairs inside the band")
    left.set_title("pairs each encoder found", fontsize=11)
    left.margins(y=0.12)
    if mined:
        left.legend(title="split", fontsize=9)
    combos = sorted(overlap, key=lambda c: overlap[c])
    bars = right.barh(range(len(combos)), [overlap[c] for c in combos], color="tab:green")
    right.bar_label(bars, fontsize=8, padding=2)
    right.set_yticks(range(len(combos)), [c.replace("+", " + ") for c in combos], fontsize=8)
    right.set_xlabel("kept pairs")
    right.set_ylabel("found by")
    right.set_title("encoders behind the kept pairs", fontsize=11)
    right.margins(x=0.15)
    if not combos:
        right.text(0.5, 0.5, "no pair kept", ha="center", va="center", transform=right.transAxes)
    for ax in (left, right):
        ax.grid(axis="y" if ax is left else "x", alpha=0.3)
        ax.set_axisbelow(True)
    return fig


def pairs_png(splits: dict[str, dict], overlap: dict[str, int]) -> bytes:
    return report.png(pairs_figure(splits, overlap))
