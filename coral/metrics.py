"""Retrieval metrics, one place, pure functions (REFERENCE.md sections 4 and 6).

MERIT (as the authors compute them): for each query, ``rank`` is the 1-based position of its best-ranked
positive in the top 10, or -1 when no positive is in the top 10. R@1 / R@5 / R@10 are the shares of
queries whose rank is in 1..1, 1..5, 1..10; MRR@10 is the mean of 1/rank with -1 counting 0.
Recall@K (CIRR, FashionIQ): the share of queries with a positive in the top K. CIRCO mAP@k: per query
AP@k = sum over ranks i <= k of precision@i * rel_i, divided by min(number of positives, k); mean over
queries. MMEB Precision@1: the share of queries whose top candidate is a positive.
Ties: a ranking is the order given (callers sort scores descending, stable), so ties keep candidate order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MERIT_NAMES = ("R@1", "R@5", "R@10", "MRR@10")
FAMILIES = ("merit", "recall", "circo", "mmeb")


def metric_names(families, recall_k=(1, 5, 10, 50), map_k=(5, 10, 25, 50)) -> list[str]:
    """The metrics a list of families gives, in order: ``merit`` R@1/5/10 + MRR@10, ``recall`` Recall@K
    (CIRR, FashionIQ), ``circo`` mAP@k, ``mmeb`` P@1."""
    names = {
        "merit": list(MERIT_NAMES),
        "recall": [f"Recall@{k}" for k in recall_k],
        "circo": [f"mAP@{k}" for k in map_k],
        "mmeb": ["P@1"],
    }
    return [n for family in families for n in names[family]]


def first_rank(ranked: Sequence, positives: set, cutoff: int = 10) -> int:
    """1-based rank of the best-ranked positive within ``cutoff``, or -1."""
    for i, cand in enumerate(ranked[:cutoff], 1):
        if cand in positives:
            return i
    return -1


def merit_metrics(ranks: Sequence[int]) -> dict[str, float]:
    """R@1, R@5, R@10 and MRR@10 from MERIT ranks (-1 beyond 10)."""
    r = np.asarray(ranks, dtype=np.int64)
    if r.size == 0:
        raise ValueError("no queries to score")
    hit = r > 0
    return {
        "R@1": float(np.mean(hit & (r <= 1))),
        "R@5": float(np.mean(hit & (r <= 5))),
        "R@10": float(np.mean(hit & (r <= 10))),
        "MRR@10": float(np.mean(np.where(hit, 1.0 / np.maximum(r, 1), 0.0))),
    }


def recall_per_query(ranked: Sequence[Sequence], positives: Sequence[set], k: int) -> np.ndarray:
    """1.0 where a positive is in the top ``k``, else 0.0."""
    return np.array([float(bool(set(r[:k]) & p)) for r, p in zip(ranked, positives, strict=True)])


def recall_at(ranked: Sequence[Sequence], positives: Sequence[set], k: int) -> float:
    return float(np.mean(recall_per_query(ranked, positives, k)))


def ap_per_query(ranked: Sequence[Sequence], positives: Sequence[set], k: int) -> np.ndarray:
    """CIRCO's AP@k of each query."""
    scores = []
    for r, p in zip(ranked, positives, strict=True):
        hits, total = 0, 0.0
        for i, cand in enumerate(r[:k], 1):
            if cand in p:
                hits += 1
                total += hits / i
        scores.append(total / min(len(p), k) if p else 0.0)
    return np.array(scores)


def circo_map(ranked: Sequence[Sequence], positives: Sequence[set], k: int) -> float:
    return float(np.mean(ap_per_query(ranked, positives, k)))


def precision_at_1(ranked: Sequence[Sequence], positives: Sequence[set]) -> float:
    return float(np.mean([bool(r) and r[0] in p for r, p in zip(ranked, positives, strict=True)]))


def rank_candidates(query_emb: np.ndarray, cand_emb: np.ndarray, ids: Sequence, k: int = 10) -> list[list]:
    """Top-k candidate ids per query by inner product, ties kept in candidate order."""
    scores = np.asarray(query_emb, np.float32) @ np.asarray(cand_emb, np.float32).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[ids[j] for j in row] for row in order]


def bootstrap_ci(
    values: Sequence[float], n: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-query values."""
    v = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n, len(v)))].mean(axis=1)
    return float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))
