"""Compose MERIT queries from labelled products (MERIT steps 3-6), as TRIPLETS rows.

A condition is (product, key): "the same {key} as that product". A query has 2, 3 or 4 conditions
(weights 0.55 / 0.20 / 0.25) on distinct products and distinct keys, all of one class. Its positives are
every product of that class in the pool whose attributes satisfy every condition, the query products
excluded; a query is kept only when 0 < positives / class size < ``max_rate``. Products are chosen one of
three ways (weights 0.3 / 0.2 / 0.5):

- ``item``: random products of one class, each giving one of its attributes not used yet;
- ``attribute_pool``: random distinct keys of the class, each taken from a random product that has it;
- ``group_first``: two variants a, b of one product group; a gives an attribute they share, a product
  outside the group gives the attribute where b differs from a, further conditions come from other
  products that agree with b; b (the intended target) is a positive and is always kept first.

Query text (MERIT's template, every condition joined by " and " as in MERIT's ``annotate_query.py``):
``Find a product of {class} that have the same {attr_1} with <Product 1> <image>\\n{title_1} </Product 1>
and the same {attr_2} with <Product 2> <image>\\n{title_2} </Product 2> and the same {attr_3} with ...``.
Cold-start text (one product, a near-duplicate pair a -> b differing in ``key``):
``Find a product of {class} that have the same product style with <Product 1> <image>\\n{title_a}
</Product 1> but with {key} {value_b}``.

Annotation (MERIT step 4): a query is kept only with at least ``min_positives`` positives (MERIT: 2); of
those, up to ``max_positives`` are kept. With a ``similarity`` (``embedding_similarity``: the mean image
cosine of a candidate to the query products) the positives are re-ranked by it, the most similar kept
first; group_first's target b still comes first, being the product the query was built for. Hard
negatives (products meeting all conditions but one, never positives) are ranked the same way: the
siblings of a query product first, then, inside each tier, the most similar first, since the non-positives
that look most like the query products are the hardest to tell apart. Without a similarity both are a
seeded draw.

Cold start (MERIT step 6) is a separate step with its own bound: a cold-start query needs one positive,
the near duplicate b it is built from (which is always a positive), so ``min_positives`` does not apply
to it; in a catalog of distinct products b is usually the only one.

Query ``i`` draws from ``np.random.default_rng([seed, i, attempt])`` and products are indexed in id order,
so a query depends only on (pool, seed, i): any sharding of the indices gives the same rows.
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from coral import schemas as S
from coral.catalog import vocab
from coral.merit.cards import is_missing

METHODS = ("item", "attribute_pool", "group_first")
SOURCE, COLD_SOURCE = "merit", "merit_cold"
STYLE_WORD = "product style"  # MERIT's stand-in for "every attribute but the one that changes"
ATTRIBUTE_WORDS = {k: k for k in S.ATTRIBUTE_KEYS}  # the catalog's keys are already English words

# similarity(query_ids, candidate_ids) -> one score per candidate (e.g. mean image cosine to the query)
Similarity = Callable[[list[str], list[str]], Sequence[float]]
Constraint = tuple[str, str]  # (key, value)
_EMPTY = np.zeros(0, dtype=np.int64)


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


class ProductIndex:
    """The pool, in id order, with the sorted positions of the products of each class, of each (class, key)
    and of each (class, key, value), so that positives are counted over a few short arrays, never by a scan
    of the pool. One split per pool."""

    def __init__(self, products: Iterable[Mapping]):
        rows = sorted(products, key=lambda p: str(p[S.ID]))
        self.ids = [str(p[S.ID]) for p in rows]
        if len(set(self.ids)) != len(self.ids):
            raise ValueError("duplicate product ids")
        splits = {p.get(S.SPLIT) or "train" for p in rows}
        if len(splits) > 1:
            raise ValueError(f"products from several splits {sorted(splits)}: compose one split at a time")
        self.split = splits.pop() if splits else "train"
        self.position = {pid: i for i, pid in enumerate(self.ids)}
        self.classes = [str(p[S.CLASS]) for p in rows]
        self.titles = [p.get(S.TITLE) or "" for p in rows]
        self.languages = [p.get(S.LANGUAGE) or "" for p in rows]
        self.groups = [str(p.get(S.GROUP_ID) or p[S.ID]) for p in rows]
        self.attrs = [
            {k: str(v) for k, v in (p.get(S.ATTRIBUTES) or {}).items() if not is_missing(v)} for p in rows
        ]
        by_class, with_key, matching, members = (defaultdict(list) for _ in range(4))
        for i, (cls, attrs) in enumerate(zip(self.classes, self.attrs, strict=True)):
            by_class[cls].append(i)
            members[self.groups[i]].append(i)
            for k, v in attrs.items():
                with_key[(cls, k)].append(i)
                matching[(cls, k, v)].append(i)
        self.by_class = {c: np.asarray(v) for c, v in by_class.items()}
        self.with_key = {ck: np.asarray(v) for ck, v in with_key.items()}
        self.matching = {ckv: np.asarray(v) for ckv, v in matching.items()}
        self.keys = {c: sorted(k for cc, k in with_key if cc == c) for c in by_class}
        self.members = {g: np.asarray(v) for g, v in members.items()}
        self.multi_groups = sorted(g for g, v in members.items() if len(v) >= 2)

    def __len__(self) -> int:
        return len(self.ids)

    def tally(self, cls: str, constraints: Sequence[Constraint]) -> tuple[np.ndarray, np.ndarray]:
        """Sorted positions of the products of ``cls`` that satisfy every (key, value), and of those that
        satisfy all but exactly one: each product counted once per (key, value) it has."""
        if not constraints:
            return self.by_class.get(cls, _EMPTY), _EMPTY
        lists = [self.matching.get((cls, k, v), _EMPTY) for k, v in dict.fromkeys(constraints)]
        if len(lists) == 1:
            return lists[0], np.setdiff1d(self.by_class.get(cls, _EMPTY), lists[0], assume_unique=True)
        values, counts = np.unique(np.concatenate(lists), return_counts=True)
        return values[counts == len(lists)], values[counts == len(lists) - 1]


def as_index(products: Iterable[Mapping] | ProductIndex) -> ProductIndex:
    return products if isinstance(products, ProductIndex) else ProductIndex(products)


# --- text -----------------------------------------------------------------------------------------------


def class_word(cls: str) -> str:
    names = vocab.CLASSES.get(cls)
    return names[0] if names else cls.replace("_", " ")


def attribute_word(key: str) -> str:
    return ATTRIBUTE_WORDS.get(key, key.replace("_", " "))


def product_slot(i: int, title: str) -> str:
    return f"<Product {i}> {S.IMAGE_SLOT}\n{title} </Product {i}>"


def query_text(cls_word: str, parts: Sequence[tuple[str, str]]) -> str:
    """MERIT's template for conditions ``[(attribute word, product title), ...]``, joined by " and "."""
    conds = [f"the same {attr} with {product_slot(i, title)}" for i, (attr, title) in enumerate(parts, 1)]
    return f"Find a product of {cls_word} that have " + " and ".join(conds)


