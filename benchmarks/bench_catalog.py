"""Catalog generation: the catalog stage (Ray tasks writing Parquet) vs one in-process generator loop
over the same products. Figure: products/s, ratio = stage / single process."""

from __future__ import annotations

import tempfile

from benchmarks.common import PeakRSS, start_ray, timed, write_result
from coral import graph
from coral.catalog.generate import generate_table
from coral.config import load_config

GROUPS, VARIANTS = 3000, 3


def main() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            None,
            [
                f"run.run_root={tmp}/run",
                "run.stages=[catalog]",
                f"catalog.num_groups={GROUPS}",
                f"catalog.variants_per_group={VARIANTS}",
                "catalog.num_tasks=4",
            ],
        )
        n = GROUPS * VARIANTS
        base_s, table = timed(generate_table, cfg.catalog, range(GROUPS))
        assert table.num_rows == n
        with PeakRSS() as mem:
            stage_s, rows = timed(graph.run_graph, cfg)
        assert rows[0].rows_out == n
    return write_result(
        "catalog_generation",
        value=n / stage_s,
        unit="products/s",
        baseline={"what": "generate_table in one process, no storage", "value": round(n / base_s, 3)},
        goal={
            "bar": 1.0,
            "direction": "higher",
            "meaning": "the Ray stage, Parquet writes included, is no slower than one process",
        },
        products=n,
        image_size=cfg.catalog.image_size,
        tasks=cfg.catalog.num_tasks,
        seconds={"stage": round(stage_s, 3), "baseline": round(base_s, 3)},
        peak_rss_gib=mem.peak_gib,
    )


if __name__ == "__main__":
    start_ray()
    main()
