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
    assert (cached.prefixes.misses, cached.prefixes.hits) == (2, 0)  # each head once for its three rows
    assert [g.text for g in cached.generate(ps[:1])] == got[:1]  # alone, from the cache
    assert (cached.prefixes.misses, cached.prefixes.hits) == (2, 1)


def test_rows_of_one_head_give_the_text_of_the_plain_path(engines):
    cached, plain = engines
    every = instruct_prompts(sets=2)
    ps = [p for p in every if cached._split(p)[0] == cached._split(every[0])[0]]
    assert len(ps) >= 2
    assert [g.text for g in cached.generate(ps)] == [g.text for g in plain.generate(ps)]


@pytest.mark.parametrize("q", [1, 5])
def test_shared_head_attention_equals_sdpa_over_each_rows_whole_prompt(q):
    """Rows 0 and 2 share head A, row 1 has head B; tails of different lengths, left padded."""
    import torch
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    torch.manual_seed(0)
    kv, rep, d, width_t = 2, 3, 8, 9
    heads = [torch.randn(2, 1, kv, n, d) for n in (7, 4)]  # (keys, values) per head
    lengths, which = [9, 6, 8], [0, 1, 0]
    width_h = 7
    keys, values = torch.randn(3, kv, width_t, d), torch.randn(3, kv, width_t, d)
    query = torch.randn(3, kv * rep, q, d)
    # the whole row: [pad][head][pad][tail], visible where the row has tokens, causal over the tail
    full = torch.zeros(3, 1, q, width_h + width_t, dtype=torch.bool)
    for r, (n, h) in enumerate(zip(lengths, which, strict=True)):
        full[r, :, :, width_h - heads[h].shape[3] : width_h] = True
        for i in range(q):
            full[r, :, i, width_h + width_t - n : width_h + width_t - q + i + 1] = True
    expected = []
    for r, h in enumerate(which):
        k = torch.zeros(kv, width_h, d)
        v = torch.zeros(kv, width_h, d)
        k[:, width_h - heads[h].shape[3] :] = heads[h][0, 0]
        v[:, width_h - heads[h].shape[3] :] = heads[h][1, 0]
        k = torch.cat([k, keys[r]], 1).repeat_interleave(rep, 0)
        v = torch.cat([v, values[r]], 1).repeat_interleave(rep, 0)
        expected.append(sdpa(query[r : r + 1], k[None], v[None], attn_mask=full[r : r + 1]))
    expected = torch.cat(expected).transpose(1, 2)

    class Layer(torch.nn.Module):
        layer_idx, q_proj, num_key_value_groups = 0, None, rep

    module = Layer()
    module.shared_heads = (
        [torch.tensor([0, 2]), torch.tensor([1])],
        [(heads[0][0], heads[0][1]), (heads[1][0], heads[1][1])],
    )
    got, _ = prefix.shared_head_attention(module, query, keys, values, full)
    assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-5)
    half = [(k.bfloat16(), v.bfloat16()) for k, v in module.shared_heads[1]]  # bf16 in, float32 sums
    module.shared_heads = (module.shared_heads[0], half)
    low, _ = prefix.shared_head_attention(module, *(x.bfloat16() for x in (query, keys, values)), full)
    assert low.dtype == torch.bfloat16 and torch.allclose(low.float(), expected, atol=3e-2)
    module.shared_heads = (module.shared_heads[0], [(heads[i][0], heads[i][1]) for i in (0, 1)])
    # without a mask (no row padded): each head whole, the tail causal
    got, _ = prefix.shared_head_attention(module, query, keys, values, None)
    for r, h in enumerate(which):
        k = torch.cat([heads[h][0, 0], keys[r]], 1).repeat_interleave(rep, 0)
        v = torch.cat([heads[h][1, 0], values[r]], 1).repeat_interleave(rep, 0)
        n = k.shape[1]
        causal = torch.arange(n)[None] <= torch.arange(n - q, n)[:, None]
        alone = sdpa(query[r : r + 1], k[None], v[None], attn_mask=causal).transpose(1, 2)
        assert torch.allclose(got[r : r + 1], alone, atol=1e-5)
    del module.shared_heads  # outside a batch with shared heads: SDPA as it is (one query, every key)
    plain, _ = prefix.shared_head_attention(module, query[:, :, -1:], keys, values, None)
    whole = (x.repeat_interleave(rep, 1) for x in (keys, values))
    assert torch.allclose(plain, sdpa(query[:, :, -1:], *whole).transpose(1, 2), atol=1e-5)


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
    layer = prefix.reserved_layer().holding(keys, values, capacity=5)
    buffer = layer.buffers[0].data_ptr()
    new = [(torch.randn(2, 3, 1, 5), torch.randn(2, 3, 1, 5)) for _ in range(3)]
    k, v = layer.update(*new[0])
    assert layer.buffers[0].data_ptr() == buffer and k.shape[2] == 5  # within capacity: no copy
    layer.update(*new[1])  # past it: reserved anew, twice the length
    k, v = layer.update(*new[2])
    assert layer.buffers[0].data_ptr() != buffer and layer.buffers[0].shape[2] >= 7
    # copies of the same tensors, nothing recomputed: bit-equality is the point
    assert torch.equal(k, torch.cat([keys, *(n[0] for n in new)], dim=2))
    assert torch.equal(v, torch.cat([values, *(n[1] for n in new)], dim=2))
    assert layer.get_seq_length() == 7
