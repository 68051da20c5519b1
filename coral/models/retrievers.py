"""The retrievers the train stage trains and the index and serve stages embed with (REFERENCE.md section 3).

A retriever wraps a processor and does three things:

- ``query(text, images)`` / ``candidate(title, image)``: one input -> its unpadded features (numpy arrays).
  This is the processor's work; training runs it in the Ray Data pipeline, not in the training loop.
  A Qwen-VL retriever's ``queries`` does several queries in one processor call (the Serve encoder's
  batches).
- ``collate(features)``: a list of features -> one model batch (torch tensors, padded); for a Qwen-VL
  batch with images, also the model's rotary positions (``coral.models.rope``), which the model would
  otherwise compute row by row.
- ``embed(model, batch)``: (B, D) L2-normalised embeddings.

Kinds:

- ``mmret_mllm`` and ``coral`` (the same embedding model; Coral adds training-only heads): Qwen2-VL /
  Qwen2.5-VL through its chat template with the generation prompt, each kind's messages built as its
  released checkpoint builds them (``collate``), left padded, embedding = the final token's last-layer
  state (``coral.encode``). ``max_image_tokens`` caps the visual tokens of an image (the processor's
  ``longest_edge`` pixels; MERIT infers with at most 576), saved with the processor of an export.
- ``mmret_clip``: CLIP / SigLIP score fusion. The text is the query with its image slots removed (a
  candidate's title), truncated to the text tower's length; the embedding is
  normalize(text features + the sum of the image features) (``heads.fuse``); an input with only text or
  only images is its own features normalised.
"""

from __future__ import annotations

import numpy as np
import torch

from coral import schemas as S
from coral.device import to_model
from coral.models import collate, rope
from coral.models.coral import encode
from coral.models.heads import fuse

SEQUENCE_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")


def _pad(rows: list[np.ndarray], value: int, left: bool) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = np.full((len(rows), width), value, dtype=np.int64)
    for i, r in enumerate(rows):
        if len(r):
            if left:
                out[i, width - len(r) :] = r
            else:
                out[i, : len(r)] = r
    return torch.from_numpy(out)


class MLLMRetriever:
    """Qwen2-VL / Qwen2.5-VL, last-token embedding (MMRet-MLLM; Coral's embedding model)."""

    def __init__(self, processor, style: str = "coral", max_image_tokens: int | None = None):
        self.processor, self.style = processor, style
        processor.tokenizer.padding_side = "left"
        self.pad_id = processor.tokenizer.pad_token_id or 0
        if max_image_tokens:
            image_token_budget(processor, max_image_tokens)

    def _features(self, message: list[dict], images: list) -> dict[str, np.ndarray]:
        slots = sum(p["type"] == "image" for m in message for p in m["content"])
        if slots != len(images):
            raise ValueError(f"a message has {slots} image slots but {len(images)} images")
        text = self.processor.apply_chat_template(message, add_generation_prompt=True, tokenize=False)
        out = self.processor(text=[text], images=images or None, return_tensors="np")
        return {k: (v[0] if k in SEQUENCE_KEYS else v) for k, v in out.items()}

    def query(self, text: str, images: list) -> dict[str, np.ndarray]:
        return self._features(collate.query_message(text, self.style), images)

    def queries(self, inputs: list[tuple[str, list]]) -> list[dict[str, np.ndarray]]:
        """``query`` of each (text, images), through one processor call: each input's features as ``query``
        gives them (its padding stripped, its images' rows of the batch's)."""
        messages = [collate.query_message(text, self.style) for text, _ in inputs]
        for message, (_, images) in zip(messages, inputs, strict=True):
            slots = sum(p["type"] == "image" for m in message for p in m["content"])
            if slots != len(images):
                raise ValueError(f"a message has {slots} image slots but {len(images)} images")
        texts = [
            self.processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
            for m in messages
        ]
        flat = [im for _, images in inputs for im in images]
        out = self.processor(text=texts, images=flat or None, return_tensors="np", padding=True)
        image_rows = np.cumsum([0, *np.prod(out["image_grid_thw"], -1)]) if flat else None
        features, image = [], 0
        for i, (_, images) in enumerate(inputs):
            n = int(out["attention_mask"][i].sum())  # left padded: the row's tokens are its last n
            f = {k: out[k][i][len(out[k][i]) - n :] for k in SEQUENCE_KEYS if k in out}
            if images:
                f["pixel_values"] = out["pixel_values"][image_rows[image] : image_rows[image + len(images)]]
                f["image_grid_thw"] = out["image_grid_thw"][image : image + len(images)]
                image += len(images)
            features.append(f)
        return features

    def candidate(self, title: str | None, image) -> dict[str, np.ndarray]:
        return self._features(collate.candidate_message(title, self.style), [image])

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        """Left padded (the final token of every row at the last position); images concatenated in order."""
        batch = {}
        for k in SEQUENCE_KEYS:
            if k in features[0]:
                batch[k] = _pad([f[k] for f in features], self.pad_id if k == "input_ids" else 0, left=True)
        for k in ("pixel_values", "image_grid_thw"):
            parts = [f[k] for f in features if k in f]
            if parts:
                batch[k] = torch.from_numpy(np.concatenate(parts))
        if "image_grid_thw" in batch and "mm_token_type_ids" in batch:  # as the model would, once a row
            none = np.zeros((0, 3), dtype=np.int64)
            batch["position_ids"] = rope.batch_positions(
                [f["mm_token_type_ids"] for f in features],
                [f.get("image_grid_thw", none) for f in features],
                self.processor.image_processor.merge_size,
            )
        return batch

    def embed(self, model, batch: dict) -> torch.Tensor:
        return encode(model, batch).embedding  # ``encode`` moves the batch to the model


