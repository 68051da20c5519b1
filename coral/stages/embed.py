"""embed: every configured encoder over every image, each encoder a Ray Data actor pool.

Source: the catalog stage's table, or a folder / ``s3://`` prefix of images with an optional captions
file. One actor pool per encoder appends its column ``emb_{name}`` (float32, L2-normalised); the model loads
once per actor. Each encoder reads what it needs (decodes the image or takes the caption); a row it
cannot read goes to ``rejected/`` with the reason and on to no later encoder.
"""

from __future__ import annotations

import json
import posixpath

import numpy as np
import pyarrow as pa
import ray

from coral import ray_runtime, storage
from coral import schemas as S
from coral.catalog import lookup
from coral.config import Config, EmbedConfig, EncoderConfig, Resources
from coral.errors import ConfigError
from coral.images import decode_image
from coral.manifest import StageResult
from coral.models import encoders as enc_models
from coral.models import loader
from coral.models.encoders import sentence_transformers_pooling
from coral.models.kinds import ENCODER_KINDS
from coral.stages.base import StageContext, count_rejected, count_rows
from coral.storage import Location

COLUMNS = [S.ID, S.IMAGE, S.CAPTION, S.SPLIT]


class EncodeBatch:
    """Ray Data callable class: one or more encoders that share a model (``encoders.shared_pools``),
    loaded once per actor; appends ``emb_{name}`` for each, in order, each encoding in its own batch size.

    Each encoder reads what it needs (decodes the image, or takes the caption) and drops the rows it
    cannot read, writing them to ``rejected`` with the reason, so later encoders never see them and each
    image is decoded once per image encoder, with no separate validation pass."""

    def __init__(self, encoders: list[EncoderConfig], max_pixels: int, rejected: Location):
        import torch  # only encoder actors pay for torch and transformers

        torch.set_num_threads(max(1, int(encoders[0].num_cpus)))
        loaded: dict = {}
        self.encoders = [
            (enc_models.build(e, loaded), S.embedding_column(e.name), e.batch_size) for e in encoders
        ]
        self.max_pixels, self.rejected = max_pixels, rejected

    def _read(self, encoder, batch: pa.Table) -> tuple[list, list[int], list[dict]]:
        items, keep, bad = [], [], []
        ids = batch.column(S.ID).to_pylist()
        if encoder.modality == "image":
            for i, data in enumerate(batch.column(S.IMAGE).to_pylist()):
                try:
                    items.append(decode_image(data, self.max_pixels))
                    keep.append(i)
                except ValueError as e:
                    bad.append({S.ID: ids[i], S.REASON: str(e)})
        else:
            for i, caption in enumerate(batch.column(S.CAPTION).to_pylist()):
                if (caption or "").strip():
                    items.append(caption.strip())
                    keep.append(i)
                else:
                    bad.append({S.ID: ids[i], S.REASON: "empty caption"})
        return items, keep, bad

    def __call__(self, batch: pa.Table) -> pa.Table:
        bad: list[dict] = []
        for encoder, column, size in self.encoders:
            items, keep, dropped = self._read(encoder, batch)
            if dropped:
                bad += dropped
                batch = batch.take(pa.array(keep, pa.int64()))
            parts = [encoder.encode(items[i : i + size]) for i in range(0, len(items), size)]
            emb = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)  # (B, D)
            offsets = pa.array(np.arange(len(emb) + 1, dtype=np.int32) * emb.shape[1])
            batch = batch.append_column(column, pa.ListArray.from_arrays(offsets, pa.array(emb.ravel())))
        if bad:
            storage.write_rejected(self.rejected, bad)
        return batch


def image_id(path: str, root: str) -> str:
    """A file's id: its path under the source root without the extension."""
    return posixpath.splitext(posixpath.relpath(path, root))[0]


def image_rows(batch: pa.Table, root: str, captions: dict[str, str]) -> pa.Table:
    """read_binary_files rows -> embed input rows (captions looked up by id, then by relative path)."""
    ids, caps = [], []
    for path in batch.column("path").to_pylist():
        ids.append(image_id(path, root))
        caps.append(captions.get(ids[-1], captions.get(posixpath.relpath(path, root), "")))
    return pa.table(
        {S.ID: ids, S.IMAGE: batch.column("bytes"), S.CAPTION: caps, S.SPLIT: ["train"] * len(ids)},
        schema=pa.schema([(c, S.CATALOG.field(c).type) for c in COLUMNS]),
    )


