"""Choosing a MERIT query's products (MERIT step 3) and its positives and hard negatives (step 4).

A condition is (product, key): "the same {key} as that product". A query has 2, 3 or 4 conditions
(weights 0.55 / 0.20 / 0.25) on distinct products and distinct keys, all of one class. Products are chosen
one of three ways (weights 0.3 / 0.2 / 0.5):

- ``item``: random products of one class, each giving one of its attributes not used yet;
- ``attribute_pool``: random distinct keys of the class, each taken from a random product that has it;
- ``group_first``: two variants a, b of one product group; a gives an attribute they share, a product
  outside the group gives the attribute where b differs from a, further conditions come from other
  products that agree with b; b (the intended target) is a positive and is always kept first.

Its positives are every product of that class in the pool whose attributes satisfy every condition, the
query products excluded; a query is kept only when 0 < positives / class size < ``max_rate``.

Annotation (MERIT step 4): a query is kept only with at least ``min_positives`` positives (MERIT: 2); of
those, up to ``max_positives`` are kept. With a ``similarity`` (``embedding_similarity``: the mean image
cosine of a candidate to the query products) the positives are re-ranked by it, the most similar kept
first; group_first's target b still comes first, being the product the query was built for. Hard
negatives (products meeting all conditions but one, never positives) are ranked the same way: the
siblings of a query product first, then, inside each tier, the most similar first, since the non-positives
that look most like the query products are the hardest to tell apart. Without a similarity both are a
seeded draw.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from coral.merit.pool import Constraint, ProductIndex

METHODS = ("item", "attribute_pool", "group_first")

# similarity(query_ids, candidate_ids) -> one score per candidate (e.g. mean image cosine to the query)
Similarity = Callable[[list[str], list[str]], Sequence[float]]


@dataclass(frozen=True)
class ComposeParams:
    """How many queries, the MERIT weights, the positive-rate bound, and how many positives and hard
    negatives a row keeps."""

    num_queries: int = 1000
    condition_counts: tuple[int, ...] = (2, 3, 4)
    condition_weights: tuple[float, ...] = (0.55, 0.20, 0.25)
    method_weights: tuple[float, ...] = (0.3, 0.2, 0.5)  # in METHODS order
    max_rate: float = 0.05
    min_positives: int = 2  # MERIT keeps a query only with at least 2 positives (cold start: 1)
    max_positives: int = 3
    hard_negatives: int = 5
    attempts: int = 1  # draws per query index before it is given up
    id_prefix: str = "merit-"
    cold_id_prefix: str = "merit_cold-"

    def __post_init__(self):
        if len(self.condition_counts) != len(self.condition_weights) or min(self.condition_counts) < 1:
            raise ValueError("condition_counts must be >= 1 and match condition_weights")
        if len(self.method_weights) != len(METHODS) or sum(self.method_weights) <= 0:
            raise ValueError(f"method_weights needs one weight per method {METHODS}")
        if not 0 < self.max_rate <= 1 or self.attempts < 1 or self.min_positives < 1:
            raise ValueError("need 0 < max_rate <= 1, attempts >= 1, min_positives >= 1")
        if self.max_positives < self.min_positives:
            raise ValueError(
                f"max_positives {self.max_positives} < min_positives {self.min_positives}: a kept row "
                "would carry fewer positives than a query needs"
            )


def _weights(w: Sequence[float]) -> np.ndarray:
    w = np.asarray(w, dtype=float)
    return w / w.sum()


def draw_plan(rng: np.random.Generator, params: ComposeParams) -> tuple[str, int]:
    """(method, number of conditions) for one query."""
    method = int(rng.choice(len(METHODS), p=_weights(params.method_weights)))
    count = int(rng.choice(len(params.condition_counts), p=_weights(params.condition_weights)))
    return METHODS[method], int(params.condition_counts[count])


def _draw(rng: np.random.Generator, pool: np.ndarray, exclude: set[int]) -> int | None:
    """A random element of ``pool`` outside ``exclude`` (a few tries, then an exact draw), or None."""
    if not len(pool):
        return None
    for _ in range(8):
        x = int(pool[rng.integers(len(pool))])
        if x not in exclude:
            return x
    rest = pool[~np.isin(pool, list(exclude))]
    return int(rest[rng.integers(len(rest))]) if len(rest) else None


def _pick_one(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


Conditions = list[tuple[int, str]]  # (product position, key)


def _item(ix: ProductIndex, rng: np.random.Generator, n: int) -> tuple[Conditions, int | None] | str:
    cls = ix.classes[int(rng.integers(len(ix)))]
    members = ix.by_class[cls]
    if len(members) < n:
        return f"class {cls} has fewer than {n} products"
    conds: Conditions = []
    for p in rng.choice(members, size=n, replace=False):
        keys = [k for k in sorted(ix.attrs[p]) if k not in {k for _, k in conds}]
        if not keys:
            return "a product has no attribute left to give"
        conds.append((int(p), _pick_one(rng, keys)))
    return conds, None


def _attribute_pool(
    ix: ProductIndex, rng: np.random.Generator, n: int
) -> tuple[Conditions, int | None] | str:
    cls = ix.classes[int(rng.integers(len(ix)))]
    keys = ix.keys[cls]
    if len(keys) < n:
        return f"class {cls} has fewer than {n} attribute keys"
    conds: Conditions = []
    for j in rng.choice(len(keys), size=n, replace=False):
        p = _draw(rng, ix.with_key[(cls, keys[j])], {q for q, _ in conds})
        if p is None:
            return f"no further product of {cls} has {keys[j]}"
        conds.append((p, keys[j]))
    return conds, None


def _group_first(ix: ProductIndex, rng: np.random.Generator, n: int) -> tuple[Conditions, int | None] | str:
    if not ix.multi_groups:
        return "no product group with two products"
    members = ix.members[_pick_one(rng, ix.multi_groups)]
    a, b = (int(x) for x in rng.choice(members, size=2, replace=False))
    cls = ix.classes[a]
    shared = sorted(set(ix.attrs[a]) & set(ix.attrs[b]))
    diff = [k for k in shared if ix.attrs[a][k] != ix.attrs[b][k]]
    same = [k for k in shared if ix.attrs[a][k] == ix.attrs[b][k]]
    if ix.classes[b] != cls or not diff or not same:
        return "the two variants need one shared and one differing attribute"
    conds: Conditions = [(a, _pick_one(rng, same))]
    chosen = set(members.tolist())
    for j in range(1, n):
        keys = diff if j == 1 else [k for k in sorted(ix.attrs[b]) if k not in {k for _, k in conds}]
        if not keys:
            return "the target has too few attributes"
        key = _pick_one(rng, keys)
        p = _draw(rng, ix.matching[(cls, key, ix.attrs[b][key])], chosen)
        if p is None:
            return f"no product outside the group has {key}={ix.attrs[b][key]}"
        conds.append((p, key))
        chosen.add(p)
    return conds, b


METHOD_FNS = {"item": _item, "attribute_pool": _attribute_pool, "group_first": _group_first}


def embedding_similarity(ids: Sequence[str], vectors: np.ndarray) -> Similarity:
    """MERIT's re-ranking score from image embeddings (one row of ``vectors`` per id, normalised here):
    the mean cosine of each candidate to the query products, ``c . mean(q)``. Query products without a
    vector are left out of the mean (none left: every score 0, the ranking falls back to id order);
    candidates without one score -inf and rank last."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) != len(ids):
        raise ValueError(f"need one vector per id: {len(ids)} ids, vectors of shape {vectors.shape}")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = vectors / np.where(norms > 0, norms, 1)
    row = {str(pid): i for i, pid in enumerate(ids)}

    def similarity(query_ids: list[str], candidate_ids: list[str]) -> np.ndarray:
        scores = np.full(len(candidate_ids), -np.inf)
        query = [row[q] for q in query_ids if q in row]
        if not query:
            return np.zeros(len(candidate_ids))
        centre = unit[query].astype(np.float64).mean(axis=0)
        have = [(j, row[c]) for j, c in enumerate(candidate_ids) if c in row]
        if have:
            at, rows = (list(x) for x in zip(*have, strict=True))
            scores[at] = unit[rows].astype(np.float64) @ centre
        return scores

    return similarity


