"""MMRet-CLIP's score fusion matches its formula: normalize(text features + image features), an input
with one part normalised alone, and a padded mixed batch embeds each row as it would alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from coral import schemas as S
from coral.models import loader, retrievers
from tests.unit.models.test_loader import images


def test_clip_fusion_matches_its_formula(tiny_models):
    ref = str(tiny_models["clip"])
    model, proc = loader.load_model(ref).eval(), loader.load_processor(ref)
    r = retrievers.make("mmret_clip", proc)
    imgs = images(3)
    query = f"same colour as {S.IMAGE_SLOT} but the shape of {S.IMAGE_SLOT}"
    with torch.no_grad():
        got = [
            r.embed(model, r.collate([f]))[0]
            for f in (r.query(query, imgs[:2]), r.query("just words", []), r.candidate(None, imgs[2]))
        ]
        tok = proc.tokenizer(
            ["same colour as but the shape of", "just words"], padding=True, return_tensors="pt"
        )
        text = model.get_text_features(**tok).pooler_output
        pix = proc.image_processor(images=imgs, return_tensors="pt")["pixel_values"]
        image = model.get_image_features(pixel_values=pix).pooler_output
        want = [
            F.normalize(text[0] + image[0] + image[1], dim=-1),  # summed, then normalised
            F.normalize(text[1], dim=-1),
            F.normalize(image[2], dim=-1),
        ]
        batched = r.embed(
            model,
            r.collate([r.query(query, imgs[:2]), r.query("just words", []), r.candidate(None, imgs[2])]),
        )
    for g, w, b in zip(got, want, batched, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b, w, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(want[0], F.normalize(text[0], dim=-1), atol=1e-3)  # the images count


def test_clip_query_slots_must_match_images(tiny_models):
    r = retrievers.make("mmret_clip", loader.load_processor(str(tiny_models["clip"])))
    with pytest.raises(ValueError, match="1 image slots but 0 images"):
        r.query(f"a {S.IMAGE_SLOT}", [])


@pytest.mark.parametrize("kind", ["coral", "mmret_mllm"])
def test_queries_in_one_processor_call_are_each_querys_own_features(tiny_models, kind):
    r = retrievers.make(kind, loader.load_processor(str(tiny_models["qwen2_vl"])))
    a, b, c = images(3)
    inputs = [
        (f"a {S.IMAGE_SLOT} but in red leather and longer than the others", [a]),
        (f"{S.IMAGE_SLOT} and {S.IMAGE_SLOT}", [b, c]),
        ("only text", []),
        (f"{S.IMAGE_SLOT} smaller", [c]),
    ]
    for (text, ims), got in zip(inputs, r.queries(inputs), strict=True):
        want = r.query(text, ims)
        assert set(got) == set(want)
        for k in want:
            torch.testing.assert_close(torch.as_tensor(got[k]), torch.as_tensor(want[k]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="1 image slots but 0 images"):
        r.queries([(f"a {S.IMAGE_SLOT}", [])])
