"""Coral's two extra losses on a Qwen2-VL / Qwen2.5-VL retriever (REFERENCE.md section 5).

The embedding of an input is the L2-normalised last-layer state of its final token (``heads.last_token``).
For the query and its positive, Coral adds:

- vision reconstruction: a share ``vision_mask_ratio`` (default 0.5) of each image's visual token
  embeddings is replaced by a learned mask vector before the language model runs; a small randomly
  initialised transformer decoder sees the masked visual sequence with the final-token embedding as its
  memory and regresses the original (detached) visual embeddings; the loss is the MSE on masked positions;
- masked language modelling: a share ``text_mask_ratio`` of the text tokens (never special tokens, pads,
  image placeholders or the final token, whose state is the embedding) is replaced by the pad token; the model's own LM head predicts the original tokens
  at those positions; the loss is their cross-entropy.

``CoralHeads`` holds the mask vector and the decoder: they are trained with the model and left out of the
exported embedding model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from coral.device import to_model
from coral.models.heads import last_token


@dataclass
class Encoded:
    embedding: torch.Tensor  # (B, H), L2-normalised
    vision_loss: torch.Tensor | None = None
    mlm_loss: torch.Tensor | None = None


class Attention(nn.Module):
    """Multi-head attention from plain Linear modules (each called through its forward, so ZeRO-3
    gathers its partitioned weights; torch's MultiheadAttention reads its output projection directly)."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(hidden, hidden) for _ in range(4))

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        n, lq, h = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(n, -1, self.heads, h // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            split(self.q(x)), split(self.k(context)), split(self.v(context)), attn_mask=mask
        )
        return self.o(out.transpose(1, 2).reshape(n, lq, h))


class DecoderLayer(nn.Module):
    """Pre-norm: self-attention over the visual sequence, cross-attention to the condition, feed-forward."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(3))
        self.self_attn, self.cross_attn = Attention(hidden, heads), Attention(hidden, heads)
        self.ff = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))

    def forward(self, x: torch.Tensor, memory: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        y = self.norms[0](x)
        x = x + self.self_attn(y, y, keep[:, None, None, :])
        x = x + self.cross_attn(self.norms[1](x), memory)
        return x + self.ff(self.norms[2](x))


class CoralHeads(nn.Module):
    def __init__(self, hidden: int, layers: int = 1, heads: int = 4):
        super().__init__()
        # modules, not bare parameters: ZeRO-3 gathers a partitioned weight only inside a module's forward
        self.mask = nn.Embedding(1, hidden)
        nn.init.zeros_(self.mask.weight)
        self.layers = nn.ModuleList(DecoderLayer(hidden, heads) for _ in range(layers))
        self.out = nn.Linear(hidden, hidden)

    def reconstruct(self, masked: torch.Tensor, pad: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """masked: (N, L, H) visual sequences (masked rows replaced), pad: (N, L) True where padding,
        condition: (N, H) final-token embeddings -> (N, L, H) reconstructions."""
        x, memory = masked, condition[:, None, :]
        for layer in self.layers:
            x = layer(x, memory, ~pad)
        return self.out(x)


def _image_rows(model, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> list[torch.Tensor]:
    """Per image, its visual token embeddings (n_i, H) as the language model receives them."""
    out = model.model.get_image_features(pixel_values, image_grid_thw, return_dict=True).pooler_output
    if isinstance(out, list | tuple):
        return list(out)
    merge = model.config.vision_config.spatial_merge_size**2  # patches per visual token
    return list(torch.split(out, (image_grid_thw.prod(-1) // merge).tolist()))


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
    batch = to_model(batch, model)
    ids, attention = batch["input_ids"], batch["attention_mask"]
    device, inner = ids.device, model.model
    embeds = inner.get_input_embeddings()(ids)
    images, kept_images, masks = [], [], []
    mask_vector = (
        heads.mask(torch.zeros(1, dtype=torch.long, device=ids.device))[0] if heads is not None else None
    )
    if "pixel_values" in batch:
        images = _image_rows(model, batch["pixel_values"], batch["image_grid_thw"])
        for rows in images:
            m = (
                draw(len(rows), generator, device) < vision_mask_ratio
                if heads is not None
                else torch.zeros(len(rows), dtype=torch.bool, device=device)
            )
            masks.append(m)
            kept_images.append(
                torch.where(m[:, None], mask_vector.to(rows.dtype) if heads is not None else rows, rows)
            )
        slots = ids == model.config.image_token_id
        embeds = embeds.masked_scatter(slots[..., None], torch.cat(kept_images).to(embeds.dtype))
    mlm_positions = None
    if heads is not None and text_mask_ratio > 0:
        text = maskable(ids, attention, {*(special_ids or ()), model.config.image_token_id})
        mlm_positions = text & (draw(ids.shape, generator, device) < text_mask_ratio)
        pad_id = torch.tensor([model.config.text_config.pad_token_id or 0], device=device)
        pad = inner.get_input_embeddings()(pad_id)[0]
        embeds = torch.where(mlm_positions[..., None], pad.to(embeds.dtype), embeds)
    kwargs = {k: v for k, v in batch.items() if k in ("image_grid_thw", "mm_token_type_ids", "position_ids")}
    hidden = inner(input_ids=ids, inputs_embeds=embeds, attention_mask=attention, **kwargs).last_hidden_state
    embedding = last_token(hidden, attention)
    if heads is None:
        return Encoded(embedding)
    vision_loss = mlm_loss = None
    if images and any(m.any() for m in masks):
        owner = _image_owner(ids, model.config.image_token_id, [len(r) for r in images])
        length = max(len(r) for r in images)
        seqs = torch.zeros(len(images), length, embedding.shape[1], dtype=embedding.dtype, device=device)
        pad = torch.ones(len(images), length, dtype=torch.bool, device=device)
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


def maskable(ids: torch.Tensor, attention: torch.Tensor, never: set[int]) -> torch.Tensor:
    """(B, T) True where MLM may mask a token: a real token, not one of ``never`` (special tokens, image
    placeholders), not a row's final token (its state is the embedding)."""
    never_ids = torch.tensor(sorted(never), dtype=ids.dtype, device=ids.device)
    return attention.bool() & ~torch.isin(ids, never_ids) & ~last_position(attention)


def last_position(attention: torch.Tensor) -> torch.Tensor:
    """(B, T) True at each row's final real token (the embedding token), left or right padded."""
    at = attention.long().cumsum(1) == attention.long().sum(1, keepdim=True)
    return at & attention.bool()


def _image_owner(ids: torch.Tensor, image_token: int, sizes: list[int]) -> torch.Tensor:
    """For each image (in order of appearance), the row of the batch it belongs to."""
    rows = (ids == image_token).nonzero()[:, 0]  # one entry per placeholder, row-major order
    starts = torch.tensor([0, *sizes[:-1]], device=ids.device).cumsum(0)
    return rows[starts]


def draw(shape, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) draws from ``generator`` (a CPU generator: the same masks on any device) on ``device``."""
    return torch.rand(shape, generator=generator).to(device)
