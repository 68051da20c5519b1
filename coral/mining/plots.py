"""Similarity histograms as PNG (drawn with PIL: no plotting library needed on workers or laptops)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw


def histogram(
    values: np.ndarray, bins: int = 40, lo: float = -1.0, hi: float = 1.0
) -> tuple[list[int], list[float]]:
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    return counts.tolist(), [round(float(e), 4) for e in edges]


def histogram_png(counts: list[int], edges: list[float], band: tuple[float, float], title: str) -> bytes:
    """Bars for ``counts``; the band's bounds as red lines; axis labels at both ends."""
    w, h, pad = 640, 360, 40
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    top = max(max(counts), 1)
    lo, hi = edges[0], edges[-1]
    x_of = lambda v: pad + (v - lo) / (hi - lo) * (w - 2 * pad)  # noqa: E731
    for c, a, b in zip(counts, edges[:-1], edges[1:], strict=True):
        y = h - pad - c / top * (h - 2 * pad)
        draw.rectangle((x_of(a) + 1, y, x_of(b) - 1, h - pad), fill=(70, 110, 190))
    for v in band:
        draw.line((x_of(v), pad, x_of(v), h - pad), fill=(210, 40, 40), width=2)
    draw.line((pad, h - pad, w - pad, h - pad), fill="black")
    draw.text((pad, 10), f"{title}  (max bin {top}; red: band {band[0]}..{band[1]})", fill="black")
    draw.text((pad - 10, h - pad + 8), f"{lo:g}", fill="black")
    draw.text((w - pad - 10, h - pad + 8), f"{hi:g}", fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
