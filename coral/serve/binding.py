"""What the retriever's replicas check and read when they start, apart from Serve: the checkpoint/index
binding the app was built with (checked again in each replica: one may start long after the app was
built), the candidate pool's ids and products (read from storage, never deployment arguments), and the
``IndexTable`` (the FAISS index and its candidate table) that an index or encoder replica searches.
"""

from __future__ import annotations

import numpy as np

from coral import checkpoint, storage
from coral import schemas as S
from coral.catalog import lookup
from coral.config import Config, IndexStageConfig, StorageConfig
from coral.search import index as search_index
from coral.search import knn


def pool_ids(index_dir: storage.Location) -> list[str]:
    """The candidate pool's product ids (the index's rows)."""
    data = index_dir.child("data")
    return storage.read_dataset(data, columns=[S.ID])[S.ID].to_pylist()


def pool_products(config: Config, index_dir: storage.Location) -> dict:
    """id, title and image columns of the candidate pool's products (for product parts)."""
    run_root = storage.resolve(config.run.run_root, config.storage)
    return lookup.columns(lookup.read(run_root, ids=pool_ids(index_dir)))


def bound_checkpoint(config: Config, meta: dict, index_dir: storage.Location) -> checkpoint.Checkpoint:
    """The checkpoint to serve, checked against the index: refuses a pair that does not belong together."""
    built = meta["checkpoint"]
    uri = config.serve.checkpoint or built["uri"]
    ckpt = checkpoint.describe(uri, built["kind"], config.storage)
    checkpoint.check_bound(meta, ckpt, index_dir.uri)
    return ckpt


def binding(meta: dict, ckpt: checkpoint.Checkpoint) -> dict:
    """What a replica checks again when it starts: the checkpoint's content hash and the index file's."""
    return {"checkpoint": ckpt.hash, "index_sha256": meta.get("index_sha256")}


def same_index(meta: dict, bound: dict, where: str) -> None:
    """``index.json`` still names the index file and checkpoint the app was built with."""
    now = {"checkpoint": meta["checkpoint"]["hash"], "index_sha256": meta.get("index_sha256")}
    if now != bound:
        raise checkpoint.IndexMismatch(
            f"the index at {where} changed since this app was built (it was built with checkpoint "
            f"{bound['checkpoint']} and index file sha256 {bound['index_sha256']}; {checkpoint.INDEX_META} "
            f"now names {now['checkpoint']} and {now['index_sha256']}); redeploy the app"
        )


def check_binding(config: Config, index_dir: storage.Location, bound: dict) -> checkpoint.Checkpoint:
    """In a replica as it starts: the index is still the one the app was built with, and the checkpoint
    at the path is still the one that built it (hashed again, not trusted)."""
    meta = checkpoint.read_index_meta(index_dir)
    same_index(meta, bound, index_dir.uri)
    return bound_checkpoint(config, meta, index_dir)


class IndexTable:
    """The FAISS index and its candidate table (row -> id, title). ``bound``: the checkpoint and index the
    app was built with; an index that is not that one any more refuses to load."""

    def __init__(self, index_uri: str, storage_cfg: StorageConfig, index_cfg: IndexStageConfig, bound: dict):
        index_dir = storage.resolve(index_uri, storage_cfg)
        self.index, meta, table = search_index.load(index_dir, index_cfg)  # checks index.faiss's SHA-256
        same_index(meta, bound, index_dir.uri)
        self.ids, self.titles = table[S.ID].to_pylist(), table[S.TITLE].to_pylist()

    def search_many(self, vectors: np.ndarray, ks: list[int]) -> list[list[dict]]:
        """One FAISS search for a batch of query vectors; row i keeps its own top ``ks[i]``."""
        k = min(max(ks), len(self.ids))
        scores, rows = knn.search(self.index, np.ascontiguousarray(vectors, dtype=np.float32), k)
        return [
            [
                {"rank": r + 1, "id": self.ids[i], "score": float(s), "title": self.titles[i] or ""}
                for r, (i, s) in enumerate(zip(row[:want], score[:want], strict=True))
                if i >= 0
            ]
            for row, score, want in zip(rows, scores, ks, strict=True)
        ]
