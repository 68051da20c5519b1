"""Pair mining on hand-made neighbour lists and vectors whose answers are known."""

import numpy as np
import pytest

from coral.mining import pairs
from coral.mining.pairs import Pair

# query 0's neighbours: itself, then rows 1..5 at known similarities
SIMS = np.array([[1.0, 0.97, 0.95, 0.85, 0.80, 0.60]], dtype=np.float32)
ROWS = np.array([[0, 1, 2, 3, 4, 5]])


def test_band_keeps_only_strictly_inside_and_never_self():
    mask = pairs.band_mask(SIMS, ROWS, (0.8, 0.96))
    assert mask.tolist() == [[False, False, True, True, False, False]]  # 0.97 near-dup, 0.80 on the bound
    own = pairs.band_mask(np.array([[0.9, 0.9]]), np.array([[0, -1]]), (0.5, 0.99))
    assert own.tolist() == [[False, False]]  # itself and a missing neighbour (-1) never pair


def test_hard_negatives_query_first_then_neighbours_without_target_or_near_dups():
    hn = pairs.hard_negatives(0, 2, SIMS[0], ROWS[0], high=0.96, count=4)
    assert hn == [0, 3, 4, 5]  # 1 is a near-duplicate (0.97), 2 is the target
    assert pairs.hard_negatives(0, 2, SIMS[0], ROWS[0], high=0.96, count=1) == [0]
    assert pairs.hard_negatives(0, 2, SIMS[0], ROWS[0], high=0.96, count=0) == []


def test_mine_encoder_then_union_gives_pairs_with_similarity_and_negatives():
    got = pairs.mine_encoder(SIMS, ROWS, (0.8, 0.96))
    assert [(p.query, p.target, p.similarities) for p in got] == [
        (0, 2, [pytest.approx(0.95)]),
        (0, 3, [pytest.approx(0.85)]),
    ]
    kept = pairs.union({"e": got}, max_per_query=5, neighbours={"e": (SIMS, ROWS, 0.96)}, n_hard=3)
    assert [(p.query, p.target, p.hard_negatives) for p in kept] == [(0, 2, [0, 3, 4]), (0, 3, [0, 2, 4])]


def test_union_records_every_encoder_and_caps_per_query():
    a = [Pair(0, 1, [], [0.9]), Pair(0, 2, [], [0.85]), Pair(1, 0, [], [0.9])]
    b = [Pair(0, 2, [], [0.93]), Pair(0, 3, [], [0.95])]
    # neighbour lists that tell the encoders apart: clip ranks 5 then 6, dino ranks 7 then 8
    clip = (np.array([[1.0, 0.9, 0.5], [1.0, 0.9, 0.5]]), np.array([[0, 5, 6], [1, 0, 6]]), 0.96)
    dino = (np.array([[1.0, 0.9, 0.5], [1.0, 0.9, 0.5]]), np.array([[0, 7, 8], [1, 7, 8]]), 0.96)
    merged = pairs.union(
        {"clip": a, "dino": b}, max_per_query=2, neighbours={"clip": clip, "dino": dino}, n_hard=3
    )
    by_key = {(p.query, p.target): p for p in merged}
    assert set(by_key) == {(0, 2), (0, 3), (1, 0)}  # (0, 1): one encoder and lowest similarity -> capped
    assert by_key[(0, 2)].encoders == ["clip", "dino"]
    assert by_key[(0, 2)].similarities == pytest.approx([0.85, 0.93])
    assert by_key[(0, 2)].hard_negatives == [0, 5, 6]  # from the first encoder that found it
    assert by_key[(0, 3)].hard_negatives == [0, 7, 8]  # found by dino only
    assert by_key[(1, 0)].hard_negatives == [1, 6]  # the target (0) is never its own negative
    assert pairs.overlap(merged) == {"clip": 1, "clip+dino": 1, "dino": 1}


def test_on_real_vectors_duplicates_and_far_points_are_excluded():
    from coral.config import IndexConfig
    from coral.search import knn

    rng = np.random.default_rng(0)
    base = rng.normal(size=(1, 16))
    near = base + 0.6 * rng.normal(size=(1, 16))  # similar, not identical
    dup = base + 1e-4 * rng.normal(size=(1, 16))  # a near-duplicate of base
    far = -base  # opposite
    v = np.concatenate([base, near, dup, far]).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    index = knn.build_index(v, IndexConfig(kind="flat"))
    sims, rows = knn.search(index, v, 4)
    got = {(p.query, p.target) for p in pairs.mine_encoder(sims, rows, (0.8, 0.96))}
    sim_near = float(v[0] @ v[1])
    assert 0.8 < sim_near < 0.96, sim_near  # the construction holds
    assert (0, 1) in got and (1, 0) in got
    assert (0, 2) not in got and (2, 0) not in got  # near-duplicate
    assert all(3 not in pair for pair in got)  # far point