def load_captions(uri: str, cfg: Config) -> dict[str, str]:
    """A JSONL or Parquet file with ``caption`` and ``id`` (or ``path``) per row -> {id or path: caption}."""
    loc = storage.resolve(uri, cfg.storage)
    try:
        if uri.endswith(".parquet"):
            rows = storage.read_table(loc).to_pylist()
        else:
            rows = [
                json.loads(line) for line in storage.read_bytes(loc).decode().splitlines() if line.strip()
            ]
    except (OSError, ValueError) as e:
        raise ConfigError(f"embed.images.captions: cannot read {uri}: {type(e).__name__}: {e}") from None
    out = {}
    for n, row in enumerate(rows, 1):
        key = row.get("id") or row.get("path")
        if key is None or "caption" not in row:
            raise ConfigError(f"embed.images.captions: {uri} row {n} needs 'caption' and 'id' or 'path'")
        out[str(key)] = str(row["caption"] or "")
    return out


class EmbedStage:
    name = "embed"

    def inputs(self, config: Config) -> tuple[str, ...]:
        return ("catalog",) if config.embed.source == "catalog" else ()

    def section(self, config: Config) -> EmbedConfig:
        return config.embed

    def output(self, config: Config) -> pa.Schema:
        vectors = [(S.embedding_column(e.name), pa.list_(pa.float32())) for e in config.embed.encoders]
        return pa.schema([(S.ID, pa.string()), (S.SPLIT, pa.string()), *vectors])

    def resources(self, config: Config) -> dict[str, Resources]:
        return {e.name: e for e in config.embed.encoders}

    def validate(self, config: Config) -> None:
        for enc in config.embed.encoders:
            kind = loader.model_type(enc.model)  # a missing path fails here, before any stage runs
            if enc.kind == "sentence_transformers":
                sentence_transformers_pooling(loader.resolve(enc.model))  # unsupported pooling: fail now
            accepted = ENCODER_KINDS[enc.kind][1]
            if accepted is not None and kind not in accepted:
                raise ConfigError(
                    f"embed.encoders[{enc.name}]: kind '{enc.kind}' needs a model of type {accepted}, "
                    f"but '{enc.model}' is '{kind}'"
                )

    def _source(self, ctx: StageContext) -> tuple[ray.data.Dataset, int]:
        cfg = ctx.config.embed
        if cfg.source == "catalog":
            src = lookup.location(ctx.root)  # streamed by Ray Data
            ds = ray.data.read_parquet(src.path, filesystem=src.fs, columns=COLUMNS)
            return ds, ctx.manifest("catalog")["rows_out"]
        src = storage.resolve(cfg.images.uri, ctx.config.storage)
        files = [p for p in storage.list_files(src) if p.rsplit(".", 1)[-1].lower() in cfg.images.extensions]
        if not files:
            raise ConfigError(f"embed.images.uri: no image files under {src.uri}")
        ids: dict[str, str] = {}
        for path in files:
            rel = posixpath.relpath(path, src.path)
            other = ids.setdefault(image_id(path, src.path), rel)
            if other != rel:
                raise ConfigError(f"embed.images.uri: {other} and {rel} under {src.uri} would share one id")
        captions = load_captions(cfg.images.captions, ctx.config) if cfg.images.captions else {}
        ds = ray.data.read_binary_files(files, filesystem=src.fs, include_paths=True)
        ds = ds.map_batches(
            image_rows, fn_kwargs={"root": src.path, "captions": captions}, batch_format="pyarrow"
        )
        return ds, len(files)

    def run(self, ctx: StageContext) -> StageResult:
        cfg = ctx.config.embed
        out, rejected = ctx.data(self.name), ctx.rejected(self.name)
        ds, rows_in = self._source(ctx)
        # small inputs arrive as one block: split them so that every actor of a pool gets a few blocks,
        # each one to eight batches long
        actors = max(e.num_actors for e in cfg.encoders)
        batch = min(e.batch_size for e in cfg.encoders)
        per_block = min(max(batch, -(-rows_in // (4 * actors))), 8 * batch)
        ds = ds.repartition(target_num_rows_per_block=per_block)
        for pool in enc_models.shared_pools(cfg.encoders):
            kwargs = {"encoders": pool, "max_pixels": cfg.max_image_pixels, "rejected": rejected}
            batch = max(e.batch_size for e in pool)
            ds = ray_runtime.actor_pool(ds, EncodeBatch, pool[0], batch, kwargs)
        ds = ds.select_columns([S.ID, S.SPLIT, *(S.embedding_column(e.name) for e in cfg.encoders)])
        ds.write_parquet(out.path, filesystem=out.fs)
        rows_out, reasons = count_rows(out), count_rejected(rejected)
        if rows_out + sum(reasons.values()) != rows_in:
            raise RuntimeError(
                f"embed: {rows_in} rows in but {rows_out} written + {sum(reasons.values())} rejected"
            )
        return StageResult(rows_in, rows_out, reasons, details={"encoders": [e.name for e in cfg.encoders]})
