"""Coral's terms on the tiny Qwen2-VL: embeddings match the plain forward when nothing is masked, and the
reconstruction and MLM losses fall when overfitting one fixed batch (fixed masks)."""

from __future__ import annotations

import pytest
import torch

from coral.models import loader
from coral.models.coral import CoralHeads, encode, maskable
from coral.models.heads import last_token
from tests.unit.models.test_loader import images


def batch(ref: str):
    proc = loader.load_processor(ref)
    proc.tokenizer.padding_side = "left"
    msgs = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}]
        for t in ("find the same mug in red", "a striped hat")
    ]
    texts = [proc.apply_chat_template(m, add_generation_prompt=False, tokenize=False) for m in msgs]
    special = set(proc.tokenizer.all_special_ids)
    return proc(text=texts, images=images(2), return_tensors="pt", padding=True), special


def test_embedding_without_masks_is_the_plain_last_token(tiny_models):
    ref = str(tiny_models["qwen2_vl"])
    model = loader.load_model(ref)
    b, _ = batch(ref)
    with torch.inference_mode():
        plain = last_token(model.model(**b).last_hidden_state, b["attention_mask"])
        ours = encode(model, b).embedding
    torch.testing.assert_close(ours, plain, rtol=1e-4, atol=1e-5)


@pytest.mark.timeout(120)
def test_coral_losses_fall_when_overfitting_one_batch(tiny_models):
    ref = str(tiny_models["qwen2_vl"])
    torch.manual_seed(0)
    model = loader.load_model(ref).train()
    b, special = batch(ref)
    heads = CoralHeads(model.config.text_config.hidden_size)
    opt = torch.optim.AdamW([*model.parameters(), *heads.parameters()], lr=3e-3)
    history = []
    for _ in range(40):
        out = encode(model, b, heads, 0.5, 0.3, special, torch.Generator().manual_seed(1))
        loss = out.vision_loss + out.mlm_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append((out.vision_loss.item(), out.mlm_loss.item()))
    (v0, m0), (v1, m1) = history[0], history[-1]
    assert v1 < 0.5 * v0 and m1 < 0.5 * m0, history[::10]


def test_mlm_never_masks_the_embedding_token_special_tokens_or_image_placeholders(tiny_models):
    ref = str(tiny_models["qwen2_vl"])
    b, special = batch(ref)
    image = loader.load_model(ref).config.image_token_id
    ok = maskable(b["input_ids"], b["attention_mask"], {*special, image})
    ids, attention = b["input_ids"], b["attention_mask"].bool()
    assert not ok[:, -1].any()  # left padded: the final token of every row
    assert not (ok & (ids == image)).any() and not (ok & ~attention).any()
    assert not (ok & torch.isin(ids, torch.tensor(sorted(special)))).any()
    assert ok.sum(dim=1).min() > 5  # the words of the text stay maskable
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert maskable(torch.ones(2, 4, dtype=torch.long) * 7, right, set()).tolist() == [
        [True, True, False, False],
        [True, True, True, False],
    ]