class ClipRetriever:
    """CLIP / SigLIP score fusion (MMRet-CLIP)."""

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer, self.image_processor = processor.tokenizer, processor.image_processor
        # SigLIP was trained on max-length padding and pools the last position: pad every text alike
        self.siglip = "siglip" in type(processor).__name__.lower()
        self.empty = np.asarray(self.tokenizer("")["input_ids"], dtype=np.int64)

    def _features(self, text: str, images: list) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        if text.strip():
            padding = "max_length" if self.siglip else False
            out["input_ids"] = np.asarray(
                self.tokenizer(text, truncation=True, padding=padding)["input_ids"], dtype=np.int64
            )
        if images:
            out["pixel_values"] = self.image_processor(images=images, return_tensors="np")["pixel_values"]
        if not out:
            raise ValueError("an input needs text or an image")
        return out

    def query(self, text: str, images: list) -> dict[str, np.ndarray]:
        if text.count(S.IMAGE_SLOT) != len(images):
            raise ValueError(f"a query has {text.count(S.IMAGE_SLOT)} image slots but {len(images)} images")
        words = " ".join(c.strip() for c in text.split(S.IMAGE_SLOT) if c.strip())
        return self._features(words, images)

    def candidate(self, title: str | None, image) -> dict[str, np.ndarray]:
        return self._features(title or "", [image])

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        """Texts right padded (a row without text gets the empty text, masked out of the fusion); the
        images of all rows concatenated, with the row each belongs to."""
        ids = [f.get("input_ids", self.empty) for f in features]
        pad = self.tokenizer.pad_token_id or 0
        batch = {
            "input_ids": _pad(ids, pad, left=False),
            "attention_mask": _pad([np.ones(len(i), dtype=np.int64) for i in ids], 0, left=False),
            "has_text": torch.tensor(["input_ids" in f for f in features]),
        }
        counts = [len(f["pixel_values"]) if "pixel_values" in f else 0 for f in features]
        if sum(counts):
            batch["pixel_values"] = torch.from_numpy(
                np.concatenate([f["pixel_values"] for f in features if "pixel_values" in f])
            )
            batch["image_owner"] = torch.repeat_interleave(torch.arange(len(features)), torch.tensor(counts))
        batch["has_image"] = torch.tensor(counts) > 0
        return batch

    def embed(self, model, batch: dict) -> torch.Tensor:
        batch = to_model(batch, model)
        kwargs = {} if self.siglip else {"attention_mask": batch["attention_mask"]}
        text = model.get_text_features(input_ids=batch["input_ids"], **kwargs).pooler_output
        image = None
        if "pixel_values" in batch:
            per_image = model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
            image = torch.zeros(len(text), per_image.shape[1], dtype=per_image.dtype, device=per_image.device)
            image = image.index_add(0, batch["image_owner"], per_image)
        return fuse(text, image, batch["has_text"], batch["has_image"])


def image_token_budget(processor, max_tokens: int) -> None:
    """At most ``max_tokens`` visual tokens per image: the Qwen image processor's ``longest_edge`` (its
    max_pixels) set to ``max_tokens`` merged patches; ``shortest_edge`` (min_pixels) kept below it."""
    from transformers.image_processing_utils import SizeDict

    ip = processor.image_processor
    most = max_tokens * (ip.patch_size * ip.merge_size) ** 2
    ip.size = SizeDict(shortest_edge=min(ip.size.shortest_edge, most), longest_edge=most)


RETRIEVERS = {"mmret_mllm": MLLMRetriever, "coral": MLLMRetriever, "mmret_clip": ClipRetriever}
BASES = {
    "mmret_mllm": ("qwen2_vl", "qwen2_5_vl"),
    "coral": ("qwen2_vl", "qwen2_5_vl"),
    "mmret_clip": ("clip", "siglip"),
}


def make(kind: str, processor, max_image_tokens: int | None = None) -> MLLMRetriever | ClipRetriever:
    """``max_image_tokens``: Qwen's image-token budget (None: the processor's own, as saved with it)."""
    if kind == "mmret_clip":
        return ClipRetriever(processor)
    return MLLMRetriever(processor, kind, max_image_tokens)


def query_features(retriever, row: dict, products) -> dict:
    """A triplet row's query features; ``products``: a ``coral.catalog.lookup.Products``."""
    return retriever.query(row[S.QUERY_TEXT], [products.images(i) for i in row[S.QUERY_IMAGE_IDS]])


def candidate_features(retriever, pid: str, products) -> dict:
    return retriever.candidate(products.titles.get(pid), products.images(pid))
