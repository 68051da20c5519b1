"""``make bench``: run every benchmark in one process with one local Ray; results in benchmarks/results/."""

from __future__ import annotations

import logging

from benchmarks import bench_catalog, bench_embed, bench_knn


def start_ray() -> None:
    from coral import ray_runtime
    from coral.config import RayConfig

    ray_runtime.connect(RayConfig(num_cpus=4, include_dashboard=False))


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    start_ray()
    for bench in (bench_catalog, bench_embed, bench_knn):
        bench.main()


if __name__ == "__main__":
    main()
