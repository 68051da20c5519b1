"""The retrieval index: a pool embedded with a checkpoint (``EmbedRows`` actors on Ray Data, through the
retriever's features and the one loader), the FAISS index built over it, and its loading, checked.

Used by the index stage (build), the evaluate stage (load, embed queries, a baseline's pool) and Serve
(load). ``load`` checks ``index.faiss`` against the SHA-256 that ``index.json`` records.
"""

from __future__ import annotations

import hashlib

import faiss
import numpy as np
import pyarrow as pa
import ray

from coral import checkpoint, ray_runtime, storage
from coral import schemas as S
from coral.catalog import lookup
from coral.config import Config, IndexStageConfig, StorageConfig
from coral.models import loader, retrievers
from coral.search import knn
from coral.search.embedder import Embedder

EMBEDDING, ROW = "embedding", "row"


class EmbedRows:
    """Ray Data actor: candidate rows (id, title, image bytes) or query rows (triplets, their images
    looked up in the catalog) -> ``key`` and the L2-normalised ``embedding``."""

    def __init__(
        self,
        kind: str,
        model: str,
        role: str,
        storage_cfg: StorageConfig | None = None,
        catalog: list | None = None,
        device: str = "auto",
        dtype: str = "float32",
    ):
        self.embedder = Embedder(model, kind, storage_cfg, device, dtype)
        self.retriever = self.embedder.retriever
        self.role = role
        self.products = lookup.products_from(ray.get(catalog[0])) if catalog else None

    def features(self, rows: list[dict]) -> list[dict]:
        if self.role == "candidate":
            return [self.retriever.candidate(r[S.TITLE], lookup.rgb(r[S.IMAGE])) for r in rows]
        return [retrievers.query_features(self.retriever, r, self.products) for r in rows]

    def __call__(self, batch: pa.Table) -> pa.Table:
        emb = self.embedder(self.features(batch.to_pylist()))
        key = S.ID if self.role == "candidate" else S.QUERY_ID
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), emb.shape[1])
        return pa.table({key: batch[key], EMBEDDING: vectors})


def embed(
    ds: ray.data.Dataset,
    rows: int,
    kind: str,
    model: str,
    role: str,
    cfg: IndexStageConfig,
    storage_cfg: StorageConfig,
    catalog: dict | None = None,
) -> tuple[list[str], np.ndarray]:
    """(keys, (n, d) embeddings) of ``ds``'s rows, in key order."""
    per_block = min(max(cfg.batch_size, -(-rows // (4 * cfg.num_actors))), 8 * cfg.batch_size)
    kwargs = {
        "kind": kind,
        "model": model,
        "role": role,
        "storage_cfg": storage_cfg,
        "catalog": [ray.put(catalog)] if catalog is not None else None,
        "device": cfg.device,
        "dtype": cfg.dtype,
    }
    ds = ds.repartition(target_num_rows_per_block=per_block)
    out = ray_runtime.actor_pool(ds, EmbedRows, cfg, cfg.batch_size, kwargs)
    tables = [t for t in ray.get(out.to_arrow_refs()) if t.num_rows]
    key = S.ID if role == "candidate" else S.QUERY_ID
    table = pa.concat_tables(tables).sort_by(key) if tables else None
    if table is None or table.num_rows != rows:
        raise RuntimeError(f"embedded {0 if table is None else table.num_rows} of {rows} {role} rows")
    emb = np.asarray(table[EMBEDDING].combine_chunks().flatten(), dtype=np.float32).reshape(rows, -1)
    return table[key].to_pylist(), emb


def model_of(config: Config, root: storage.Location) -> tuple[str, str]:
    """(checkpoint uri, retriever kind) the index and evaluate stages embed with."""
    cfg = config.index
    if cfg.model == "train":
        return root.child("train", "model").uri, config.train.model
    return (cfg.model if cfg.model.startswith("s3://") else resolve_model(cfg.model)), cfg.kind


def resolve_model(ref: str) -> str:
    return loader.resolve(ref)


def build(embeddings: np.ndarray, cfg: IndexStageConfig) -> faiss.Index:
    """The configured index over the candidates, on CPU (written to storage; GPU search copies it)."""
    return knn.build_index(embeddings, cfg.index)


def load(index_dir: storage.Location, cfg: IndexStageConfig) -> tuple[faiss.Index, dict, pa.Table]:
    """(the index, its metadata, the candidate table in row order), GPU-resident when one is available."""
    meta = checkpoint.read_index_meta(index_dir)
    data = storage.read_bytes(index_dir.child("index.faiss"))
    checkpoint.check_index_digest(meta, hashlib.sha256(data).hexdigest(), index_dir.uri)
    index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    knn.set_search_params(index, cfg.index)
    if knn.gpu_available(cfg.index) and not isinstance(index, faiss.IndexHNSW):
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    data = index_dir.child("data")
    table = storage.read_dataset(data).sort_by(ROW)
    return index, meta, table
