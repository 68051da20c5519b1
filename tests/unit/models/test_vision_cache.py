"""A kept image goes through the vision tower once, and the embeddings are the model's own."""

from __future__ import annotations

import numpy as np
import torch

from coral import schemas as S
from coral.models import loader, retrievers, vision_cache
from tests.unit.models.test_image_features import picture


def setup(tiny_models):
    src = tiny_models["qwen2_vl"]
    retriever = retrievers.make("coral", loader.load_processor(src))
    return retriever, loader.load_model(src, torch.device("cpu"), "float32").eval()


def embed(retriever, model, queries) -> np.ndarray:
    batch = retriever.collate([retriever.query(t, ims) for t, ims in queries])
    with torch.inference_mode():
        return retriever.embed(model, batch).float().numpy()


def test_cached_tower_outputs_give_the_models_own_embeddings(tiny_models):
    torch.manual_seed(0)
    retriever, model = setup(tiny_models)
    a, b, c = picture(0), picture(1, (48, 96)), picture(2)
    first = [(f"like {S.IMAGE_SLOT} but red", [a]), (f"{S.IMAGE_SLOT} and {S.IMAGE_SLOT}", [b, a])]
    later = [(f"like {S.IMAGE_SLOT} and {S.IMAGE_SLOT}", [c, b]), (f"{S.IMAGE_SLOT} in blue", [a])]
    want = [embed(retriever, model, q) for q in (first, later)]
    cache = vision_cache.install(model)
    got = [embed(retriever, model, q) for q in (first, later)]
    for w, g in zip(want, got, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
    # a and b through the tower in the first batch; a again in it, b and a in the next, c new there
    assert (cache.misses, cache.hits) == (3, 3)


def test_with_gradients_the_tower_runs_and_the_cache_is_bounded(tiny_models):
    retriever, model = setup(tiny_models)
    cache = vision_cache.install(model)
    features = retriever.query(f"{S.IMAGE_SLOT}", [picture(0)])
    batch = retriever.collate([features])
    out = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
    assert out.pooler_output[0].requires_grad and (cache.hits, cache.misses) == (0, 0)  # training: the tower
    one = sum(t.nelement() * t.element_size() for t in out.pooler_output)
    bounded = vision_cache.VisionCache(cache.inner, cache.merge, max_bytes=2 * one)
    with torch.no_grad():
        for seed in (0, 1, 2, 2):
            b = retriever.collate([retriever.query(f"{S.IMAGE_SLOT}", [picture(seed)])])
            bounded(b["pixel_values"], b["image_grid_thw"])
    assert bounded.bytes <= 2 * one and len(bounded.kept) == 2 and (bounded.misses, bounded.hits) == (3, 1)


def test_a_model_without_a_qwen_vl_tower_is_left_alone(tiny_models):
    model = loader.load_model(tiny_models["clip"], torch.device("cpu"), "float32")
    assert vision_cache.install(model) is None
