"""index: the candidate pool embedded with a checkpoint, and a FAISS index bound to that checkpoint.

Candidates are the catalog's products (``index.candidates``: the held-out ``test`` ones, or ``all``),
embedded by ``EmbedRows`` actors (Ray Data) through the retriever's ``candidate`` features and the one
loader. Written under ``{run_root}/index/``: ``index.faiss`` (the serialised index, row i = candidate
table row i), ``index.json`` (the checkpoint's uri, kind, content hash and embedding size; the index spec
and count; the SHA-256 of ``index.faiss``, checked whenever it is loaded) and ``data/`` (the candidate table: row, id, title, class, language, embedding). Whoever
searches the index checks the checkpoint it embeds with against ``index.json``
(``checkpoint.check_bound``).
"""

from __future__ import annotations

import hashlib
import io

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import ray

from coral import checkpoint, ray_runtime, storage
from coral import schemas as S
from coral.config import Config, IndexStageConfig, StorageConfig
from coral.errors import ConfigError
from coral.manifest import StageResult
from coral.mining import knn
from coral.stages.base import StageContext

EMBEDDING, ROW = "embedding", "row"
CANDIDATE_COLUMNS = [S.ID, S.TITLE, S.CLASS, S.LANGUAGE]


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
        from coral.embedder import Embedder
        from coral.train import step

        self.embedder = Embedder(model, kind, storage_cfg, device, dtype)
        self.retriever = self.embedder.retriever
        self.role, self.step = role, step
        self.products = step.products_from(ray.get(catalog[0])) if catalog else None

    def features(self, rows: list[dict]) -> list[dict]:
        from PIL import Image

        if self.role == "candidate":
            return [
                self.retriever.candidate(r[S.TITLE], Image.open(io.BytesIO(r[S.IMAGE])).convert("RGB"))
                for r in rows
            ]
        return [self.step.query_features(self.retriever, r, self.products) for r in rows]

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
    out = ds.repartition(target_num_rows_per_block=per_block).map_batches(
        EmbedRows,
        fn_constructor_kwargs={
            "kind": kind,
            "model": model,
            "role": role,
            "storage_cfg": storage_cfg,
            "catalog": [ray.put(catalog)] if catalog is not None else None,
            "device": cfg.device,
            "dtype": cfg.dtype,
        },
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        **ray_runtime.remote_args(cfg.num_cpus, cfg.num_gpus, cfg.accelerator_type),
    )
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
    from coral.models import loader

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


class IndexStage:
    name = "index"

    def inputs(self, config: Config) -> tuple[str, ...]:
        return ("catalog", "train") if config.index.model == "train" else ("catalog",)

    def section(self, config: Config) -> IndexStageConfig:
        return config.index

    def validate(self, config: Config) -> None:
        if config.index.model != "train" and not config.index.model.startswith("s3://"):
            resolve_model(config.index.model)

    def run(self, ctx: StageContext) -> StageResult:
        cfg = ctx.config.index
        uri, kind = model_of(ctx.config, ctx.root)
        ckpt = checkpoint.describe(uri, kind, ctx.config.storage)
        src = ctx.data("catalog")
        columns = [*CANDIDATE_COLUMNS, S.IMAGE, S.SPLIT]
        dataset = pads.dataset(src.path, filesystem=src.fs, format="parquet")
        where = pc.field(S.SPLIT) == "test" if cfg.candidates == "test" else None
        rows = storage.read_retried(src, lambda: dataset.count_rows(filter=where))
        if rows == 0:
            raise ConfigError(
                f"index.candidates={cfg.candidates}: the catalog at {src.uri} has no such products"
            )
        ds = ray.data.read_parquet(src.path, filesystem=src.fs, columns=columns)
        if where is not None:
            ds = ds.map_batches(_is_test, batch_format="pyarrow")
        ids, emb = embed(ds, rows, kind, uri, "candidate", cfg, ctx.config.storage)
        index = build(emb, cfg)
        spec = knn.index_spec(cfg.index, len(ids), emb.shape[1])
        out = ctx.stage_dir(self.name)
        data = faiss.serialize_index(index).tobytes()
        storage.write_bytes(out.child("index.faiss"), data)
        meta = checkpoint.index_meta(ckpt, spec, len(ids), data)
        storage.write_json(out.child(checkpoint.INDEX_META), meta)
        info = storage.read_dataset(src, columns=CANDIDATE_COLUMNS, filter=where)
        order = pc.sort_indices(info, [(S.ID, "ascending")])
        info = info.take(order)
        if info[S.ID].to_pylist() != ids:
            raise RuntimeError("index: the embedded candidates are not the catalog's (duplicate ids?)")
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), emb.shape[1])
        table = info.append_column(EMBEDDING, vectors).add_column(
            0, ROW, pa.array(range(len(ids)), pa.int64())
        )
        storage.write_parquet(ctx.data(self.name).child("part-00000.parquet"), table)
        return StageResult(rows, len(ids), {}, details={**meta, "candidates": cfg.candidates})


def _is_test(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.equal(batch[S.SPLIT], "test"))
