"""How each retriever turns model outputs into one embedding (REFERENCE.md section 3).

- MMRet-CLIP (score fusion): the embedding of an interleaved query is normalize(text features + image
  features), summed before normalising; a text-only or image-only input is its own features normalised.
- MMRet-MLLM / Coral: the L2-normalised last-layer hidden state of the final token (left padding puts it
  at position -1 for every row; right padding is handled too).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fuse(
    text: torch.Tensor | None,
    image: torch.Tensor | None,
    has_text: torch.Tensor | None = None,
    has_image: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, D) embeddings from projected text and image features; ``has_*`` (B,) bools mark which rows
    have that part (default: all rows that were given the tensor)."""
    if text is None and image is None:
        raise ValueError("fuse needs text or image features")
    ref = text if text is not None else image
    total = torch.zeros_like(ref)
    for feats, present in ((text, has_text), (image, has_image)):
        if feats is None:
            continue
        mask = (
            torch.ones(len(feats), dtype=feats.dtype, device=feats.device)
            if present is None
            else present.to(feats.dtype)
        )
        total = total + feats * mask[:, None]
    return F.normalize(total, dim=-1)


def last_token(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, H) hidden states -> (B, H) L2-normalised state of each row's final real token."""
    if bool(attention_mask[:, -1].all()):  # left padding (or none): the last position
        out = hidden[:, -1]
    else:  # right padding: the position before the first pad
        idx = attention_mask.long().sum(dim=1) - 1
        out = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
    return F.normalize(out, dim=-1)
