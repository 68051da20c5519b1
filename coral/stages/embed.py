"""embed: run one configured image encoder over the catalog on a Ray Data actor pool.

Output: ``id`` + ``emb_{encoder}`` (float32, L2-normalised). Undecodable images go to ``rejected/``
with a reason, written by the actor that met them (file names derive from the batch, so retries overwrite).
"""

from __future__ import annotations

import hashlib
import posixpath

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from coral import schemas as S
from coral.config import Config, EmbedConfig, EncoderConfig
from coral.errors import ConfigError
from coral.manifest import StageResult
from coral.models import loader
from coral.models.encoders import ENCODER_MODEL_TYPES, ImageEncoder, decode_image
from coral.stages.base import StageContext, count_rejected, count_rows
from coral.storage import Location


class EmbedBatch:
    """Ray Data callable class: the model loads once per actor, each batch is a pure function of its rows."""

    def __init__(self, encoder: EncoderConfig, rejected: Location):
        torch.set_num_threads(max(1, int(encoder.num_cpus)))
        self.encoder = ImageEncoder(encoder)
        self.column = S.embedding_column(encoder.name)
        self.rejected = rejected

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = batch.column(S.ID).to_pylist()
        images, keep, bad = [], [], []
        for row_id, data in zip(ids, batch.column(S.IMAGE).to_pylist(), strict=True):
            try:
                images.append(decode_image(data or b""))
                keep.append(row_id)
            except ValueError as e:
                bad.append({S.ID: row_id, S.REASON: str(e)})
        if bad:
            self._write_rejected(bad)
        emb = self.encoder.encode(images) if images else None
        values = [] if emb is None else list(emb)
        return pa.Table.from_pydict(
            {S.ID: keep, self.column: values}, schema=S.embed_schema(self.encoder.cfg.name)
        )

    def _write_rejected(self, rows: list[dict]) -> None:
        name = hashlib.sha256("\n".join(r[S.ID] for r in rows).encode()).hexdigest()[:16]
        if not self.rejected.is_s3:
            self.rejected.fs.create_dir(self.rejected.path, recursive=True)
        table = pa.Table.from_pylist(rows, schema=S.REJECTED)
        pq.write_table(
            table, posixpath.join(self.rejected.path, f"part-{name}.parquet"), filesystem=self.rejected.fs
        )


class EmbedStage:
    name = "embed"
    inputs = ("catalog",)

    def section(self, config: Config) -> EmbedConfig:
        return config.embed

    def validate(self, config: Config) -> None:
        enc = config.embed.encoder
        kind = loader.model_type(enc.model)  # a missing path fails here, before any stage runs
        if kind not in ENCODER_MODEL_TYPES[enc.kind]:
            raise ConfigError(
                f"embed.encoder: kind '{enc.kind}' needs a model of type {ENCODER_MODEL_TYPES[enc.kind]}, "
                f"but '{enc.model}' is '{kind}'"
            )

    def run(self, ctx: StageContext) -> StageResult:
        enc = ctx.config.embed.encoder
        src, out, rejected = ctx.data("catalog"), ctx.data(self.name), ctx.rejected(self.name)
        ds = ray.data.read_parquet(src.path, filesystem=src.fs, columns=[S.ID, S.IMAGE])
        # small files arrive as one block; batch-sized blocks let every actor in the pool get work
        ds = ds.repartition(target_num_rows_per_block=enc.batch_size)
        ds = ds.map_batches(
            EmbedBatch,
            fn_constructor_kwargs={"encoder": enc, "rejected": rejected},
            compute=ray.data.ActorPoolStrategy(size=enc.num_actors),
            batch_size=enc.batch_size,
            batch_format="pyarrow",
            num_cpus=enc.num_cpus,
            num_gpus=enc.num_gpus,
        )
        ds.write_parquet(out.path, filesystem=out.fs)
        rows_in = ctx.manifest("catalog")["rows_out"]
        rows_out, reasons = count_rows(out), count_rejected(rejected)
        if rows_out + sum(reasons.values()) != rows_in:
            raise RuntimeError(
                f"embed: {rows_in} rows in but {rows_out} written + {sum(reasons.values())} rejected"
            )
        return StageResult(rows_in, rows_out, reasons, details={"encoder": enc.name, "model": enc.model})
