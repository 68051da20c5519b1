"""A Qwen-VL vision tower's output kept per image, for the next batch that shows the same pixels.

The Serve query encoder's queries name catalog products again and again (``image_features`` keeps each
product's processed pixels); ``VisionCache`` keeps what the vision tower made of them, so a product's
image goes through the tower once per replica, not once per query. It stands in for the model's
``get_image_features`` (``install``): the batch's images are told apart by their rows of ``pixel_values``
(``image_grid_thw``: t x h x w rows each), each keyed by a digest of its rows and grid, and only the
images not kept go through the tower, in one call. What the language model receives is then the tower's
output for those pixels, as computed in some earlier batch: the same function of the same input, equal up
to the float rounding of a different batch shape.

Only without gradients (``torch.inference_mode`` or ``no_grad``: serving, embedding); a training step
goes to the tower itself. At most ``max_bytes`` of outputs, the least recently used going first.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling


def _digest(rows: torch.Tensor, grid: torch.Tensor) -> bytes:
    h = hashlib.sha256()  # about twice blake2b's speed here (SHA extensions)
    h.update(str(rows.dtype).encode())
    h.update(grid.cpu().numpy().tobytes())
    h.update(rows.detach().cpu().contiguous().numpy())  # its buffer: no copy
    return h.digest()


class VisionCache:
    """A caching stand-in for ``get_image_features(pixel_values, image_grid_thw, ...)`` of a Qwen-VL
    model (``pooler_output``: one (tokens, hidden) tensor an image)."""

    def __init__(self, inner, merge: int, max_bytes: int = 256 << 20):
        self.inner, self.merge, self.max_bytes = inner, merge, max_bytes
        self.kept: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def __call__(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None = None, **kwargs):
        if image_grid_thw is None or torch.is_grad_enabled():
            return self.inner(pixel_values, image_grid_thw, **kwargs)
        sizes = image_grid_thw.prod(-1).tolist()
        rows = torch.split(pixel_values, sizes)
        keys = [_digest(r, g) for r, g in zip(rows, image_grid_thw, strict=True)]
        first: dict[bytes, int] = {}  # each image's first place in the batch
        for i, key in enumerate(keys):
            first.setdefault(key, i)
        values = {k: self.kept[k] for k in first if k in self.kept}
        new = [i for k, i in first.items() if k not in values]
        self.misses += len(new)
        self.hits += len(keys) - len(new)
        for key in values:
            self.kept.move_to_end(key)
        if new:
            out = self.inner(torch.cat([rows[i] for i in new]), image_grid_thw[new], **kwargs).pooler_output
            if not isinstance(out, list | tuple):
                out = torch.split(out, [sizes[i] // self.merge for i in new])
            for i, value in zip(new, out, strict=True):
                values[keys[i]] = value.detach()
                self._keep(keys[i], values[keys[i]])
        return BaseModelOutputWithPooling(pooler_output=tuple(values[k] for k in keys))

    def _keep(self, key: bytes, value: torch.Tensor) -> None:
        self.kept[key] = value
        self.bytes += value.nelement() * value.element_size()
        while self.bytes > self.max_bytes and len(self.kept) > 1:
            _, old = self.kept.popitem(last=False)
            self.bytes -= old.nelement() * old.element_size()


def install(model, max_bytes: int = 256 << 20) -> VisionCache | None:
    """Put a ``VisionCache`` in place of ``model``'s ``get_image_features`` (a Qwen-VL model: its inner
    ``model``); None for a model without a Qwen-VL vision tower (CLIP)."""
    inner = getattr(model, "model", None)
    config = getattr(getattr(model, "config", None), "vision_config", None)
    if inner is None or config is None or not hasattr(inner, "get_image_features"):
        return None
    cache = VisionCache(inner.get_image_features, config.spatial_merge_size**2, max_bytes)
    inner.get_image_features = cache
    return cache
