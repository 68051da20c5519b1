"""The one way a batch reaches a model: moved to the model's device, floating tensors cast to its dtype.

Every model entrance calls ``to_model`` (the retrievers' ``embed`` and Coral's ``encode``, the embed
stage's encoders, the hf annotation engine), so a batch built on the CPU by a processor or a collate
function, or a mask drawn from a CPU generator, never meets weights on a GPU. Tensors made inside a
forward take the device of a tensor they work with (``device=ids.device``), never the default.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def pick(device: str) -> str:
    """``auto``: cuda when torch sees a GPU, else cpu; anything else as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def placement(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """(device, floating dtype) of the model's weights: its first floating parameter's (DeepSpeed's
    partitioned ZeRO-3 parameters keep their device and dtype)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    raise ValueError(f"{type(model).__name__} has no floating point parameters")


def to_model(batch: Mapping[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    """``batch`` with every tensor on the model's device and every floating tensor in its dtype (ids,
    masks and grids keep theirs); other values unchanged."""
    device, dtype = placement(model)
    return {
        k: v.to(device, dtype if v.is_floating_point() else None) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }
