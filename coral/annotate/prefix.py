"""Shared prompt heads computed once and read once: a prefix cache for transformers ``generate`` on text LLMs.

Many prompts begin with the same long head (the instruction step's task and five demonstrations, about
1,000 tokens, against a tail of about 100). ``PrefixCache`` runs the model over a head once and keeps its
key/value states, least recently used out first. ``assemble`` lays a batch of (head, tail) token lists
out as ``[pad][head][pad][tail]``. ``prefill_tails`` runs each row's tail after its head alone (so no
padding is computed) and lays the results out in one cache, which holds only the tails and what is
generated and reports the head columns as already there; ``generate`` then decodes the batch, and since
positions come from the attention mask's running sum, every row sees the positions it would have had
alone. Prefill work falls from the whole prompt to its tail, which is what lets batching pay on long
prompts (prefill does not batch; decoding does).

Attention over a head is computed once per distinct head in the batch, not once per row
(``shared_head_attention``, registered with transformers' ``AttentionInterface``): the queries of every
row that shares a head attend to that head's keys in one matrix product, the rows attend to their own
tails, and the two parts merge by their softmax maxima and sums (cascade attention, as vLLM and
FlashInfer do it for shared prefixes). A batch of rows with one head reads the head's keys and values
once per step instead of once per row; the stage orders pairs by head so that batches share them.

Every batch's cache reserves room for the whole generation up front (``ReservedLayer``, used by the engine
for all its batches): a plain ``DynamicLayer`` concatenates every step, copying the whole cache once per new
token, which on a CPU took half of a batch's decode time with 1,000-token heads, and a quarter on a short
describe prompt.
"""

from __future__ import annotations

import functools
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


@functools.cache
def reserved_layer():
    """The ``ReservedLayer`` class (made on first use: transformers loads only where a model runs)."""
    from transformers.cache_utils import DynamicLayer

    class ReservedLayer(DynamicLayer):
        """A ``DynamicLayer`` that writes new states into buffers reserved ahead (room for ``extra`` positions past
        its first states) instead of concatenating; past the capacity, or after another operation replaced its
        tensors, it reserves anew at twice the length."""

        def __init__(self, extra: int = 0, offset: int = 0):
            super().__init__()
            self.extra, self.offset, self.buffers = extra, offset, None

        @classmethod
        def holding(cls, keys, values, capacity: int, offset: int = 0):
            layer = cls(offset=offset)
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
            layer.reserve(capacity)
            return layer

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self.keys, self.values = (s[:, :, :0] for s in (key_states, value_states))
            n = self.keys.shape[-2]
            m = n + key_states.shape[-2]
            if not (
                self.buffers is not None
                and self.keys.data_ptr() == self.buffers[0].data_ptr()
                and self.buffers[0].shape[-2] >= m
            ):
                self.reserve(max(m + self.extra, 2 * n))
            for buf, new in zip(self.buffers, (key_states, value_states), strict=True):
                buf[:, :, n:m] = new
            self.keys, self.values = (buf[:, :, :m] for buf in self.buffers)
            return self.keys, self.values

        def get_seq_length(self) -> int:
            """``offset`` columns held elsewhere (shared heads), then the states written here."""
            return self.offset + (self.keys.shape[-2] if self.is_initialized else 0)

        def reserve(self, size: int) -> None:
            shape = (*self.keys.shape[:2], size, self.keys.shape[-1])
            self.buffers = (self.keys.new_empty(shape), self.values.new_empty(shape))
            n = self.keys.shape[-2]
            for buf, old in zip(self.buffers, (self.keys, self.values), strict=True):
                buf[:, :, :n] = old
            self.keys, self.values = (buf[:, :, :n] for buf in self.buffers)

    return ReservedLayer


def cache_of(layers: list):
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.layers = layers
    return cache


def reserved_cache(model, new_tokens: int):
    """A ``DynamicCache`` of ``ReservedLayer``s, each reserving its prompt plus ``new_tokens`` on first use."""
    n = model.config.get_text_config(decoder=True).num_hidden_layers
    return cache_of([reserved_layer()(new_tokens) for _ in range(n)])


def prefill_tails(model, heads: list[tuple[int, ...]], tails: list[list[int]], states: dict, new_tokens: int):
    """The batch's cache after each row's tail but its last token has run alone after its head: no row
    computes padding (prefill does not batch, so nothing is lost). It holds the tails left padded to the
    longest; the heads' columns (``states``: per head, per layer (keys, values)) stay with ``sharing``,
    and ``generate`` starts from the rows' last tokens."""
    import torch

    width_h, width = max(map(len, heads)), max(map(len, tails)) - 1
    rows = []
    with torch.inference_mode():
        for head, tail in zip(heads, tails, strict=True):
            layers = [reserved_layer().holding(k, v, len(head) + len(tail)) for k, v in states[head]]
            if len(tail) > 1:
                ids = torch.tensor([tail[:-1]], device=model.device)
                model(input_ids=ids, past_key_values=cache_of(layers), use_cache=True, logits_to_keep=1)
            rows.append(
                [(layer.keys[0, :, len(head) :], layer.values[0, :, len(head) :]) for layer in layers]
            )
    out = []
    for i in range(len(rows[0])):
        k0 = rows[0][i][0]
        keys = k0.new_zeros((len(rows), k0.shape[0], width, k0.shape[2]))
        values = torch.zeros_like(keys)
        for r, row in enumerate(rows):
            n = row[i][0].shape[1]
            keys[r, :, width - n :], values[r, :, width - n :] = row[i]
        out.append(reserved_layer().holding(keys, values, width + 1 + new_tokens, offset=width_h))
    return cache_of(out)


