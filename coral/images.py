"""Image bytes to RGB, with a reason for everything that cannot be used.

Kept free of torch and transformers so that Ray tasks which only validate images start fast.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def decode_image(data: bytes, max_pixels: int = 50_000_000) -> Image.Image:
    """Image bytes -> RGB. Raises ValueError with a short reason for empty, corrupt, truncated or oversized
    input. Alpha is composited on white; 16-bit and float images are rescaled to 8 bits."""
    if not data:
        raise ValueError("empty file")
    try:
        img = Image.open(io.BytesIO(data))
    except Exception as e:  # PIL raises several types for corrupt headers
        raise ValueError(f"undecodable image: {type(e).__name__}") from None
    w, h = img.size
    if w * h > max_pixels:
        raise ValueError(f"image too large: {w}x{h} pixels > max_image_pixels {max_pixels}")
    try:
        img.load()
    except Exception as e:  # truncated data and decoder errors surface here
        raise ValueError(f"undecodable image: {type(e).__name__}: {str(e)[:80]}") from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = arr.max() if arr.max() > 0 else 1.0
        img = Image.fromarray(np.rint(arr * (255.0 / top)).clip(0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        canvas = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(canvas, img)
    return img.convert("RGB")
