"""The evaluation report: grouped bar charts as PNG (drawn with PIL, no plotting library) and Markdown."""

from __future__ import annotations

import io

from PIL import Image, ImageDraw

COLOURS = [(70, 110, 190), (220, 130, 40), (90, 160, 90), (170, 70, 150)]


def bars_png(
    categories: list[str], series: dict[str, list[float]], title: str, top: float | None = None
) -> bytes:
    """One group of bars per category, one bar per series (legend at the top); values label the bars."""
    w = max(640, 60 + len(categories) * (18 * len(series) + 24))
    h, pad, bottom = 380, 40, 70
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    top = top or max([v for vals in series.values() for v in vals] + [1e-9])
    group = (w - 2 * pad) / max(1, len(categories))
    bar = min(24.0, (group - 8) / max(1, len(series)))
    for s, (name, values) in enumerate(series.items()):
        colour = COLOURS[s % len(COLOURS)]
        draw.rectangle((pad + s * 140, 24, pad + s * 140 + 10, 34), fill=colour)
        draw.text((pad + s * 140 + 14, 23), name, fill="black")
        for c, v in enumerate(values):
            x = pad + c * group + 4 + s * bar
            y = h - bottom - (v / top) * (h - bottom - 50)
            draw.rectangle((x, y, x + bar - 2, h - bottom), fill=colour)
            draw.text((x, y - 12), f"{v:.2f}", fill="black")
    draw.line((pad, h - bottom, w - pad, h - bottom), fill="black")
    for c, name in enumerate(categories):
        draw.text((pad + c * group + 4, h - bottom + 6 + (c % 2) * 14), str(name)[:16], fill="black")
    draw.text((pad, 6), title, fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def cell(v) -> str:
    """A table cell: floats to three decimals (metrics), anything else as its str."""
    return f"{v:.3f}" if isinstance(v, float) else str(v)


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