def assemble(heads: list[tuple[int, ...]], tails: list[list[int]], pad_id: int):
    """Batch inputs for ``generate``: ids and mask ``[pad][head][pad][tail]``, the distinct heads in order of
    first use, each with its rows."""
    import torch

    n, width_h, width_t = len(heads), max(map(len, heads)), max(map(len, tails))
    ids = torch.full((n, width_h + width_t), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    groups: dict[tuple[int, ...], list[int]] = {}
    for r, (head, tail) in enumerate(zip(heads, tails, strict=True)):
        ids[r, width_h - len(head) : width_h] = torch.tensor(head)
        ids[r, ids.shape[1] - len(tail) :] = torch.tensor(tail)
        mask[r, width_h - len(head) : width_h] = 1
        mask[r, ids.shape[1] - len(tail) :] = 1
        groups.setdefault(head, []).append(r)
    return ids, mask, [(head, torch.tensor(rows)) for head, rows in groups.items()]


ATTENTION = "coral_shared_heads"


@functools.cache
def register() -> str:
    """Register ``shared_head_attention`` (with SDPA's masks) under ``ATTENTION``; the name to set."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, shared_head_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    return ATTENTION


class sharing:
    """For one ``generate`` call: every attention layer of ``model`` gets the heads' states (per head, per
    layer (keys, values) of shape [1, kv_heads, head_len, head_dim]) and their rows."""

    def __init__(self, model, states: list[list], rows: list):
        self.modules = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj")]
        self.states, self.rows = states, rows

    def __enter__(self):
        for m in self.modules:
            m.shared_heads = (self.rows, [head[m.layer_idx] for head in self.states])
        return self

    def __exit__(self, *exc):
        for m in self.modules:
            del m.shared_heads


def shared_head_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention of each row's queries over its head (shared, read once per distinct head) and its own
    ``key``/``value`` (the tail and what was generated), merged exactly; plain SDPA outside ``sharing``.

    query [B, H, q, d]; key, value [B, kv, T, d]; attention_mask [B, 1, q, head columns + T] (boolean, True
    where a query may look; None when no row is padded and q is 1). Returns [B, q, H, d]."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    shared = getattr(module, "shared_heads", None)
    if shared is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    rows, states = shared
    b, h, q, d = query.shape
    kv, t = key.shape[1], key.shape[2]
    rq = h // kv * q  # query rows per key/value head: the heads of a group, each with q positions
    scale = scaling if scaling is not None else d**-0.5
    qs = (query * scale).reshape(b, kv, rq, d)
    tail = (qs @ key.transpose(-1, -2)).float()  # [b, kv, rq, t]; softmax sums in float32, as SDPA's
    if attention_mask is not None:
        m = attention_mask[..., -t:]
        m = m[:, :, None].expand(b, 1, h // kv, q, t).reshape(b, 1, rq, t)
        tail = tail.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else tail + m
    elif q > 1:  # causal within the tail
        seen = (
            torch.arange(t, device=query.device)[None] <= torch.arange(t - q, t, device=query.device)[:, None]
        )
        tail = tail.masked_fill(~seen.repeat(h // kv, 1), float("-inf"))
    top = tail.amax(-1)  # [b, kv, rq]; a padded query's tail is all -inf, its head never is
    scores = []
    for r, (k, _) in zip(rows, states, strict=True):
        s = (
            qs[r].transpose(0, 1).reshape(kv, -1, d) @ k[0].transpose(-1, -2)
        ).float()  # [kv, n * rq, head_len]
        scores.append(s)
        top[r] = torch.maximum(top[r], s.amax(-1).reshape(kv, len(r), rq).transpose(0, 1))
    p = (tail - top[..., None]).exp()
    total, out = p.sum(-1), (p.to(value.dtype) @ value).float()
    for r, (_, v), s in zip(rows, states, scores, strict=True):
        p = (s - top[r].transpose(0, 1).reshape(kv, -1, 1)).exp()
        total[r] += p.sum(-1).reshape(kv, len(r), rq).transpose(0, 1)
        out[r] += (p.to(v.dtype) @ v[0]).float().reshape(kv, len(r), rq, d).transpose(0, 1)
    out = out / total[..., None]  # [b, kv, rq, d], rq ordered (head in group, position)
    return out.to(query.dtype).reshape(b, h, q, d).transpose(1, 2).contiguous(), None
