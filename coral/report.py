"""What a person reads: figures drawn with matplotlib (its Agg renderer, no pyplot: no global state, no
display, safe in Ray workers and threads) rendered to PNG, and tables for a terminal or Markdown.

Each plot is a ``*_figure`` function that returns the matplotlib ``Figure`` (tests read its axes, labels
and legend) and ``png`` renders one; the evaluation report's figures live here, the mining and training
ones next to their data (``coral.mining.plots``, ``coral.train.curves``) on the same helpers.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

WIDTH, HEIGHT, DPI = 6.4, 4.0, 100  # inches, inches, dots per inch: 640 x 400 pixels
MAX_LABEL = 18  # characters of a category name on an axis
MAX_UPRIGHT = 16  # categories drawn as upright bars; more lie down (one row each)
MAX_VALUE_LABELS = 24  # bars labelled with their value; more are left to the report's table


def figure(width: float = WIDTH, height: float = HEIGHT) -> Figure:
    """An empty figure with the constrained layout (labels, legends and titles never overlap)."""
    from matplotlib.figure import Figure  # heavy: imported when a figure is drawn, not with coral

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def png(fig: Figure) -> bytes:
    """The figure as PNG bytes, drawn by the Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def short(name: object) -> str:
    """A category's name on an axis: at most ``MAX_LABEL`` characters; an empty one as ``(none)``."""
    text = str(name) or "(none)"
    return text if len(text) <= MAX_LABEL else text[: MAX_LABEL - 1] + "…"


def bars_figure(
    categories: list[str],
    series: dict[str, list[float]],
    title: str,
    top: float | None = None,
    xlabel: str = "",
    ylabel: str = "",
    counts: list[int] | None = None,
) -> Figure:
    """One group of bars per category, one bar per series (a legend when several), each bar labelled
    with its value while they fit; over ``MAX_UPRIGHT`` categories the bars lie down, one row each.
    ``top``: the value axis' upper limit (1.0 for a metric); ``counts``: each category's number of
    queries, after its name."""
    n, k = max(1, len(series)), len(categories)
    names = [short(c) for c in categories]
    if counts is not None:
        names = [f"{c} (n={q})" for c, q in zip(names, counts, strict=True)]
    upright = k <= MAX_UPRIGHT
    if upright:
        fig = figure(width=max(WIDTH, min(12.0, 1.0 + 0.3 * k * n)))
    else:
        fig = figure(height=max(HEIGHT, min(16.0, 1.2 + 0.18 * k * n)))
    ax = fig.add_subplot()
    at = np.arange(k)
    size = 0.8 / n
    for s, (name, values) in enumerate(series.items()):
        where = at - 0.4 + size * (s + 0.5)
        bars = (
            ax.bar(where, values, size, label=name) if upright else ax.barh(where, values, size, label=name)
        )
        if k * n <= MAX_VALUE_LABELS:
            ax.bar_label(bars, fmt="{:.2f}" if top == 1.0 else "{:g}", fontsize=8, padding=2)
    peak = (top or max([v for values in series.values() for v in values] + [1e-9])) * 1.1
    if upright:
        ax.set_xticks(at, names)
        fits = k * (0.075 * max(map(len, names), default=1) + 0.15) < fig.get_figwidth() - 1.2
        if not fits:
            ax.tick_params(axis="x", labelrotation=30)
            for label in ax.get_xticklabels():
                label.set_horizontalalignment("right")
        ax.set_ylim(0, peak)  # room over the tallest bar for its label
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    else:
        ax.set_yticks(at, names, fontsize=8)
        ax.set_ylim(k - 0.5, -0.5)  # the first category on top
        ax.set_xlim(0, peak)
        ax.set_ylabel(xlabel)
        ax.set_xlabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y" if upright else "x", alpha=0.3)
    ax.set_axisbelow(True)
    if len(series) > 1:  # beside the plot: never over a bar
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
    return fig


def bars_png(
    categories: list[str], series: dict[str, list[float]], title: str, top: float | None = None, **labels
) -> bytes:
    return png(bars_figure(categories, series, title, top, **labels))


def ranks_figure(ranks: dict[str, list[int]], cutoff: int = 10) -> Figure:
    """How many queries found their best positive at each rank 1..``cutoff``, and how many missed
    (-1: not in the top ``cutoff``), per model."""
    bins = range(1, cutoff + 1)
    series = {
        m: [float(sum(1 for r in rr if r == b)) for b in bins]
        + [float(sum(1 for r in rr if not 0 < r <= cutoff))]
        for m, rr in ranks.items()
    }
    return bars_figure(
        [*map(str, bins), "miss"],
        series,
        "rank of the best positive",
        xlabel=f"rank of the best positive (miss: not in the top {cutoff})",
        ylabel="queries",
    )


def recall_figure(ranks: dict[str, list[int]], cutoff: int = 10) -> Figure:
    """Recall@k for k = 1..``cutoff`` per model (ranks: each query's rank of its best positive, -1 beyond
    the cutoff): the share of queries whose positive is in the top k."""
    fig = figure()
    ax = fig.add_subplot()
    ks = list(range(1, cutoff + 1))
    for model, rr in ranks.items():
        n = max(1, len(rr))
        ax.plot(
            ks, [sum(1 for r in rr if 0 < r <= k) / n for k in ks], marker="o", label=f"{model} ({n} queries)"
        )
    ax.set_xticks(ks)
    ax.set_xlim(0.5, cutoff + 0.5)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("k (candidates looked at)")
    ax.set_ylabel("Recall@k (share of queries)")
    ax.set_title("Recall@k of the held-out queries")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    return fig


def cell(v) -> str:
    """A table cell: floats to three decimals (metrics), anything else as its str."""
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def gib(n: int | float) -> str:
    """Bytes for a person: ``1.25 GiB``, or ``310 MiB`` under one GiB."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def text_table(header: list[str], rows: list[list], left: int = 1) -> str:
    """A fixed-width table for a terminal: the first ``left`` columns left-aligned, the rest right-aligned
    (numbers), a rule under the header."""
    body = [[cell(v) for v in r] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *body, strict=True)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, body)])


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
