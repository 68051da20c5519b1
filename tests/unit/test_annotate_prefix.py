"""The hf engine's prefix cache: shared prompt heads computed once, the same greedy text as without it."""

from __future__ import annotations

import pytest

from coral.annotate import prefix, prompts
from coral.annotate.engines import HFEngine
from coral.config import EngineConfig

DESCRIPTIONS = [
    "A white mug on a table; the target mug is red.",
    "Two bicycles by a wall, the target one is blue and has a basket on the front.",
    "A dog on grass.",
    "A kitchen with wooden cabinets; in the target the cabinets are painted green and the floor is tiled.",
    "A lamp.",
    "A city street at night, the target shows the same street in the rain.",
]


def instruct_prompts(sets: int) -> list[list[dict]]:
    return [
        prompts.instruct_prompt(d, prompts.demonstrations_for(0, f"p{i}", 5, sets), 3, 40)
        for i, d in enumerate(DESCRIPTIONS)
    ]


@pytest.fixture(scope="module")
def engines(tiny_models):
    cfg = dict(model=str(tiny_models["qwen2"]), max_new_tokens=12, device="cpu")
    return HFEngine(EngineConfig(**cfg)), HFEngine(EngineConfig(**cfg, prefix_cache=0))


def test_cached_heads_give_the_text_of_the_plain_path(engines):
    cached, plain = engines
    assert cached.prefixes is not None and plain.prefixes is None
    ps = instruct_prompts(sets=2)
    heads = {cached._split(p)[0] for p in ps}
    assert len(heads) == 2  # six prompts, two shared heads
    # whole prompts tokenize as head + tail: the cut falls on a token boundary
    for p in ps:
        head, tail = cached._split(p)
        whole = cached.tokenizer(head + tail, add_special_tokens=False)["input_ids"]
        parts = cached.tokenizer([head, tail], add_special_tokens=False)["input_ids"]
        assert whole == parts[0] + parts[1]
    got = [g.text for g in cached.generate(ps)]
    assert got == [g.text for g in plain.generate(ps)]  # one batch, mixed heads and lengths
    assert (cached.prefixes.misses, cached.prefixes.hits) == (2, 4)
    assert [g.text for g in cached.generate(ps[:1])] == got[:1]  # alone, from the cache
    assert cached.prefixes.misses == 2


def test_prompts_without_a_shared_head_take_the_plain_path(engines):
    cached, plain = engines
    ps = [[{"role": "user", "content": [prompts.text(d)]}] for d in DESCRIPTIONS[:3]]
    before = (cached.prefixes.hits, cached.prefixes.misses)
    assert [g.text for g in cached.generate(ps)] == [g.text for g in plain.generate(ps)]
    assert (cached.prefixes.hits, cached.prefixes.misses) == before


def test_cache_keeps_the_most_recent_heads(engines):
    cached, _ = engines
    small = prefix.PrefixCache(cached.model, size=2)
    a, b, c = (1, 2, 3), (4, 5), (6, 7, 8, 9)
    small.get(a), small.get(b), small.get(a), small.get(c)  # b is the least recently used
    assert list(small.states) == [a, c] and (small.hits, small.misses) == (1, 3)
    keys, values = small.get(c)[0]
    assert keys.shape[0] == 1 and keys.shape[2] == len(c) and values.shape == keys.shape


def test_reserved_layer_writes_in_place_and_grows_past_its_capacity():
    import torch

    keys, values = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    layer = prefix.reserved_layer(keys, values, capacity=5)
    buffer = layer.buffers[0].data_ptr()
    new = [(torch.randn(2, 3, 1, 5), torch.randn(2, 3, 1, 5)) for _ in range(3)]
    k, v = layer.update(*new[0])
    assert layer.buffers[0].data_ptr() == buffer and k.shape[2] == 5  # within capacity: no copy
    layer.update(*new[1])  # past it: reserved anew, twice the length
    k, v = layer.update(*new[2])
    assert layer.buffers[0].data_ptr() != buffer and layer.buffers[0].shape[2] >= 7
    assert torch.equal(k, torch.cat([keys, *(n[0] for n in new)], dim=2))
    assert torch.equal(v, torch.cat([values, *(n[1] for n in new)], dim=2))
    assert layer.get_seq_length() == 7
