"""The ``embed`` section: every configured encoder, each a Ray Data actor pool, over every image."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from coral.config.resources import Resources
from coral.typed import check


@dataclass(frozen=True)
class EncoderConfig(Resources):
    """One encoder run as a Ray Data actor pool (its size and placement: ``Resources``); image kinds read
    ``image``, text kinds read ``caption``."""

    name: str = "clip_image"  # output column is f"emb_{name}"
    kind: Literal["clip_image", "clip_text", "dinov2", "sentence_transformers"] = "clip_image"
    model: str = "models/tiny/clip"  # local dir or hub id (a hub id is the only thing that downloads)
    pooling: Literal["cls", "mean"] = "cls"  # dinov2: CLS token or mean of patch tokens
    # changing these does not change the output, so it does not rerun the stage
    batch_size: int = field(default=32, metadata={"rerun": False})
    resources: dict[str, float] = field(default_factory=dict, metadata={"rerun": False})  # custom, per actor

    def __post_init__(self):
        super().__post_init__()
        check(bool(re.fullmatch(r"[a-z0-9_]+", self.name)), f"name must match [a-z0-9_]+, got {self.name!r}")
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")


def _default_encoders() -> tuple[EncoderConfig, ...]:
    return (
        EncoderConfig(name="clip_image", kind="clip_image", model="models/tiny/clip"),
        EncoderConfig(name="dinov2", kind="dinov2", model="models/tiny/dinov2"),
        EncoderConfig(name="caption", kind="clip_text", model="models/tiny/clip"),
    )


@dataclass(frozen=True)
class ImagesSourceConfig:
    """A folder or s3:// prefix of images, with an optional captions file (JSONL or Parquet: id or path, caption)."""

    uri: str = ""
    captions: str | None = None
    extensions: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")


@dataclass(frozen=True)
class EmbedConfig:
    """Every configured encoder over every image; the MegaPairs default is CLIP image, DINOv2, CLIP text."""

    source: Literal["catalog", "images"] = "catalog"
    images: ImagesSourceConfig = field(default_factory=ImagesSourceConfig)
    encoders: tuple[EncoderConfig, ...] = field(default_factory=_default_encoders)
    max_image_pixels: int = 50_000_000  # larger images are rejected (decompression bombs)

    def __post_init__(self):
        names = [e.name for e in self.encoders]
        check(len(names) > 0, "encoders must name at least one encoder")
        check(len(set(names)) == len(names), f"encoder names must be unique, got {names}")
        check(self.source != "images" or bool(self.images.uri), "source 'images' needs images.uri")
