"""Compose MERIT queries from labelled products (MERIT steps 3-6), as TRIPLETS rows.

A query has 2, 3 or 4 conditions ("the same {key} as that product") on distinct products of one class,
chosen by one of three methods; its positives are the products of the pool that satisfy every condition
and its hard negatives those that satisfy all but one (``coral.merit.choose``, over the indexed pool of
``coral.merit.pool``). Its text is MERIT's template, and MERIT step 5's rules drop a malformed row
(``coral.merit.templates``).

Cold start (MERIT step 6) is a separate step with its own bound: a cold-start query needs one positive,
the near duplicate b it is built from (which is always a positive), so ``min_positives`` does not apply
to it; in a catalog of distinct products b is usually the only one.

Query ``i`` draws from ``np.random.default_rng([seed, i, attempt])`` and products are indexed in id order,
so a query depends only on (pool, seed, i): any sharding of the indices gives the same rows.

The names of the modules above are importable from here too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import numpy as np

from coral import schemas as S
from coral.merit.choose import (
    METHOD_FNS,
    METHODS,
    ComposeParams,
    Similarity,
    draw_plan,
    embedding_similarity,
    select,
)
from coral.merit.pool import Constraint, ProductIndex, as_index
from coral.merit.templates import (
    ATTRIBUTE_WORDS,
    STYLE_WORD,
    apply_rule_filter,
    attribute_word,
    class_word,
    cold_query_text,
    product_slot,
    query_text,
    rule_filter,
    validate_slots,
)

__all__ = [
    "ATTRIBUTE_WORDS",
    "COLD_SOURCE",
    "METHODS",
    "SOURCE",
    "STYLE_WORD",
    "ComposeParams",
    "Constraint",
    "ProductIndex",
    "Similarity",
    "apply_rule_filter",
    "as_index",
    "attribute_word",
    "class_word",
    "cold_query_text",
    "cold_start_queries",
    "compose_query",
    "compose_table",
    "draw_plan",
    "embedding_similarity",
    "near_duplicate_pairs",
    "product_slot",
    "query_text",
    "rule_filter",
    "select",
    "validate_slots",
]

SOURCE, COLD_SOURCE = "merit", "merit_cold"


def _row(ix, qid, text, query, kept, hard, source, cls, keys) -> dict:
    return {
        S.QUERY_ID: qid,
        S.QUERY_TEXT: text,
        S.QUERY_IMAGE_IDS: [ix.ids[p] for p in query],
        S.POSITIVE_IDS: [ix.ids[p] for p in kept],
        S.HARD_NEGATIVE_IDS: [ix.ids[p] for p in hard],
        S.SOURCE: source,
        S.SPLIT: ix.split,
        S.LANGUAGE: ix.languages[query[0]],
        S.CLASS: cls,
        S.NUM_CONDITIONS: len(query),
        S.CONDITION_KEYS: list(keys),
    }


def compose_query(
    ix: ProductIndex, index: int, seed: int, params: ComposeParams, similarity: Similarity | None = None
) -> tuple[dict | None, list[dict]]:
    """Query ``index``: (TRIPLETS row or None, one ``{id, reason}`` per failed attempt)."""
    qid = f"{params.id_prefix}{index:08d}"
    rejected = []
    for attempt in range(params.attempts):
        rng = np.random.default_rng([seed, index, attempt])
        method, n = draw_plan(rng, params)
        found = METHOD_FNS[method](ix, rng, n) if len(ix) else "empty pool"
        if not isinstance(found, str):
            conds, target = found
            cls = ix.classes[conds[0][0]]
            query = [p for p, _ in conds]
            constraints = [(k, ix.attrs[p][k]) for p, k in conds]
            found = select(ix, rng, cls, constraints, query, target, params, similarity)
        if not isinstance(found, str):
            text = query_text(class_word(cls), [(attribute_word(k), ix.titles[p]) for p, k in conds])
            row = _row(ix, qid, text, query, *found, SOURCE, cls, [k for _, k in conds])
            found = rule_filter(row) or row
        if not isinstance(found, str):
            return found, rejected
        rejected.append({S.ID: qid if attempt == 0 else f"{qid}.{attempt}", S.REASON: f"{method}: {found}"})
    return None, rejected


def compose_table(
    products: Iterable[Mapping] | ProductIndex,
    params: ComposeParams | None = None,
    seed: int = 0,
    indices: Iterable[int] | None = None,
    similarity: Similarity | None = None,
) -> tuple[list[dict], list[dict]]:
    """Queries ``indices`` (default ``range(params.num_queries)``) over one split's pool:
    (TRIPLETS rows, REJECTED rows). A shard passes the whole pool and its own range of indices."""
    params = params or ComposeParams()
    ix = as_index(products)
    rows, rejected = [], []
    for i in range(params.num_queries) if indices is None else indices:
        row, why = compose_query(ix, i, seed, params, similarity)
        rejected += why
        if row is not None:
            rows.append(row)
    return rows, rejected


# --- cold start -----------------------------------------------------------------------------------------


def near_duplicate_pairs(products: Iterable[Mapping] | ProductIndex) -> list[tuple[str, str, str]]:
    """Ordered pairs (a, b, key) of one group, same keys, differing in exactly ``key``; in id order."""
    ix = as_index(products)
    pairs = []
    for g in ix.multi_groups:
        for a in ix.members[g].tolist():
            for b in ix.members[g].tolist():
                if a == b or ix.attrs[a].keys() != ix.attrs[b].keys():
                    continue
                diff = [k for k in sorted(ix.attrs[a]) if ix.attrs[a][k] != ix.attrs[b][k]]
                if len(diff) == 1:
                    pairs.append((ix.ids[a], ix.ids[b], diff[0]))
    return pairs


def cold_start_queries(
    products: Iterable[Mapping] | ProductIndex,
    params: ComposeParams | None = None,
    seed: int = 0,
    indices: Iterable[int] | None = None,
    similarity: Similarity | None = None,
) -> tuple[list[dict], list[dict]]:
    """One one-product query per near-duplicate pair ``indices`` (default all): "the same product style
    as a but with {key} {b's value}". Positives are the products equal to a on every other key and to b
    on ``key`` (b always first). ``num_conditions`` is 1 (one product slot), ``condition_keys`` [key].
    ``params.min_positives`` does not apply: b is a positive by construction and one is enough."""
    params = dataclasses.replace(params or ComposeParams(), min_positives=1)
    ix = as_index(products)
    pairs = near_duplicate_pairs(ix)
    rows, rejected = [], []
    for i in range(len(pairs)) if indices is None else indices:
        a_id, b_id, key = pairs[i]
        a, b = ix.position[a_id], ix.position[b_id]
        cls, value = ix.classes[a], ix.attrs[b][key]
        qid = f"{params.cold_id_prefix}{i:08d}"
        rng = np.random.default_rng([seed, i])
        constraints = [(k, v) for k, v in sorted(ix.attrs[a].items()) if k != key] + [(key, value)]
        found = select(ix, rng, cls, constraints, [a], b, params, similarity)
        if isinstance(found, str):
            rejected.append({S.ID: qid, S.REASON: f"cold: {found}"})
            continue
        text = cold_query_text(class_word(cls), ix.titles[a], attribute_word(key), value)
        rows.append(_row(ix, qid, text, [a], *found, COLD_SOURCE, cls, [key]))
    return rows, rejected
