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


def mine_encoder(sims: np.ndarray, rows: np.ndarray, band: tuple[float, float]) -> list[Pair]:
    """Every in-band (query, target) pair that one encoder's neighbour lists give, with its similarity.
    Hard negatives are filled in later, only for the pairs that survive the cap."""
    mask = band_mask(sims, rows, band)
    q_idx, j_idx = np.nonzero(mask)
    return [Pair(int(q), int(rows[q, j]), [], [float(sims[q, j])]) for q, j in zip(q_idx, j_idx, strict=True)]


def union(
    per_encoder: dict[str, list[Pair]],
    max_per_query: int,
    neighbours: dict[str, tuple[np.ndarray, np.ndarray, float]] | None = None,
    n_hard: int = 0,
) -> list[Pair]:
    """Merge the encoders' pairs: one Pair per (query, target) listing every encoder that found it and its
    similarity. Keep at most ``max_per_query`` pairs per query: those found by more encoders first, then by
    highest similarity. Then give each kept pair ``n_hard`` hard negatives from the neighbour lists
    (``neighbours[name] = (sims, rows, band_high)``) of the first encoder (config order) that found it."""
    merged: dict[tuple[int, int], Pair] = {}
    for name, found in per_encoder.items():
        for p in found:
            m = merged.setdefault((p.query, p.target), Pair(p.query, p.target))
            m.encoders.append(name)
            m.similarities.append(p.similarities[0])
    by_query: dict[int, list[Pair]] = defaultdict(list)
    for p in merged.values():
        by_query[p.query].append(p)
    kept = []
    for q in sorted(by_query):
        ranked = sorted(by_query[q], key=lambda p: (-len(p.encoders), -max(p.similarities), p.target))
        kept.extend(ranked[:max_per_query])
    for p in kept if neighbours else ():
        sims, rows, high = neighbours[p.encoders[0]]
        p.hard_negatives = hard_negatives(p.query, p.target, sims[p.query], rows[p.query], high, n_hard)
    return kept


def overlap(pairs: list[Pair]) -> dict[str, int]:
    """How many kept pairs each combination of encoders found, e.g. {"caption+clip_image": 12}."""
    counts: dict[str, int] = defaultdict(int)
    for p in pairs:
        counts["+".join(sorted(p.encoders))] += 1
    return dict(sorted(counts.items()))
