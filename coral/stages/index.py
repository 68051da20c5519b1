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

import faiss
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import ray

from coral import checkpoint, storage
from coral import schemas as S
from coral.catalog import lookup
from coral.config import Config, IndexStageConfig, Resources
from coral.errors import ConfigError
from coral.manifest import StageResult
from coral.search import index as search_index
from coral.search import knn
from coral.stages.base import StageContext

CANDIDATE_COLUMNS = [S.ID, S.TITLE, S.CLASS, S.LANGUAGE]


class IndexStage:
    name = "index"

    def inputs(self, config: Config) -> tuple[str, ...]:
        return ("catalog", "train") if config.index.model == "train" else ("catalog",)

    def section(self, config: Config) -> IndexStageConfig:
        return config.index

    def output(self, config: Config) -> pa.Schema:
        columns = [
            (S.ID, pa.string()),
            (S.TITLE, pa.string()),
            (search_index.EMBEDDING, pa.list_(pa.float32())),
        ]
        return pa.schema([(search_index.ROW, pa.int64()), *columns])

    def resources(self, config: Config) -> dict[str, Resources]:
        return {"embed": config.index}

    def validate(self, config: Config) -> None:
        if config.index.model != "train" and not config.index.model.startswith("s3://"):
            search_index.resolve_model(config.index.model)

    def run(self, ctx: StageContext) -> StageResult:
        cfg = ctx.config.index
        uri, kind = search_index.model_of(ctx.config, ctx.root)
        ckpt = checkpoint.describe(uri, kind, ctx.config.storage)
        src = lookup.location(ctx.root)  # streamed by Ray Data
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
        ids, emb = search_index.embed(ds, rows, kind, uri, "candidate", cfg, ctx.config.storage)
        index = search_index.build(emb, cfg)
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
        table = info.append_column(search_index.EMBEDDING, vectors).add_column(
            0, search_index.ROW, pa.array(range(len(ids)), pa.int64())
        )
        storage.write_parquet(ctx.data(self.name).child("part-00000.parquet"), table)
        return StageResult(rows, len(ids), {}, details={**meta, "candidates": cfg.candidates})


def _is_test(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.equal(batch[S.SPLIT], "test"))
