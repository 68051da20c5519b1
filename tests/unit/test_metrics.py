"""Each metric against hand-computed examples: ties, no positive retrieved, several positives, beyond 10."""

from __future__ import annotations

import numpy as np
import pytest

from coral import metrics

RANKED = [list("abcdefghijkl")] * 4
POS = [{"a"}, {"c", "e"}, {"k"}, {"z"}]  # rank 1; best of two at 3; beyond 10 (11th); never retrieved


def test_merit_ranks_and_metrics_by_hand():
    ranks = [metrics.first_rank(r, p) for r, p in zip(RANKED, POS, strict=True)]
    assert ranks == [1, 3, -1, -1]
    m = metrics.merit_metrics(ranks)
    assert m == {"R@1": 0.25, "R@5": 0.5, "R@10": 0.5, "MRR@10": pytest.approx((1 + 1 / 3) / 4)}
    assert metrics.merit_metrics([10, -1]) == pytest.approx(
        {"R@1": 0.0, "R@5": 0.0, "R@10": 0.5, "MRR@10": 0.05}
    )
    with pytest.raises(ValueError):
        metrics.merit_metrics([])


def test_recall_circo_and_precision_by_hand():
    assert metrics.recall_at(RANKED, POS, 1) == 0.25
    assert metrics.recall_at(RANKED, POS, 11) == 0.75
    # CIRCO AP@5 of query 2: hits at 3 and 5 -> (1/3 + 2/5) / min(2, 5)
    ap = [1.0, (1 / 3 + 2 / 5) / 2, 0.0, 0.0]
    assert metrics.circo_map(RANKED, POS, 5) == pytest.approx(np.mean(ap))
    assert metrics.precision_at_1(RANKED, POS) == 0.25


def test_ranking_keeps_ties_in_candidate_order():
    q = np.array([[1.0, 0.0]])
    c = np.array([[0.5, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert metrics.rank_candidates(q, c, ["w", "x", "y", "z"], k=3) == [["x", "y", "w"]]


def test_bootstrap_interval_contains_the_mean_and_narrows_with_more_queries():
    rng = np.random.default_rng(0)
    small = rng.random(50) < 0.3
    big = rng.random(5000) < 0.3
    lo, hi = metrics.bootstrap_ci(small)
    assert lo <= small.mean() <= hi
    lo2, hi2 = metrics.bootstrap_ci(big)
    assert hi2 - lo2 < hi - lo
