"""Image encoders: images in, float32 L2-normalised embeddings out.

Used by the embed stage's Ray Data actors and by in-process baselines, so both run the same code.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from coral.config import EncoderConfig
from coral.models import loader

# encoder kind -> the model types (config.json "model_type") it can run
ENCODER_MODEL_TYPES = {"clip_image": ("clip",), "dinov2": ("dinov2",)}


def decode_image(data: bytes) -> Image.Image:
    """PNG/JPEG bytes -> RGB image; raises ValueError with the decoder's reason on bad bytes."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # PIL raises several types for corrupt input
        raise ValueError(f"undecodable image: {type(e).__name__}") from None
    return img.convert("RGB")


class ImageEncoder:
    """Loads the model once; ``encode(images)`` returns (B, D) float32 with unit rows."""

    def __init__(self, cfg: EncoderConfig):
        self.cfg = cfg
        self.device = loader.pick_device(cfg.device)
        self.model = loader.load_model(cfg.model, self.device, cfg.dtype)
        proc = loader.load_processor(cfg.model)
        self.image_processor = getattr(proc, "image_processor", proc)

    @torch.inference_mode()
    def encode(self, images: list[Image.Image]) -> np.ndarray:
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        pixels = pixels.to(self.device, dtype=self.model.dtype)
        if self.cfg.kind == "clip_image":
            feats = self.model.get_image_features(pixel_values=pixels).pooler_output  # (B, P)
        elif self.cfg.kind == "dinov2":
            feats = self.model(pixel_values=pixels).pooler_output  # (B, H): the CLS token
        else:
            raise ValueError(f"unknown encoder kind {self.cfg.kind!r}")
        feats = torch.nn.functional.normalize(feats.float(), dim=-1)
        return feats.cpu().numpy().astype(np.float32)
