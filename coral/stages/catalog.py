"""catalog: generate the synthetic product catalog, one Ray task per shard of product groups."""

from __future__ import annotations

import logging
import posixpath

import pyarrow.parquet as pq
import ray

from coral.catalog.generate import generate_table, shard_groups
from coral.config import CatalogConfig, Config
from coral.manifest import StageResult
from coral.stages.base import StageContext
from coral.storage import Location

log = logging.getLogger(__name__)


@ray.remote(num_cpus=1)
def write_shard(cfg: CatalogConfig, groups: range, out: Location, index: int) -> int:
    table = generate_table(cfg, groups)
    if not out.is_s3:
        out.fs.create_dir(out.path, recursive=True)
    pq.write_table(table, posixpath.join(out.path, f"part-{index:05d}.parquet"), filesystem=out.fs)
    return table.num_rows


class CatalogStage:
    name = "catalog"

    def inputs(self, config: Config) -> tuple[str, ...]:
        return ()

    def section(self, config: Config) -> CatalogConfig:
        return config.catalog

    def validate(self, config: Config) -> None:
        pass

    def run(self, ctx: StageContext) -> StageResult:
        cfg = ctx.config.catalog
        out = ctx.data(self.name)
        pending = [write_shard.remote(cfg, groups, out, i) for i, groups in enumerate(shard_groups(cfg))]
        total, rows = len(pending), 0
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            rows += ray.get(done[0])
            log.info("catalog: %d/%d shards written (%d products)", total - len(pending), total, rows)
        return StageResult(rows_in=0, rows_out=rows, details={"shards": total, "groups": cfg.num_groups})
