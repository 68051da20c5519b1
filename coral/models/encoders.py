"""Encoders: images or texts in, float32 L2-normalised embeddings out.

A registry maps an encoder kind to its class, the input it reads and the model types it accepts. The
embed stage's Ray Data actors and the in-process baselines run the same classes.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from coral.config import EncoderConfig
from coral.models import loader


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


def _normalise(x: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(x.float(), dim=-1).cpu().numpy().astype(np.float32)


class _Base:
    modality = "image"

    def __init__(self, cfg: EncoderConfig):
        self.cfg = cfg
        self.device = loader.pick_device(cfg.device)
        self.model = loader.load_model(cfg.model, self.device, cfg.dtype)
        self.processor = loader.load_processor(cfg.model)

    def _pixels(self, images: list[Image.Image]) -> torch.Tensor:
        ip = getattr(self.processor, "image_processor", self.processor)
        pixels = ip(images=images, return_tensors="pt")["pixel_values"]
        return pixels.to(self.device, dtype=self.model.dtype)

    def _tokens(self, texts: list[str]) -> dict:
        tok = getattr(self.processor, "tokenizer", self.processor)
        batch = tok(texts, padding=True, truncation=True, return_tensors="pt")
        return {k: v.to(self.device) for k, v in batch.items()}


class ClipImage(_Base):
    """CLIP / SigLIP image tower: the projected image embedding."""

    @torch.inference_mode()
    def encode(self, images: list[Image.Image]) -> np.ndarray:
        return _normalise(self.model.get_image_features(pixel_values=self._pixels(images)).pooler_output)


class ClipText(_Base):
    """CLIP / SigLIP text tower: the projected text embedding (MegaPairs' caption similarity)."""

    modality = "text"

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> np.ndarray:
        t = self._tokens(texts)
        out = self.model.get_text_features(input_ids=t["input_ids"], attention_mask=t.get("attention_mask"))
        return _normalise(out.pooler_output)


class Dinov2(_Base):
    """DINOv2: the CLS token (``pooling: cls``) or the mean of the patch tokens (``pooling: mean``)."""

    @torch.inference_mode()
    def encode(self, images: list[Image.Image]) -> np.ndarray:
        out = self.model(pixel_values=self._pixels(images))
        if self.cfg.pooling == "cls":
            return _normalise(out.pooler_output)  # (B, H)
        return _normalise(out.last_hidden_state[:, 1:].mean(dim=1))  # (B, T, H) -> (B, H)


class SentenceTransformer(_Base):
    """A sentence-transformers model dir (or hub id) run with plain transformers: the encoder, then the
    pooling its ``1_Pooling/config.json`` names (mean, cls or max), then L2 normalisation."""

    modality = "text"

    def __init__(self, cfg: EncoderConfig):
        self.cfg = cfg
        self.device = loader.pick_device(cfg.device)
        self.model = loader.load_model(cfg.model, self.device, cfg.dtype, generic=True)
        self.processor = loader.load_tokenizer(cfg.model)
        self.pooling = sentence_transformers_pooling(loader.resolve(cfg.model))

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> np.ndarray:
        t = self._tokens(texts)
        hidden = self.model(**t).last_hidden_state  # (B, T, H)
        mask = t["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.pooling == "max":
            pooled = hidden.masked_fill(mask == 0, float("-inf")).max(dim=1).values
        else:
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        return _normalise(pooled)


def sentence_transformers_pooling(src: str) -> str:
    """The pooling mode a sentence-transformers dir declares (mean when it declares none)."""
    cfg_file = Path(src) / "1_Pooling" / "config.json"
    if not cfg_file.exists():
        return "mean"
    cfg = json.loads(cfg_file.read_text())
    for mode in ("cls", "max", "mean"):
        if cfg.get(f"pooling_mode_{mode}_token" if mode == "cls" else f"pooling_mode_{mode}_tokens"):
            return mode
    return "mean"


# kind -> (class, accepted config.json model types; None = any text encoder transformers can load)
ENCODERS: dict[str, tuple[type, tuple[str, ...] | None]] = {
    "clip_image": (ClipImage, ("clip", "siglip")),
    "clip_text": (ClipText, ("clip", "siglip")),
    "dinov2": (Dinov2, ("dinov2",)),
    "sentence_transformers": (SentenceTransformer, None),
}


def modality(kind: str) -> str:
    return ENCODERS[kind][0].modality


def build(cfg: EncoderConfig):
    return ENCODERS[cfg.kind][0](cfg)
