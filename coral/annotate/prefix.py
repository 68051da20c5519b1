"""Shared prompt heads computed once: a prefix cache for transformers ``generate`` on text LLMs.

Many prompts begin with the same long head (the instruction step's task and five demonstrations, about
1,000 tokens, against a tail of about 100). ``PrefixCache`` runs the model over a head once and keeps its
key/value states, least recently used out first. ``assemble`` lays a batch of (head, tail) token lists
out as ``[pad][head][pad][tail]``, the heads' states left padded the same way in a ``DynamicCache``:
``generate`` then computes only the tails, and since positions come from the attention mask's running
sum, every row sees the positions it would have had alone. Prefill work falls from the whole prompt to
its tail, which is what lets batching pay on long prompts (prefill does not batch; decoding does).

The batch's cache reserves room for the whole generation up front (``ReservedLayer``): a plain
``DynamicLayer`` concatenates every step, copying the 1,000-token heads once per new token, which on a CPU
took half of a batch's decode time.
"""

from __future__ import annotations

from collections import OrderedDict


def supported(model) -> bool:
    """Only full attention: a sliding-window layer would need the window applied to the cached head."""
    text = model.config.get_text_config(decoder=True)
    return all(t == "full_attention" for t in getattr(text, "layer_types", None) or ["full_attention"])


class PrefixCache:
    """Key/value states of up to ``size`` prompt heads, keyed by their token ids."""

    def __init__(self, model, size: int):
        self.model, self.size = model, size
        self.states: OrderedDict[tuple[int, ...], list] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, ids: tuple[int, ...]) -> list:
        """Per layer (keys, values) of shape [1, heads, len(ids), head_dim], computed on a miss."""
        import torch

        hit = self.states.get(ids)
        if hit is not None:
            self.hits += 1
            self.states.move_to_end(ids)
            return hit
        self.misses += 1
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids], device=self.model.device), use_cache=True)
        states = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        self.states[ids] = states
        if len(self.states) > self.size:
            self.states.popitem(last=False)
        return states


def reserved_layer(keys, values, capacity: int):
    """A ``DynamicLayer`` that writes new states into buffers of ``capacity`` positions instead of
    concatenating; past the capacity, or after another operation replaced its tensors, it reserves anew."""
    from transformers.cache_utils import DynamicLayer

    class ReservedLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            n = self.keys.shape[-2]
            m = n + key_states.shape[-2]
            if not (self.keys.data_ptr() == self.buffers[0].data_ptr() and self.buffers[0].shape[-2] >= m):
                self.reserve(max(m, 2 * n))
            for buf, new in zip(self.buffers, (key_states, value_states), strict=True):
                buf[:, :, n:m] = new
            self.keys, self.values = (buf[:, :, :m] for buf in self.buffers)
            return self.keys, self.values

        def reserve(self, size: int) -> None:
            shape = (*self.keys.shape[:2], size, self.keys.shape[-1])
            self.buffers = (self.keys.new_empty(shape), self.values.new_empty(shape))
            n = self.keys.shape[-2]
            for buf, old in zip(self.buffers, (self.keys, self.values), strict=True):
                buf[:, :, :n] = old
            self.keys, self.values = (buf[:, :, :n] for buf in self.buffers)

    layer = ReservedLayer()
    layer.lazy_initialization(keys, values)
    layer.keys, layer.values = keys, values
    layer.reserve(capacity)
    return layer


def assemble(
    heads: list[tuple[int, ...]], tails: list[list[int]], states: list[list], pad_id: int, new_tokens: int
):
    """Batch inputs for ``generate(input_ids, attention_mask, past_key_values)``: the cache covers the
    first ``max(len(head))`` columns, so only the tails are computed."""
    import torch
    from transformers import DynamicCache

    n, width_h, width_t = len(heads), max(map(len, heads)), max(map(len, tails))
    device = states[0][0][0].device
    ids = torch.full((n, width_h + width_t), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, (head, tail) in enumerate(zip(heads, tails, strict=True)):
        ids[r, width_h - len(head) : width_h] = torch.tensor(head)
        ids[r, ids.shape[1] - len(tail) :] = torch.tensor(tail)
        mask[r, width_h - len(head) : width_h] = 1
        mask[r, ids.shape[1] - len(tail) :] = 1
    layers = []
    for layer in range(len(states[0])):
        k0, v0 = states[0][layer]
        keys = k0.new_zeros((n, k0.shape[1], width_h, k0.shape[3]))
        values = v0.new_zeros((n, v0.shape[1], width_h, v0.shape[3]))
        for r, (head, row) in enumerate(zip(heads, states, strict=True)):
            keys[r, :, width_h - len(head) :] = row[layer][0][0]
            values[r, :, width_h - len(head) :] = row[layer][1][0]
        layers.append(reserved_layer(keys, values, ids.shape[1] + new_tokens))
    cache = DynamicCache()
    cache.layers = layers
    return ids.to(device), mask.to(device), cache
