"""Coral's two extra losses on a Qwen2-VL / Qwen2.5-VL retriever (REFERENCE.md section 5).

The embedding of an input is the L2-normalised last-layer state of its final token (``heads.last_token``).
For the query and its positive, Coral adds:

- vision reconstruction: a share ``vision_mask_ratio`` (default 0.5) of each image's visual token
  embeddings is replaced by a learned mask vector before the language model runs; a small randomly
  initialised transformer decoder sees the masked visual sequence with the final-token embedding as its
  memory and regresses the original (detached) visual embeddings; the loss is the MSE on masked positions;
- masked language modelling: a share ``text_mask_ratio`` of the text tokens (never special tokens, pads or
  image placeholders) is replaced by the pad token; the model's own LM head predicts the original tokens
  at those positions; the loss is their cross-entropy.

``CoralHeads`` holds the mask vector and the decoder: they are trained with the model and left out of the
exported embedding model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from coral.train.heads import last_token


@dataclass
class Encoded:
    embedding: torch.Tensor  # (B, H), L2-normalised
    vision_loss: torch.Tensor | None = None
    mlm_loss: torch.Tensor | None = None


class CoralHeads(nn.Module):
    def __init__(self, hidden: int, layers: int = 1, heads: int = 4):
        super().__init__()
        self.mask = nn.Parameter(torch.zeros(hidden))
        layer = nn.TransformerDecoderLayer(
            hidden, heads, dim_feedforward=2 * hidden, batch_first=True, dropout=0.0
        )
        self.decoder = nn.TransformerDecoder(layer, layers)
        self.out = nn.Linear(hidden, hidden)

    def reconstruct(self, masked: torch.Tensor, pad: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """masked: (N, L, H) visual sequences (masked rows replaced), pad: (N, L) True where padding,
        condition: (N, H) final-token embeddings -> (N, L, H) reconstructions."""
        return self.out(self.decoder(masked, condition[:, None, :], tgt_key_padding_mask=pad))


def _image_rows(model, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> list[torch.Tensor]:
    """Per image, its visual token embeddings (n_i, H) as the language model receives them."""
    out = model.model.get_image_features(pixel_values, image_grid_thw, return_dict=True).pooler_output
    return (
        list(out)
        if isinstance(out, list | tuple)
        else list(torch.split(out, image_grid_thw.prod(-1).div(4).long().tolist()))
    )


def encode(
    model,
    batch: dict,
    heads: CoralHeads | None = None,
    vision_mask_ratio: float = 0.5,
    text_mask_ratio: float = 0.15,
    special_ids: set[int] | None = None,
    generator: torch.Generator | None = None,
) -> Encoded:
    """The embedding of each row of a processor ``batch`` (left padded); with ``heads``, also the two
    Coral losses (None for a term with nothing to mask)."""
    ids, attention = batch["input_ids"], batch["attention_mask"]
    inner = model.model
    embeds = inner.get_input_embeddings()(ids)
    images, kept_images, masks = [], [], []
    if "pixel_values" in batch:
        images = _image_rows(model, batch["pixel_values"], batch["image_grid_thw"])
        for rows in images:
            m = (
                torch.rand(len(rows), generator=generator) < vision_mask_ratio
                if heads is not None
                else torch.zeros(len(rows), dtype=torch.bool)
            )
            masks.append(m)
            kept_images.append(
                torch.where(m[:, None], heads.mask.to(rows.dtype) if heads is not None else rows, rows)
            )
        slots = ids == model.config.image_token_id
        embeds = embeds.masked_scatter(slots[..., None], torch.cat(kept_images).to(embeds.dtype))
    mlm_positions = None
    if heads is not None and text_mask_ratio > 0:
        special = torch.tensor(sorted(special_ids or set()), dtype=ids.dtype)
        text = attention.bool() & ~torch.isin(ids, special)
        mlm_positions = text & (torch.rand(ids.shape, generator=generator) < text_mask_ratio)
        pad = inner.get_input_embeddings().weight[model.config.text_config.pad_token_id or 0]
        embeds = torch.where(mlm_positions[..., None], pad.to(embeds.dtype), embeds)
    kwargs = {k: v for k, v in batch.items() if k in ("image_grid_thw", "mm_token_type_ids")}
    hidden = inner(input_ids=ids, inputs_embeds=embeds, attention_mask=attention, **kwargs).last_hidden_state
    embedding = last_token(hidden, attention)
    if heads is None:
        return Encoded(embedding)
    vision_loss = mlm_loss = None
    if images and any(m.any() for m in masks):
        owner = _image_owner(ids, model.config.image_token_id, [len(r) for r in images])
        length = max(len(r) for r in images)
        seqs = torch.zeros(len(images), length, embedding.shape[1], dtype=embedding.dtype)
        pad = torch.ones(len(images), length, dtype=torch.bool)
        for i, rows in enumerate(kept_images):
            seqs[i, : len(rows)], pad[i, : len(rows)] = rows, False
        recon = heads.reconstruct(seqs, pad, embedding[owner])
        errs = [
            F.mse_loss(recon[i, : len(r)][m], r.detach()[m], reduction="sum")
            for i, (r, m) in enumerate(zip(images, masks, strict=True))
        ]
        count = sum(int(m.sum()) * images[0].shape[1] for m in masks)
        vision_loss = torch.stack(errs).sum() / count
    if mlm_positions is not None and mlm_positions.any():
        logits = model.lm_head(hidden[mlm_positions])
        mlm_loss = F.cross_entropy(logits.float(), ids[mlm_positions])
    return Encoded(embedding, vision_loss, mlm_loss)


def _image_owner(ids: torch.Tensor, image_token: int, sizes: list[int]) -> torch.Tensor:
    """For each image (in order of appearance), the row of the batch it belongs to."""
    rows = (ids == image_token).nonzero()[:, 0]  # one entry per placeholder, row-major order
    starts = torch.tensor([0, *sizes[:-1]]).cumsum(0)
    return rows[starts]
