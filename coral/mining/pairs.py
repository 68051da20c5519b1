"""From kNN results to MegaPairs training pairs: band filter, self and near-duplicate exclusion, union
across encoders with bookkeeping, hard negatives, a cap per query. Pure functions on arrays.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Pair:
    query: int
    target: int
    encoders: list[str] = field(default_factory=list)
    similarities: list[float] = field(default_factory=list)
    hard_negatives: list[int] = field(default_factory=list)


def band_mask(sims: np.ndarray, rows: np.ndarray, band: tuple[float, float]) -> np.ndarray:
    """(n, k) bool: neighbour j of query i is a pair when it is not i itself, exists, and low < sim < high.
    At or above ``high`` it is a near-duplicate, at or below ``low`` too weak."""
    lo, hi = band
    own = rows == np.arange(len(rows))[:, None]
    return (rows >= 0) & ~own & (sims > lo) & (sims < hi)


def hard_negatives(query: int, target: int, sims_row, rows_row, high: float, count: int) -> list[int]:
    """The query itself first (as in the released MegaPairs data), then the query's other neighbours in
    similarity order, skipping the target, the query and near-duplicates of the query."""
    if count <= 0:
        return []
    out = [query]
    for s, r in zip(sims_row, rows_row, strict=True):
        if len(out) >= count:
            break
        if r < 0 or r == query or r == target or s >= high:
            continue
        out.append(int(r))
    return out


def mine_encoder(sims: np.ndarray, rows: np.ndarray, band: tuple[float, float], n_hard: int) -> list[Pair]:
    """Every in-band pair that one encoder's neighbour lists give, with that encoder's hard negatives."""
    mask = band_mask(sims, rows, band)
    pairs = []
    for q, j in zip(*np.nonzero(mask), strict=True):
        t = int(rows[q, j])
        hn = hard_negatives(int(q), t, sims[q], rows[q], band[1], n_hard)
        pairs.append(Pair(int(q), t, [], [float(sims[q, j])], hn))
    return pairs


def union(per_encoder: dict[str, list[Pair]], max_per_query: int) -> list[Pair]:
    """Merge the encoders' pairs: one Pair per (query, target) listing every encoder that found it and its
    similarity; hard negatives come from the first encoder (config order) that found it. Then keep at most
    ``max_per_query`` pairs per query: those found by more encoders first, then by highest similarity."""
    merged: dict[tuple[int, int], Pair] = {}
    for name, pairs in per_encoder.items():
        for p in pairs:
            m = merged.setdefault(
                (p.query, p.target), Pair(p.query, p.target, hard_negatives=p.hard_negatives)
            )
            m.encoders.append(name)
            m.similarities.append(p.similarities[0])
    by_query: dict[int, list[Pair]] = defaultdict(list)
    for p in merged.values():
        by_query[p.query].append(p)
    kept = []
    for q in sorted(by_query):
        ranked = sorted(by_query[q], key=lambda p: (-len(p.encoders), -max(p.similarities), p.target))
        kept.extend(ranked[:max_per_query])
    return kept


def overlap(pairs: list[Pair]) -> dict[str, int]:
    """How many kept pairs each combination of encoders found, e.g. {"caption+clip_image": 12}."""
    counts: dict[str, int] = defaultdict(int)
    for p in pairs:
        counts["+".join(sorted(p.encoders))] += 1
    return dict(sorted(counts.items()))
