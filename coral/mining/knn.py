"""FAISS kNN over L2-normalised vectors (inner product = cosine): one index per encoder, built once,
queried in shards on Ray tasks.

``auto`` picks exact search (IndexFlatIP) up to ``flat_max`` vectors and IVF-Flat above; ``ivf_pq`` and
``hnsw`` are there for memory-bound and low-latency pools. The GPU is used when faiss-gpu sees one (for
every kind but HNSW, which faiss-gpu does not have).
"""

from __future__ import annotations

import logging

import faiss
import numpy as np
import ray

from coral.config import IndexConfig

log = logging.getLogger(__name__)


def index_spec(cfg: IndexConfig, n: int, d: int, gpu: bool = False) -> str:
    """The ``faiss.index_factory`` string for ``n`` vectors of dimension ``d``.

    IVF lists hold about ``list_size`` vectors, so a query scans ``nprobe * list_size`` vectors whatever
    the pool size; above 1,000 lists the coarse quantizer is an HNSW graph, so assigning a query to its
    lists stays logarithmic too (on a GPU the quantizer stays flat: faiss-gpu cannot copy an HNSW one)."""
    kind = cfg.kind if cfg.kind != "auto" else ("flat" if n <= cfg.flat_max else "ivf_flat")
    nlist = cfg.nlist or max(1, n // cfg.list_size)
    ivf = f"IVF{nlist}_HNSW32" if nlist > 1000 and not gpu else f"IVF{nlist}"
    if kind == "flat":
        return "Flat"
    if kind == "ivf_flat":
        return f"{ivf},Flat"
    if kind == "ivf_pq":
        if d % cfg.pq_m:
            raise ValueError(f"mine.index.pq_m={cfg.pq_m} must divide the embedding dimension {d}")
        return f"{ivf},PQ{cfg.pq_m}x{cfg.pq_bits}"
    if kind == "hnsw":
        return f"HNSW{cfg.hnsw_m},Flat"
    raise ValueError(f"unknown index kind {kind!r}")


def gpu_available(cfg: IndexConfig) -> bool:
    return cfg.use_gpu == "auto" and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def build_index(vectors: np.ndarray, cfg: IndexConfig, seed: int = 0, gpu: bool = False) -> faiss.Index:
    """Build (and train, for IVF) an inner-product index over ``vectors`` (n, d) float32."""
    n, d = vectors.shape
    spec = index_spec(cfg, n, d, gpu)
    index = faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        sample = vectors if n <= cfg.train_size else vectors[rng.choice(n, cfg.train_size, replace=False)]
        index.train(np.ascontiguousarray(sample))
    index.add(np.ascontiguousarray(vectors))
    set_search_params(index, cfg)
    log.info("built %s over %d x %d", spec, n, d)
    return index


def set_search_params(index: faiss.Index, cfg: IndexConfig) -> None:
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = min(cfg.nprobe, ivf.nlist)
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = cfg.ef_search


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, neighbour rows), each (q, k); missing neighbours have row -1."""
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


@ray.remote
def _search_shard(
    blob: np.ndarray, vectors: np.ndarray, lo: int, hi: int, k: int, cfg: IndexConfig, threads: int
):
    faiss.omp_set_num_threads(threads)
    index = faiss.deserialize_index(blob)
    set_search_params(index, cfg)
    return lo, *search(index, vectors[lo:hi], k)


def knn(
    vectors: np.ndarray, k: int, cfg: IndexConfig, tasks: int = 4, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k neighbours of every row among all rows (itself included), queried in ``tasks`` Ray tasks."""
    n = len(vectors)
    index = build_index(vectors, cfg, seed, gpu=gpu_available(cfg))
    k = min(k, n)
    if gpu_available(cfg) and not isinstance(index, faiss.IndexHNSW):
        return search(faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index), vectors, k)
    blob, vec_ref = ray.put(faiss.serialize_index(index)), ray.put(vectors)
    del index  # the tasks deserialise their own copies
    bounds = np.linspace(0, n, min(tasks, n) + 1).astype(int)
    refs = [
        _search_shard.remote(blob, vec_ref, int(a), int(b), k, cfg, 1)
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    sims, rows = np.empty((n, k), np.float32), np.empty((n, k), np.int64)
    for lo, s, r in ray.get(refs):
        sims[lo : lo + len(s)], rows[lo : lo + len(r)] = s, r
    return sims, rows
