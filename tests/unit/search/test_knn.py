"""FAISS index choice and approximate-index recall against exact search on clustered data."""

import faiss
import numpy as np
import pytest

from coral.config import IndexConfig
from coral.search import knn


def clustered(n=6_000, d=64, centres=100, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, d)).astype(np.float32)
    x = c[rng.integers(centres, size=n)] + 0.3 * rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def recall_at(k: int, exact: np.ndarray, approx: np.ndarray) -> float:
    return float(
        np.mean([len(set(a) & set(e)) / k for a, e in zip(approx[:, :k], exact[:, :k], strict=True)])
    )


def test_index_spec_by_size_and_kind():
    assert knn.index_spec(IndexConfig(), 1000, 64) == "Flat"
    assert knn.index_spec(IndexConfig(flat_max=10), 10_000, 64) == "IVF39,Flat"
    assert knn.index_spec(IndexConfig(flat_max=10), 1_000_000, 64) == "IVF3906_HNSW32,Flat"
    assert knn.index_spec(IndexConfig(kind="ivf_pq", nlist=64, pq_m=16), 10_000, 64) == "IVF64,PQ16x8"
    assert knn.index_spec(IndexConfig(kind="hnsw", hnsw_m=16), 10, 64) == "HNSW16,Flat"
    with pytest.raises(ValueError, match="divide"):
        knn.index_spec(IndexConfig(kind="ivf_pq", pq_m=7), 10_000, 64)


def test_flat_is_exact_and_finds_itself():
    x = clustered(2000)
    sims, rows = knn.search(knn.build_index(x, IndexConfig(kind="flat")), x, 5)
    assert (rows[:, 0] == np.arange(len(x))).all()
    np.testing.assert_allclose(sims[:, 0], 1.0, atol=1e-5)
    brute = np.argsort(-(x[:50] @ x.T), axis=1)[:, :5]
    assert (rows[:50] == brute).mean() > 0.99


@pytest.mark.parametrize(
    "cfg,bar",
    [
        (IndexConfig(kind="ivf_flat", nlist=64, nprobe=16), 0.95),
        (IndexConfig(kind="hnsw", hnsw_m=32, ef_search=128), 0.95),
        (IndexConfig(kind="ivf_pq", nlist=64, nprobe=16, pq_m=64, pq_bits=4), 0.5),  # lossy codes: lower bar
    ],
    ids=["ivf_flat", "hnsw", "ivf_pq"],
)
def test_approximate_recall_against_exact(cfg, bar):
    x = clustered()
    queries = x[:300]
    _, exact = knn.search(knn.build_index(x, IndexConfig(kind="flat")), queries, 10)
    _, approx = knn.search(knn.build_index(x, cfg), queries, 10)
    assert recall_at(10, exact, approx) >= bar


@pytest.mark.parametrize("kind", ["flat", "ivf_flat"])
def test_search_rows_in_chunks_matches_one_search(kind):
    x = clustered(n=600, d=16, centres=12)
    cfg = IndexConfig(kind=kind, nlist=8, nprobe=3)
    index = knn.build_index(x, cfg)
    rows = np.random.default_rng(0).permutation(len(x))[:500]
    ref = knn.search(index, x[rows], 5)
    probes = None
    if kind == "ivf_flat":
        ivf = faiss.extract_index_ivf(index)
        probes = ivf.quantizer.search(x, ivf.nprobe)
    for chunk in (7, 500, 10_000):
        sims, found = knn.search_rows(index, x, rows, 5, probes, chunk=chunk)
        assert (found == ref[1]).all()
        np.testing.assert_allclose(sims, ref[0], rtol=1e-6)
