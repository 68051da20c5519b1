"""Interleaved queries and candidates become one left-padded processor batch with every image in its slot."""

from __future__ import annotations

import pytest
import torch

from coral import schemas as S
from coral.models import collate, loader, retrievers
from tests.unit.models.test_loader import images

QUERY = (
    "Find a product of mug that have the same colour with <Product 1> <image>\nKova mug </Product 1> "
    "and the same pattern with <Product 2> <image>\nBrisk mug </Product 2>"
)


def test_interleave_puts_one_image_part_per_slot_in_order():
    parts = collate.interleave(QUERY)
    kinds = [p["type"] for p in parts]
    assert kinds == ["text", "image", "text", "image", "text"]
    assert parts[2]["text"].startswith("\nKova mug </Product 1>")  # verbatim, white space included
    assert "".join(p.get("text", S.IMAGE_SLOT) for p in parts) == QUERY
    assert collate.interleave(f"{S.IMAGE_SLOT}\nshow it in red") == [
        {"type": "image"},
        {"type": "text", "text": "\nshow it in red"},
    ]
    coral = collate.candidate_message("Kova mug")[0]["content"]
    assert coral == [
        {"type": "text", "text": "Represent the given product: "},
        {"type": "image"},
        {"type": "text", "text": "\n Kova mug"},
    ]
    assert [p["type"] for p in collate.candidate_message(None)[0]["content"]] == ["text", "image"]
    mmret = collate.query_message(QUERY, "mmret_mllm")[0]["content"]
    assert (
        mmret[0]["text"].startswith("\n <instruct> Retrieve the target image")
        and "<query>" in mmret[0]["text"]
    )
    assert [p["type"] for p in collate.candidate_message("Kova mug", "mmret_mllm")[0]["content"]] == [
        "text",
        "image",
    ]


def test_collate_fills_every_slot_and_pads_left(tiny_models):
    proc = loader.load_processor(str(tiny_models["qwen2_vl"]))
    r = retrievers.make("coral", proc)
    batch = r.collate([r.query(QUERY, images(2)), r.candidate("Kova mug", images(1)[0])])
    assert batch["image_grid_thw"].shape[0] == 3
    image_token = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    per_row = (batch["input_ids"] == image_token).sum(dim=1)
    per_image = int(batch["image_grid_thw"][0].prod() // 4)
    assert per_row.tolist() == [2 * per_image, per_image]
    assert bool(batch["attention_mask"][:, -1].all())  # left padding: every row ends at the last position
    assert torch.equal(
        batch["attention_mask"][1, : int((batch["attention_mask"][1] == 0).sum())].unique(), torch.tensor([0])
    )
    with pytest.raises(ValueError, match="2 image slots but 1 images"):
        r.query(QUERY, images(1))


def test_features_collated_equal_the_processor_on_the_whole_batch(tiny_models):
    """Featurising one input at a time (the data pipeline) then collating gives the processor's own
    left-padded batch, tensor for tensor, and the model's rotary positions (``coral.models.rope``)."""
    proc = loader.load_processor(str(tiny_models["qwen2_vl"]))
    r = retrievers.make("mmret_mllm", proc)
    msgs = [
        collate.query_message(QUERY, "mmret_mllm"),
        collate.candidate_message("Kova mug", "mmret_mllm"),
        collate.candidate_message(None, "mmret_mllm"),
    ]
    imgs = [images(2), images(1), images(3)[2:]]
    texts = [proc.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in msgs]
    proc.tokenizer.padding_side = "left"
    ref = proc(text=texts, images=[i for row in imgs for i in row], return_tensors="pt", padding=True)
    got = r.collate(
        [r.query(QUERY, imgs[0]), r.candidate("Kova mug", imgs[1][0]), r.candidate(None, imgs[2][0])]
    )
    assert set(got) == {*ref, "position_ids"}
    for k in ref:  # ids, masks and grids exact; pixels (computed per image vs per batch) within a tolerance
        if ref[k].is_floating_point():
            torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
        else:
            assert torch.equal(got[k], ref[k]), k
