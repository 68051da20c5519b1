"""catalog: the product catalog, one Ray task per shard: the synthetic one (shards of product groups), or
the user's products file (``catalog.source=products``: shards of at most ``products.PER_TASK`` products,
their images read and checked by the tasks; ``coral.catalog.products``).

Units (products): ``rows_in`` counts the file's items, ``rows_out`` products written, ``rows_rejected``
items rejected (``rejected/``: id, reason, image path, position in the file). An image path outside the
file's folder and ``catalog.allowed_image_roots``, or an image that cannot be read, rejects its item only.
"""

from __future__ import annotations

import logging
import posixpath
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from coral import cost, storage
from coral import schemas as S
from coral.catalog import products
from coral.catalog.generate import generate_table, shard_groups
from coral.config import CatalogConfig, Config, Resources, StorageConfig
from coral.errors import ConfigError, UserInputError
from coral.manifest import StageResult
from coral.stages.base import StageContext
from coral.storage import Location

log = logging.getLogger(__name__)


@ray.remote(num_cpus=1)
def write_shard(cfg: CatalogConfig, groups: range, out: Location, index: int, clock=None) -> int:
    cost.task_started(clock)
    table = generate_table(cfg, groups)
    if not out.is_s3:
        out.fs.create_dir(out.path, recursive=True)
    pq.write_table(table, posixpath.join(out.path, f"part-{index:05d}.parquet"), filesystem=out.fs)
    return table.num_rows


@ray.remote(num_cpus=1)
def write_products(
    entries: list[dict],
    root: Location,
    cfg: StorageConfig,
    allowed: tuple[str, ...],
    out: Location,
    index: int,
    clock=None,
) -> tuple[int, list[dict]]:
    cost.task_started(clock)
    rows, rejected = products.product_rows(entries, root, cfg, allowed)
    if rows:
        if not out.is_s3:
            out.fs.create_dir(out.path, recursive=True)
        path = posixpath.join(out.path, f"part-{index:05d}.parquet")
        pq.write_table(products.table(rows), path, filesystem=out.fs)
    return len(rows), rejected


class CatalogStage:
    name = "catalog"

    def inputs(self, config: Config) -> tuple[str, ...]:
        return ()

    def section(self, config: Config) -> CatalogConfig:
        return config.catalog

    def output(self, config: Config) -> pa.Schema:
        return S.CATALOG

    def resources(self, config: Config) -> dict[str, Resources]:
        return {"tasks": Resources(num_actors=config.catalog.num_tasks, num_cpus=1.0)}  # write_shard's

    def validate(self, config: Config) -> None:
        if config.catalog.source == "products" and not config.catalog.products:
            raise ConfigError("catalog.products: catalog.source=products needs the products file")

    def run(self, ctx: StageContext) -> StageResult:
        cfg = ctx.config.catalog
        if cfg.source == "products":
            return self.run_products(ctx)
        out = ctx.data(self.name)
        pending = [
            write_shard.remote(cfg, groups, out, i, cost.task_clock("write_shard"))
            for i, groups in enumerate(shard_groups(cfg))
        ]
        total, rows = len(pending), 0
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            rows += ray.get(done[0])
            log.info("catalog: %d/%d shards written (%d products)", total - len(pending), total, rows)
        return StageResult(rows_in=0, rows_out=rows, details={"shards": total, "groups": cfg.num_groups})

    def run_products(self, ctx: StageContext) -> StageResult:
        cfg = ctx.config.catalog
        files = [("catalog.products", cfg.products, None)]
        if cfg.test_products:
            files.append(("catalog.test_products", cfg.test_products, "test"))
        out, seen, jobs, rejected, count = ctx.data(self.name), {}, [], [], 0
        dropped: Counter[str] = Counter()
        for key, uri, split in files:  # one file after the other; an id is kept once, from its first file
            items, root = products.read_items(uri, ctx.config.storage)
            if split is not None:  # every product of a test file is held out, whatever its item says
                items = [{**o, "split": split} if isinstance(o, dict) else o for o in items]
            entries, bad, info = products.parse_products(items, cfg.seed, cfg.test_fraction, seen)
            count += len(items)
            rejected += [mark(r, key, len(files)) for r in bad]
            dropped.update(info["dropped_attributes"])
            jobs += [(s, root, key) for s in products.shards(entries, cfg.num_tasks)]
        refs = {
            write_products.remote(
                s,
                root,
                ctx.config.storage,
                cfg.allowed_image_roots,
                out,
                i,
                cost.task_clock("write_products"),
            ): key
            for i, (s, root, key) in enumerate(jobs)
        }
        pending, total, rows = list(refs), len(refs), 0
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            n, bad = ray.get(done[0])
            rows, rejected = rows + n, rejected + [mark(r, refs[done[0]], len(files)) for r in bad]
            log.info("catalog: %d/%d product shards read (%d products)", total - len(pending), total, rows)
        rejected.sort(key=lambda r: (r[S.REASON].endswith("(catalog.test_products)"), r[products.ITEM]))
        storage.write_rejected(ctx.rejected(self.name), rejected, products.REJECTED)
        if rows == 0:
            raise UserInputError(
                f"catalog.products: none of the {count} items of {' and '.join(u for _, u, _ in files)} "
                f"could be used (reasons under {ctx.rejected(self.name).uri})"
            )
        reasons = dict(Counter(r[S.REASON] for r in rejected))
        details = {
            "source": "products",
            "products": cfg.products,
            **({"test_products": cfg.test_products} if cfg.test_products else {}),
            "image_root": jobs[0][1].uri,
            "shards": total,
            "dropped_attributes": dict(sorted(dropped.items())),
        }
        return StageResult(count, rows, reasons, details=details)


def mark(rejected: dict, key: str, files: int) -> dict:
    """A rejected product's row; with two files, one from ``catalog.test_products`` says so in its reason
    (its ``item`` is its position in that file)."""
    if files == 1 or key == "catalog.products":
        return rejected
    return {**rejected, S.REASON: f"{rejected[S.REASON]} ({key})"}
