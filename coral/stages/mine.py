"""mine: MegaPairs pair mining over the embed stage's table.

Each configured split is mined among itself (``mine.splits``, train and test by default: the held-out
images get pairs among held-out images only, for evaluation, and a pair or hard negative never crosses
splits). Per split and encoder: a FAISS index over that split's rows, top-k for every row (queries spread
over Ray tasks), pairs inside that encoder's similarity band. Then the union across encoders, a cap per
query, and hard negatives for the kept pairs; every pair carries its split. Units in the manifest: ``rows_in`` counts query images
(rows of the mined splits), ``rows_out`` counts pairs, ``rows_rejected`` counts query images left without
any pair (recorded in ``rejected/``).
Statistics (pairs per encoder, overlap, similarity histograms per split) go to the manifest, and as
figures under ``stats/``: ``sims_{split}_{encoder}.png`` (each histogram, the band shaded) and
``pairs.png`` (pairs per encoder and split; the kept pairs by the encoders that found them).
"""

from __future__ import annotations

import posixpath
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from coral import schemas as S
from coral import storage
from coral.config import Config, MineConfig, Resources
from coral.errors import ConfigError
from coral.manifest import StageResult
from coral.mining import pairs, plots
from coral.search import knn
from coral.stages.base import StageContext, as_matrix

CHUNK = 200_000  # pairs per Parquet file


def encoder_names(config: Config) -> list[str]:
    embedded = [e.name for e in config.embed.encoders]
    return list(config.mine.encoders) or embedded


class MineStage:
    name = "mine"

    def inputs(self, config: Config) -> tuple[str, ...]:
        return ("embed",)

    def section(self, config: Config) -> MineConfig:
        return config.mine

    def output(self, config: Config) -> pa.Schema:
        return S.PAIRS

    def resources(self, config: Config) -> dict[str, Resources]:
        return {}  # FAISS in the driver (and Ray tasks for sharded searches, one CPU each)

    def validate(self, config: Config) -> None:
        embedded = {e.name for e in config.embed.encoders}
        for name in [*config.mine.encoders, *config.mine.bands]:
            if name not in embedded:
                raise ConfigError(f"mine: encoder '{name}' is not one of embed.encoders ({sorted(embedded)})")

    def run(self, ctx: StageContext) -> StageResult:
        cfg, names = ctx.config.mine, encoder_names(ctx.config)
        src = ctx.data("embed")
        table = storage.read_table(src, columns=[S.ID, S.SPLIT, *map(S.embedding_column, names)])
        total = table.num_rows
        table = table.filter(pc.is_in(table.column(S.SPLIT), pa.array(list(cfg.splits)))).sort_by(S.ID)
        if table.num_rows < 2:
            raise ConfigError(
                f"mine: {table.num_rows} rows in splits {list(cfg.splits)}; at least 2 are needed"
            )
        stats = {"rows": table.num_rows, "rows_outside_splits": total - table.num_rows, "splits": {}}
        stats["encoders"] = {n: {"band": list(cfg.band_for(n)), "pairs_in_band": 0} for n in names}
        kept, lonely = [], []
        for split in cfg.splits:  # each split among itself: a pair never crosses splits
            part = table.filter(pc.equal(table.column(S.SPLIT), split))
            ids = part.column(S.ID).to_pylist()
            if len(ids) < 2:
                stats["splits"][split] = {"rows": len(ids), "pairs": 0}
                lonely += [{S.ID: i, S.REASON: f"alone in split {split}"} for i in ids]
                continue
            got, split_stats = self._mine(ctx, part, ids, names, split)
            kept += [(split, ids, p) for p in got]
            with_pairs = {p.query for p in got}
            lonely += [
                {S.ID: ids[i], S.REASON: "no neighbour inside any band"}
                for i in range(len(ids))
                if i not in with_pairs
            ]
            stats["splits"][split] = split_stats
            for n in names:
                stats["encoders"][n]["pairs_in_band"] += split_stats["encoders"][n]["pairs_in_band"]
        stats["pairs_by_encoders"] = pairs.overlap([p for _, _, p in kept])
        figure = plots.pairs_png(stats["splits"], stats["pairs_by_encoders"])
        storage.write_bytes(ctx.stage_dir(self.name).child("stats", "pairs.png"), figure)
        self._write(ctx, kept)
        storage.write_rejected(ctx.rejected(self.name), lonely)
        stats["queries_with_pairs"] = table.num_rows - len(lonely)
        reasons = dict(Counter(r[S.REASON] for r in lonely))
        return StageResult(table.num_rows, len(kept), reasons, stats)

    def _mine(self, ctx: StageContext, part: pa.Table, ids: list[str], names: list[str], split: str):
        """One split's pairs (rows index ``ids``) and its statistics."""
        cfg = ctx.config.mine
        per_encoder, neighbours, stats = {}, {}, {"rows": len(ids), "encoders": {}}
        for name in names:
            vectors = as_matrix(part.column(S.embedding_column(name)))
            k = min(cfg.k + 1, len(ids))  # +1: itself
            sims, rows = knn.knn(vectors, k, cfg.index, cfg.query_tasks, cfg.seed)
            band = cfg.band_for(name)
            per_encoder[name] = pairs.mine_encoder(sims, rows, band)
            neighbours[name] = (sims, rows, band[1])
            not_self = (rows >= 0) & (rows != np.arange(len(rows))[:, None])
            values = sims[not_self]
            lo = float(np.floor(values.min() * 20) / 20) if values.size else -1.0
            hi = max(1.0, float(values.max())) if values.size else 1.0  # float error can exceed 1
            counts, edges = plots.histogram(values, lo=min(lo, band[0] - 0.05), hi=hi)
            storage.write_bytes(
                ctx.stage_dir(self.name).child("stats", f"sims_{split}_{name}.png"),
                plots.histogram_png(
                    counts,
                    edges,
                    band,
                    f"{name} ({split}): similarity of top-{cfg.k} neighbours",
                    len(per_encoder[name]),
                ),
            )
            stats["encoders"][name] = {
                "band": list(band),
                "index": knn.index_spec(cfg.index, len(ids), vectors.shape[1], knn.gpu_available(cfg.index)),
                "pairs_in_band": len(per_encoder[name]),
                "histogram": {"counts": counts, "edges": edges},
            }
        kept = pairs.union(per_encoder, cfg.max_pairs_per_query, neighbours, cfg.hard_negatives)
        stats["pairs"] = len(kept)
        return kept, stats

    def _write(self, ctx: StageContext, kept: list[tuple[str, list[str], pairs.Pair]]) -> None:
        out = ctx.data(self.name)
        if not out.is_s3:
            out.fs.create_dir(out.path, recursive=True)
        for n, start in enumerate(range(0, max(len(kept), 1), CHUNK)):
            chunk = kept[start : start + CHUNK]
            table = pa.table(
                {
                    S.QUERY_ID: [ids[p.query] for _, ids, p in chunk],
                    S.TARGET_ID: [ids[p.target] for _, ids, p in chunk],
                    S.ENCODERS: [p.encoders for _, _, p in chunk],
                    S.SIMILARITIES: [p.similarities for _, _, p in chunk],
                    S.HARD_NEGATIVE_IDS: [[ids[h] for h in p.hard_negatives] for _, ids, p in chunk],
                    S.SPLIT: [split for split, _, _ in chunk],
                },
                schema=S.PAIRS,
            )
            pq.write_table(table, posixpath.join(out.path, f"pairs-{n:05d}.parquet"), filesystem=out.fs)
