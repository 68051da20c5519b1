"""The Coral retriever builds its inputs as the released checkpoint's model card does (Bia/CORAL, a
Qwen2.5-VL): the same input ids, token for token, for queries and candidates, and the same embedding.

The card's code, which the tests repeat on a tiny Qwen2.5-VL built from a config:

    query = [{"role": "user", "content": [{"type": "text", "text": "Find a product of backpack that have the
             same brand with <Product 1> \\n "}, {"type": "image", ...}, {"type": "text", "text": "\\n Ransel
             ... </Product 1> and the same fashion style with <Product 2> "}, {"type": "image", ...}, ...]}]
    candidate = [{"role": "user", "content": [{"type": "text", "text": "Represent the given product: "},
                 {"type": "image", ...}, {"type": "text", "text": "\\n MOSSDOOM Elegant Pink ..."}]}]
    text = processor.apply_chat_template(query, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=images, padding=True, return_tensors="pt")
    embedding = normalize(model(**inputs, output_hidden_states=True).hidden_states[-1][:, -1, :])

(the card loads images with qwen_vl_utils' ``process_vision_info``, which resizes them to multiples of 28
pixels first: the images here already are.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from coral import schemas as S
from coral.merit.compose import product_slot
from coral.models import loader, retrievers
from coral.search.embedder import Embedder
from tests.unit.models.test_loader import images

pytestmark = pytest.mark.timeout(120)

TITLES = ["Ransel MOSSDOOM Berat 0.32 kg.", "Elegant Pink Flats Party Wear", "MOSSDOOM Elegant Pink Handbag"]
# the card's query, its parts as written there, then two of MERIT's form (compose.product_slot)
CARD_QUERY = [
    "Find a product of backpack that have the same brand with <Product 1> \n ",
    None,
    f"\n {TITLES[0]} </Product 1> and the same fashion style with <Product 2> ",
    None,
    f"\n {TITLES[1]} </Product 2> with a quilted texture and a chain strap.",
]
MERIT_QUERIES = [
    f"Find a product of bag that have the same colour with {product_slot(1, TITLES[0])} and the same "
    f"brand with {product_slot(2, TITLES[2])}",
    f"Find a product of shoes that have the same product style with {product_slot(1, TITLES[1])} but with "
    "colour pink",
]


def card_message(parts: list[str | None]) -> list[dict]:
    """Chat content parts as the card writes them: None for an image."""
    content = [{"type": "image"} if p is None else {"type": "text", "text": p} for p in parts]
    return [{"role": "user", "content": content}]


def as_parts(query_text: str) -> list[str | None]:
    """A query's text as the card's list of parts: the text between image slots, as it is."""
    out: list[str | None] = []
    for i, chunk in enumerate(query_text.split(S.IMAGE_SLOT)):
        out += ([None] if i else []) + ([chunk] if chunk else [])
    return out


def card_inputs(processor, parts: list[str | None], pics) -> dict:
    text = processor.apply_chat_template(card_message(parts), tokenize=False, add_generation_prompt=True)
    return processor(text=[text], images=pics, padding=True, return_tensors="pt")


@pytest.fixture(scope="module")
def coral(tiny_models):
    ref = str(tiny_models["qwen2_5_vl"])
    return ref, loader.load_processor(ref)


def queries_and_candidates():
    pics = images(3, px=56)
    queries = [(as_parts("".join(S.IMAGE_SLOT if p is None else p for p in CARD_QUERY)), pics[:2])]
    queries += [(as_parts(q), pics[: q.count(S.IMAGE_SLOT)]) for q in MERIT_QUERIES]
    candidates = [(t, pics[i]) for i, t in enumerate(TITLES)]
    return queries, candidates


def test_coral_inputs_are_the_cards_token_for_token(coral):
    ref, processor = coral
    ours = retrievers.make("coral", loader.load_processor(ref), max_image_tokens=0)
    queries, candidates = queries_and_candidates()
    assert queries[0][0] == CARD_QUERY  # the card's own query survives the round trip through text
    for parts, pics in queries:
        text = "".join(S.IMAGE_SLOT if p is None else p for p in parts)
        want = card_inputs(processor, parts, pics)["input_ids"][0].tolist()
        assert ours.query(text, pics)["input_ids"].tolist() == want, text
    for title, pic in candidates:
        want = card_inputs(processor, ["Represent the given product: ", None, f"\n {title}"], [pic])
        assert ours.candidate(title, pic)["input_ids"].tolist() == want["input_ids"][0].tolist(), title
    # the last token is the generation prompt's: the embedding token the card reads
    ids = ours.candidate(TITLES[0], images(1, px=56)[0])["input_ids"].tolist()
    assert processor.tokenizer.decode(ids).endswith(f"\n {TITLES[0]}<|im_end|>\n<|im_start|>assistant\n")


def test_coral_embeddings_are_the_cards(coral):
    """Our embedder (a left-padded batch, the final token's last-layer state) gives the card's embedding of
    each input alone (``hidden_states[-1][:, -1, :]``, normalised)."""
    ref, processor = coral
    model = loader.load_model(ref)
    queries, candidates = queries_and_candidates()
    embedder = Embedder(ref, "coral", device="cpu")
    features = [
        embedder.retriever.query("".join(S.IMAGE_SLOT if p is None else p for p in q), i) for q, i in queries
    ]
    features += [embedder.retriever.candidate(t, i) for t, i in candidates]
    ours = embedder(features)  # one batch, left padded
    card = []
    inputs = [card_inputs(processor, q, i) for q, i in queries]
    inputs += [
        card_inputs(processor, ["Represent the given product: ", None, f"\n {t}"], [i]) for t, i in candidates
    ]
    with torch.inference_mode():
        for x in inputs:
            hidden = model(**x, return_dict=True, output_hidden_states=True).hidden_states[-1][:, -1, :]
            card.append(torch.nn.functional.normalize(hidden, dim=-1)[0].numpy())
    np.testing.assert_allclose(ours, np.stack(card), rtol=1e-4, atol=1e-5)
