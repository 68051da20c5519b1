"""A kept image is processed once, and what the cache returns is what the processor returns."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from coral import schemas as S
from coral.models import image_features, loader, retrievers


def picture(seed: int, size=(64, 80)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


@pytest.mark.parametrize("kind, model", [("coral", "qwen2_vl"), ("mmret_clip", "clip")])
def test_a_query_with_kept_images_has_the_processors_own_features(tiny_models, kind, model):
    plain = retrievers.make(kind, loader.load_processor(tiny_models[model]))
    cached = retrievers.make(kind, loader.load_processor(tiny_models[model]))
    cache = image_features.install(cached)
    a, b, upload = picture(0), picture(1, (48, 96)), picture(2)
    cache.keep(a)
    cache.keep(b)
    for _ in range(2):
        for images in ([a, b], [b], [a, upload]):
            text = f"like {' and '.join([S.IMAGE_SLOT] * len(images))} but in red"
            want, got = plain.query(text, images), cached.query(text, images)
            assert set(want) == set(got)
            for k in want:
                np.testing.assert_array_equal(np.asarray(want[k]), np.asarray(got[k]), err_msg=k)
    assert (cache.misses, cache.hits) == (2, 4)  # a and b processed once each; the upload never kept


def test_the_cache_keeps_at_most_its_bytes_and_forgets_the_oldest(tiny_models):
    retriever = retrievers.make("coral", loader.load_processor(tiny_models["qwen2_vl"]))
    one = retriever.processor.image_processor([picture(0)], return_tensors="np")
    size = sum(np.asarray(v).nbytes for v in one.values())
    inner = retriever.processor.image_processor
    cache = image_features.install(retriever, image_features.ImageFeatures(inner, max_bytes=2 * size))
    images = [picture(i) for i in range(3)]
    for im in images:
        cache.keep(im)
        cache([im], return_tensors="np")
    assert cache.bytes <= 2 * size and id(images[0]) not in cache.kept and id(images[2]) in cache.kept
    cache([images[2]], return_tensors="np")
    cache([images[2]], return_tensors="pt")  # other arguments: the processor itself, not the cache
    assert (cache.misses, cache.hits) == (3, 1)
    assert cache.merge_size == inner.merge_size  # the processor's attributes, through the cache
