"""The collated batch's multimodal rotary positions are the model's own, and the embeddings with them
the model's without them."""

from __future__ import annotations

import pytest
import torch

from coral import schemas as S
from coral.models import coral, loader, retrievers
from tests.unit.models.test_loader import images


@pytest.mark.parametrize("model", ["qwen2_vl", "qwen2_5_vl"])
def test_positions_are_the_models_own(tiny_models, model):
    src = str(tiny_models[model])
    retriever = retrievers.make("coral", loader.load_processor(src))
    net = loader.load_model(src, torch.device("cpu"), "float32").eval()
    a, b, c = images(3)
    features = [
        retriever.query(f"a {S.IMAGE_SLOT} but in red leather, and a much longer text than the rest", [a]),
        retriever.query(f"{S.IMAGE_SLOT} and {S.IMAGE_SLOT}", [b, c]),
        retriever.query("only text", []),
        retriever.candidate("a title", c),
    ]
    batch = retriever.collate(features)
    want, _ = net.model.get_rope_index(
        batch["input_ids"],
        batch["mm_token_type_ids"],
        image_grid_thw=batch["image_grid_thw"],
        attention_mask=batch["attention_mask"],
    )
    assert torch.equal(batch["position_ids"], want)
    without = {k: v for k, v in batch.items() if k != "position_ids"}
    with torch.inference_mode():
        got, ref = coral.encode(net, batch).embedding, coral.encode(net, without).embedding
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    text_only = retriever.collate([retriever.query("only text", []), retriever.query("more text here", [])])
    assert "position_ids" not in text_only  # without images the model counts the positions itself
