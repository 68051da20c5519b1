"""An image's processed pixels kept for the next input that shows the same image object.

The Serve query encoder's queries name catalog products again and again; their images are decoded once
(``catalog.lookup.products_from`` keeps the decoded objects), and ``ImageFeatures`` keeps what the
retriever's image processor made of each (resized, normalised pixels; Qwen-VL's patches and grid), so a
product's image is processed once, not once per query. Only images ``keep`` was called for are cached
(an uploaded image is a new object every request), keyed by the object itself (held here, so its ``id``
stays its own), at most ``max_bytes`` of features, the least recently used going first.

An image processor maps a list of images image by image and concatenates the results along the first
axis (CLIP's ``pixel_values``; Qwen-VL's patch rows and ``image_grid_thw``), so a list made of cached
and new parts is what one call over the list returns; a test checks it against the processor itself.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np


class ImageFeatures:
    """A caching stand-in for an image processor (``install`` puts it in the retriever's place)."""

    def __init__(self, inner, max_bytes: int = 256 << 20, max_images: int = 4096):
        self.inner, self.max_bytes, self.max_images = inner, max_bytes, max_images
        # id(image) -> (image, its features or None, their bytes)
        self.kept: OrderedDict[int, tuple[Any, dict | None, int]] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0
        self.output_type: type = dict  # the processor's (BatchFeature), seen at the first miss

    def __getattr__(self, name: str):  # merge_size, patch_size...: the processor's own
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def keep(self, image) -> None:
        """``image`` (a long-lived object, e.g. a catalog product's) is worth caching."""
        if id(image) in self.kept and self.kept[id(image)][0] is image:
            self.kept.move_to_end(id(image))
            return
        self._drop(id(image))
        self.kept[id(image)] = (image, None, 0)
        while len(self.kept) > self.max_images:
            self._drop(next(iter(self.kept)))

    def __call__(self, images=None, **kwargs):
        flat = images if isinstance(images, list) else [images]
        cached = kwargs.get("return_tensors") == "np" and all(self._known(im) for im in flat)
        if not cached or not flat:
            return self.inner(images, **kwargs)
        parts = [self._features(im, kwargs) for im in flat]
        return self.output_type({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})

    def _known(self, image) -> bool:
        entry = self.kept.get(id(image))
        return entry is not None and entry[0] is image

    def _features(self, image, kwargs: dict) -> dict:
        if not self._known(image):  # let go by this very call, to make room for an earlier image's
            return {k: np.asarray(v) for k, v in self.inner([image], **kwargs).items()}
        img, feats, size = self.kept[id(image)]
        self.kept.move_to_end(id(image))
        if feats is not None and feats["kwargs"] == kwargs:
            self.hits += 1
            return feats["data"]
        self.misses += 1
        result = self.inner([image], **kwargs)
        self.output_type = type(result)
        data = {k: np.asarray(v) for k, v in result.items()}
        nbytes = sum(v.nbytes for v in data.values())
        self.bytes += nbytes - size
        self.kept[id(image)] = (img, {"kwargs": dict(kwargs), "data": data}, nbytes)
        while self.bytes > self.max_bytes and len(self.kept) > 1:
            self._drop(next(iter(self.kept)))
        return data

    def _drop(self, key: int) -> None:
        entry = self.kept.pop(key, None)
        if entry is not None:
            self.bytes -= entry[2]


def install(retriever, cache: ImageFeatures | None = None) -> ImageFeatures | None:
    """Put an ``ImageFeatures`` in place of ``retriever``'s image processor (its processor's, and its
    own reference where it keeps one); None when the retriever has no image processor."""
    processor = getattr(retriever, "processor", None)
    inner = getattr(processor, "image_processor", None)
    if inner is None:
        return None
    cache = cache or ImageFeatures(inner)
    processor.image_processor = cache
    if getattr(retriever, "image_processor", None) is inner:
        retriever.image_processor = cache
    return cache