def _rank(
    rng: np.random.Generator,
    tiers: Sequence[np.ndarray],
    k: int,
    ix: ProductIndex,
    query: Sequence[int],
    similarity: Similarity | None,
) -> list[int]:
    """Up to ``k`` positions from sorted arrays, tier by tier; inside a tier the most similar first when
    ``similarity`` is given (ties in id order), else a seeded draw (all of a tier that fits, in id order)."""
    out: list[int] = []
    for tier in tiers:
        need = k - len(out)
        if need <= 0:
            break
        if similarity is not None and len(tier):
            scores = np.asarray(similarity([ix.ids[q] for q in query], [ix.ids[c] for c in tier]), float)
            tier = tier[np.argsort(-scores, kind="stable")[:need]]
        elif len(tier) > need:
            tier = tier[rng.choice(len(tier), size=need, replace=False)]
        out += tier.tolist()
    return out


def select(
    ix: ProductIndex,
    rng: np.random.Generator,
    cls: str,
    constraints: Sequence[Constraint],
    query: Sequence[int],
    target: int | None,
    params: ComposeParams,
    similarity: Similarity | None = None,
) -> tuple[list[int], list[int]] | str:
    """(kept positives, hard negatives) for a query, or why it is rejected. Positives: at least
    ``params.min_positives`` in the pool, up to ``params.max_positives`` kept, ``target`` first, the rest
    most similar first. Hard negatives satisfy all but one condition and are never positives; those of a
    query product's group come first, then the most similar (the hardest)."""
    positives, negatives = ix.tally(cls, constraints)
    positives, negatives = (a[~np.isin(a, query)] for a in (positives, negatives))
    rate = len(positives) / len(ix.by_class[cls])
    if not len(positives):
        return "no positives"
    if rate >= params.max_rate:
        return f"positive rate {rate:.4f} >= {params.max_rate}"
    if len(positives) < params.min_positives:
        return f"{len(positives)} positives < min_positives {params.min_positives}"
    is_target = positives == (-1 if target is None else target)
    tiers = [positives[is_target], positives[~is_target]]
    kept = _rank(rng, tiers, params.max_positives, ix, query, similarity)
    sibling = np.isin(negatives, np.concatenate([ix.members[ix.groups[q]] for q in query]))
    hard = _rank(rng, [negatives[sibling], negatives[~sibling]], params.hard_negatives, ix, query, similarity)
    return kept, hard
