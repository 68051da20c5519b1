"""Encoders: images or texts in, float32 L2-normalised embeddings out.

A registry maps an encoder kind to its class, the input it reads and the model types it accepts. The
embed stage's Ray Data actors and the in-process baselines run the same classes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from coral.config import EncoderConfig
from coral.device import pick, to_model
from coral.errors import ConfigError
from coral.models import loader
from coral.models.kinds import ENCODER_KINDS


def _normalise(x: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(x.float(), dim=-1).cpu().numpy().astype(np.float32)


class _Base:
    def __init__(self, cfg: EncoderConfig, loaded: dict | None = None):
        self.cfg = cfg
        self.modality = ENCODER_KINDS[cfg.kind][0]
        self.device = pick(cfg.device)
        self.model, self.processor = _load(loaded, (cfg.model, self.device, cfg.dtype), _model_and_processor)

    def _pixels(self, images: list[Image.Image]) -> torch.Tensor:
        ip = getattr(self.processor, "image_processor", self.processor)
        return to_model(ip(images=images, return_tensors="pt"), self.model)["pixel_values"]

    def _tokens(self, texts: list[str]) -> dict:
        tok = getattr(self.processor, "tokenizer", self.processor)
        # SigLIP was trained on max-length padding and pools the last position: pad every text alike
        padding = "max_length" if self.model.config.model_type == "siglip" else True
        batch = tok(texts, padding=padding, truncation=True, return_tensors="pt")
        return to_model(batch, self.model)


class ClipImage(_Base):
    """CLIP / SigLIP image tower: the projected image embedding."""

    @torch.inference_mode()
    def encode(self, images: list[Image.Image]) -> np.ndarray:
        return _normalise(self.model.get_image_features(pixel_values=self._pixels(images)).pooler_output)


class ClipText(_Base):
    """CLIP / SigLIP text tower: the projected text embedding (MegaPairs' caption similarity)."""

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

    def __init__(self, cfg: EncoderConfig, loaded: dict | None = None):
        self.cfg = cfg
        self.device = pick(cfg.device)
        self.model, self.processor = _load(loaded, (cfg.model, self.device, cfg.dtype, "generic"), _generic)
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
    """The pooling a sentence-transformers model declares in ``1_Pooling/config.json`` (a local dir, or a
    hub id through the hub cache); mean when it has no pooling module. Modes this code does not implement
    are a ConfigError rather than a silent fallback."""
    local = Path(src) / "1_Pooling" / "config.json"
    if local.exists():
        cfg_file = local
    elif Path(src).is_dir():
        return "mean"
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            cfg_file = Path(hf_hub_download(src, "1_Pooling/config.json"))
        except EntryNotFoundError:
            return "mean"
    cfg = json.loads(cfg_file.read_text())
    modes = {
        "cls": cfg.get("pooling_mode_cls_token"),
        "mean": cfg.get("pooling_mode_mean_tokens"),
        "max": cfg.get("pooling_mode_max_tokens"),
        "mean_sqrt_len": cfg.get("pooling_mode_mean_sqrt_len_tokens"),
        "weightedmean": cfg.get("pooling_mode_weightedmean_tokens"),
        "lasttoken": cfg.get("pooling_mode_lasttoken"),
    }
    chosen = [m for m, on in modes.items() if on]
    if len(chosen) != 1 or chosen[0] not in ("cls", "mean", "max"):
        raise ConfigError(
            f"model '{src}': sentence-transformers pooling {chosen or 'none'} is not supported (cls, mean or max)"
        )
    return chosen[0]


ENCODERS: dict[str, type] = {
    "clip_image": ClipImage,
    "clip_text": ClipText,
    "dinov2": Dinov2,
    "sentence_transformers": SentenceTransformer,
}
assert ENCODERS.keys() == ENCODER_KINDS.keys()


def _model_and_processor(ref: str, device: str, dtype: str) -> tuple:
    return loader.load_model(ref, device, dtype), loader.load_processor(ref)


def _generic(ref: str, device: str, dtype: str, _generic: str) -> tuple:
    return loader.load_model(ref, device, dtype, generic=True), loader.load_tokenizer(ref)


def _load(loaded: dict | None, key: tuple, load) -> tuple:
    """(model, processor) for ``key``, loaded once per ``loaded`` dict (one per actor)."""
    if loaded is None:
        return load(*key)
    if key not in loaded:
        loaded[key] = load(*key)
    return loaded[key]


def build(cfg: EncoderConfig, loaded: dict | None = None):
    """The encoder ``cfg`` names; encoders built with the same ``loaded`` dict share a model they both
    name (same dir, device and dtype): CLIP's image and text towers load one CLIP."""
    return ENCODERS[cfg.kind](cfg, loaded)


def shared_pools(cfgs) -> list[list[EncoderConfig]]:
    """Encoders grouped into actor pools, in config order: those naming the same model (dir, device,
    dtype) with the same placement (actors, CPUs, GPUs, node type, custom resources) share one pool, so
    its actors start, import and load the model once for all of them."""
    pools: dict[tuple, list[EncoderConfig]] = {}
    for c in cfgs:
        placement = (
            c.num_actors,
            c.num_cpus,
            c.num_gpus,
            c.accelerator_type,
            tuple(sorted(c.resources.items())),
        )
        pools.setdefault(
            (c.model, c.device, c.dtype, c.kind == "sentence_transformers", placement), []
        ).append(c)
    return list(pools.values())
