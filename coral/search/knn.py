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

from coral import cost
from coral.config import IndexConfig

log = logging.getLogger(__name__)

QUERY_CHUNK = 65_536


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
        return f"{ivf},PQ{cfg.pq_m}x{cfg.pq_bits}" + (",RFlat" if cfg.refine else "")
    if kind == "hnsw":
        return f"HNSW{cfg.hnsw_m},Flat"
    raise ValueError(f"unknown index kind {kind!r}")


def gpu_available(cfg: IndexConfig) -> bool:
    return cfg.use_gpu == "auto" and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def train_index(vectors: np.ndarray, cfg: IndexConfig, seed: int = 0, gpu: bool = False) -> faiss.Index:
    """An empty inner-product index for ``vectors`` (n, d) float32, trained when it is an IVF one."""
    n, d = vectors.shape
    spec = index_spec(cfg, n, d, gpu)
    index = faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efConstruction = cfg.ef_construction
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and isinstance(ivf := faiss.downcast_index(ivf), faiss.IndexIVFPQ):
        # polysemous training only re-numbers the PQ centroids for Hamming pre-filtering (polysemous_ht),
        # which is never used: the same codes and distances, at a quarter of the training time
        ivf.do_polysemous_training = False
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        sample = vectors if n <= cfg.train_size else vectors[rng.choice(n, cfg.train_size, replace=False)]
        index.train(np.ascontiguousarray(sample))
    set_search_params(index, cfg)
    log.info("trained %s for %d x %d", spec, n, d)
    return index


def add(index: faiss.Index, vectors: np.ndarray, lists: np.ndarray | None = None) -> None:
    """Add ``vectors``; for an IVF index, ``lists`` (n,) are their inverted lists, already computed."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if lists is None:
        index.add(x)
        return
    lists = np.ascontiguousarray(lists, dtype=np.int64)  # named: swig_ptr keeps no reference of its own
    faiss.extract_index_ivf(index).add_core(len(x), faiss.swig_ptr(x), None, faiss.swig_ptr(lists))


def build_index(vectors: np.ndarray, cfg: IndexConfig, seed: int = 0, gpu: bool = False) -> faiss.Index:
    """Build (and train, for IVF) an inner-product index over ``vectors`` (n, d) float32."""
    index = train_index(vectors, cfg, seed, gpu)
    add(index, vectors)
    return index


def set_search_params(index: faiss.Index, cfg: IndexConfig) -> None:
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = min(cfg.nprobe, ivf.nlist)
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = cfg.ef_search
    if isinstance(index, faiss.IndexRefine) and cfg.refine:
        index.k_factor = float(cfg.refine)


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, neighbour rows), each (q, k); missing neighbours have row -1."""
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def search_rows(
    index: faiss.Index,
    vectors: np.ndarray,
    rows: np.ndarray,
    k: int,
    probes: tuple[np.ndarray, np.ndarray] | None = None,
    chunk: int = QUERY_CHUNK,
) -> tuple[np.ndarray, np.ndarray]:
    """Search ``vectors[rows]``, ``chunk`` queries at a time (only a chunk is ever copied); with
    ``probes`` (coarse sims, lists), an IVF index scans those lists instead of running its quantizer."""
    sims, found = np.empty((len(rows), k), np.float32), np.empty((len(rows), k), np.int64)
    for lo in range(0, len(rows), chunk):
        part, out = rows[lo : lo + chunk], slice(lo, lo + chunk)
        if probes is None:
            sims[out], found[out] = search(index, vectors[part], k)
        else:
            q = np.ascontiguousarray(vectors[part], dtype=np.float32)
            faiss.extract_index_ivf(index).search_preassigned(
                q, k, probes[1][part], probes[0][part], D=sims[out], I=found[out]
            )
    return sims, found


@ray.remote
def _search_shard(
    blob: np.ndarray,
    vectors: np.ndarray,
    probes: tuple[np.ndarray, np.ndarray] | None,
    rows: np.ndarray,
    k: int,
    cfg: IndexConfig,
    filled: bool,
    threads: int,
    clock=None,
):
    cost.task_started(clock)
    faiss.omp_set_num_threads(threads)
    index = faiss.deserialize_index(blob)
    set_search_params(index, cfg)
    if not filled:
        add(index, vectors, None if probes is None else probes[1][:, 0])
    return rows, *search_rows(index, vectors, rows, k, probes)


def knn(
    vectors: np.ndarray, k: int, cfg: IndexConfig, tasks: int = 4, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k neighbours of every row among all rows (itself included), queried in ``tasks`` Ray tasks.

    For IVF the coarse quantizer runs once: each vector's ``nprobe`` nearest lists serve both to add it
    (the first) and to search with it (all of them, as ``index.search`` would pick them), and the queries
    go out sorted by list, so consecutive queries scan the same lists while they are in cache. Flat and
    IVF-Flat indexes hold nothing but the vectors, so each task fills its own copy from the shared
    vectors instead of receiving a serialised one; compressed (PQ) and HNSW indexes are built once here.
    """
    n = len(vectors)
    k = min(k, n)
    gpu = gpu_available(cfg)
    index = train_index(vectors, cfg, seed, gpu)
    if gpu and not isinstance(index, faiss.IndexHNSW):
        add(index, vectors)
        return search(faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index), vectors, k)
    ivf = faiss.try_extract_index_ivf(index)
    probes = None if ivf is None else ivf.quantizer.search(vectors, ivf.nprobe)  # (sims, lists), (n, nprobe)
    filled = not isinstance(index if ivf is None else ivf, (faiss.IndexFlat, faiss.IndexIVFFlat))
    if filled:
        add(index, vectors, None if probes is None else probes[1][:, 0])
    order = np.arange(n) if probes is None else np.argsort(probes[1][:, 0], kind="stable")
    refs = [ray.put(faiss.serialize_index(index)), ray.put(vectors), ray.put(probes)]
    del index  # the tasks have their own copies
    shards = np.array_split(order, min(tasks, n))
    pending = [
        _search_shard.remote(*refs, rows, k, cfg, filled, 1, cost.task_clock("search_shard"))
        for rows in shards
    ]
    sims, rows = np.empty((n, k), np.float32), np.empty((n, k), np.int64)
    for shard, s, r in ray.get(pending):
        sims[shard], rows[shard] = s, r
    return sims, rows