def cold_query_text(cls_word: str, title: str, attr: str, value: str) -> str:
    return (
        f"Find a product of {cls_word} that have the same {STYLE_WORD} with {product_slot(1, title)} "
        f"but with {attr} {value}"
    )


_SLOT = re.compile(r"</?Product \d+>|<image>")


def validate_slots(original: str, rewritten: str) -> str | None:
    """None when the rewrite keeps every ``<Product i>``/``</Product i>`` tag and ``<image>`` slot of the
    original, same count and order; else why it does not."""
    want, got = _SLOT.findall(original), _SLOT.findall(rewritten)
    if want == got:
        return None
    n_want, n_got = want.count(S.IMAGE_SLOT), got.count(S.IMAGE_SLOT)
    if n_want != n_got:
        return f"image slots: {n_want} in the original, {n_got} in the rewrite"
    missing = [t for t in dict.fromkeys(want) if want.count(t) != got.count(t)]
    extra = [t for t in dict.fromkeys(got) if t not in want]
    if missing or extra:
        return f"product tags changed: missing {missing}, unexpected {extra}"
    return "product tags or image slots reordered"


def rule_filter(row: Mapping) -> str | None:
    """MERIT step 5's rules on a TRIPLETS row: why it must be dropped, or None."""
    if not row[S.POSITIVE_IDS]:
        return "no positives"
    if set(row[S.POSITIVE_IDS]) & set(row[S.QUERY_IMAGE_IDS]):
        return "a positive is one of the query products"
    if row[S.QUERY_TEXT].count(S.IMAGE_SLOT) != len(row[S.QUERY_IMAGE_IDS]):
        return "image slots do not match the query images"
    return None


def apply_rule_filter(rows: Iterable[Mapping]) -> tuple[list[dict], list[dict]]:
    """(rows that pass ``rule_filter``, REJECTED rows for the others)."""
    kept, rejected = [], []
    for row in rows:
        reason = rule_filter(row)
        if reason is None:
            kept.append(dict(row))
        else:
            rejected.append({S.ID: row[S.QUERY_ID], S.REASON: reason})
    return kept, rejected


# --- choosing products ----------------------------------------------------------------------------------


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
