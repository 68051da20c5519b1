"""Render a product: a class silhouette filled with a colour and pattern, scaled by size, on a background.

Shapes are primitives in unit coordinates (0..1), so one definition serves every resolution.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

from coral.catalog.vocab import BACKGROUNDS, COLOURS, SIZES

# (kind, args): poly [(x, y), ...] | rect/ellipse (x0, y0, x1, y1) | ring (box, width) | pie (box, start, end)
SHAPES: dict[str, list[tuple]] = {
    "backpack": [
        ("rect", (0.25, 0.25, 0.75, 0.95)),
        ("ring", ((0.37, 0.05, 0.63, 0.4), 0.05)),
        ("rect", (0.33, 0.6, 0.67, 0.88)),
    ],
    "handbag": [
        ("poly", [(0.2, 0.45), (0.8, 0.45), (0.95, 0.9), (0.05, 0.9)]),
        ("ring", ((0.3, 0.1, 0.7, 0.6), 0.06)),
    ],
    "shoe": [
        (
            "poly",
            [(0.05, 0.55), (0.45, 0.55), (0.55, 0.3), (0.72, 0.3), (0.95, 0.7), (0.95, 0.82), (0.05, 0.82)],
        )
    ],
    "hat": [("ellipse", (0.02, 0.6, 0.98, 0.8)), ("rect", (0.28, 0.25, 0.72, 0.7))],
    "tshirt": [
        (
            "poly",
            [
                (0.3, 0.1),
                (0.7, 0.1),
                (0.98, 0.3),
                (0.85, 0.45),
                (0.75, 0.38),
                (0.75, 0.95),
                (0.25, 0.95),
                (0.25, 0.38),
                (0.15, 0.45),
                (0.02, 0.3),
            ],
        )
    ],
    "mug": [("rect", (0.2, 0.25, 0.65, 0.9)), ("ring", ((0.5, 0.38, 0.88, 0.75), 0.07))],
    "bottle": [
        ("rect", (0.35, 0.35, 0.65, 0.97)),
        ("rect", (0.44, 0.05, 0.56, 0.36)),
        ("ellipse", (0.35, 0.25, 0.65, 0.45)),
    ],
    "lamp": [
        ("poly", [(0.3, 0.05), (0.7, 0.05), (0.9, 0.4), (0.1, 0.4)]),
        ("rect", (0.46, 0.4, 0.54, 0.88)),
        ("ellipse", (0.25, 0.82, 0.75, 0.97)),
    ],
    "chair": [
        ("rect", (0.25, 0.05, 0.35, 0.95)),
        ("rect", (0.25, 0.5, 0.8, 0.6)),
        ("rect", (0.7, 0.6, 0.8, 0.95)),
    ],
    "table": [
        ("rect", (0.02, 0.3, 0.98, 0.42)),
        ("rect", (0.1, 0.42, 0.2, 0.95)),
        ("rect", (0.8, 0.42, 0.9, 0.95)),
    ],
    "phone": [("rect", (0.32, 0.05, 0.68, 0.95))],
    "watch": [("rect", (0.38, 0.0, 0.62, 1.0)), ("ellipse", (0.22, 0.28, 0.78, 0.72))],
    "umbrella": [
        ("pie", ((0.02, 0.1, 0.98, 0.9), 180, 360)),
        ("rect", (0.47, 0.5, 0.53, 0.9)),
        ("ring", ((0.35, 0.82, 0.53, 0.98), 0.05)),
    ],
    "glasses": [
        ("ring", ((0.02, 0.35, 0.45, 0.7), 0.08)),
        ("ring", ((0.55, 0.35, 0.98, 0.7), 0.08)),
        ("rect", (0.43, 0.45, 0.57, 0.5)),
    ],
}


def _scale(
    point: tuple[float, float], scale: float, offset: tuple[float, float], px: int
) -> tuple[float, float]:
    x, y = point
    return ((0.5 + (x - 0.5) * scale + offset[0]) * px, (0.5 + (y - 0.5) * scale + offset[1]) * px)


def silhouette_mask(cls: str, px: int, scale: float, offset: tuple[float, float]) -> Image.Image:
    mask = Image.new("L", (px, px), 0)
    draw = ImageDraw.Draw(mask)
    for kind, args in SHAPES[cls]:
        if kind == "poly":
            draw.polygon([_scale(p, scale, offset, px) for p in args], fill=255)
        elif kind in ("rect", "ellipse"):
            (x0, y0), (x1, y1) = _scale(args[:2], scale, offset, px), _scale(args[2:], scale, offset, px)
            (draw.rectangle if kind == "rect" else draw.ellipse)((x0, y0, x1, y1), fill=255)
        elif kind == "ring":
            box, width = args
            (x0, y0), (x1, y1) = _scale(box[:2], scale, offset, px), _scale(box[2:], scale, offset, px)
            draw.ellipse((x0, y0, x1, y1), outline=255, width=max(1, round(width * scale * px)))
        elif kind == "pie":
            box, start, end = args
            (x0, y0), (x1, y1) = _scale(box[:2], scale, offset, px), _scale(box[2:], scale, offset, px)
            draw.pieslice((x0, y0, x1, y1), start, end, fill=255)
    return mask


def pattern_fill(pattern: str, rgb: tuple[int, int, int], px: int) -> np.ndarray:
    """(px, px, 3) uint8: the colour, with the pattern drawn in a contrasting shade."""
    base = np.array(rgb, dtype=np.float32)
    alt = base * 0.45 if base.mean() > 90 else base + (255 - base) * 0.6
    yy, xx = np.mgrid[0:px, 0:px]
    period = max(4, px // 8)
    if pattern == "solid":
        on = np.zeros((px, px), bool)
    elif pattern == "striped":
        on = (xx + yy) % period < period // 2
    elif pattern == "dotted":
        c = period / 2
        on = ((xx % period - c) ** 2 + (yy % period - c) ** 2) < (period / 4) ** 2
    elif pattern == "checked":
        on = ((xx // (period // 2 + 1)) + (yy // (period // 2 + 1))) % 2 == 0
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    out = np.where(on[..., None], alt, base)
    return out.clip(0, 255).astype(np.uint8)


def render(cls: str, attributes: dict, px: int, offset: tuple[float, float] = (0.0, 0.0)) -> Image.Image:
    background = Image.new("RGB", (px, px), BACKGROUNDS[attributes["background"]])
    fill = Image.fromarray(pattern_fill(attributes["pattern"], COLOURS[attributes["colour"]][0], px))
    mask = silhouette_mask(cls, px, SIZES[attributes["size"]][0], offset)
    return Image.composite(fill, background, mask)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()
