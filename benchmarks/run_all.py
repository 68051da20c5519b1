"""``make bench``: run every benchmark in one process with one local Ray; results in benchmarks/results/."""

from __future__ import annotations

import logging

from benchmarks import (
    bench_annotate,
    bench_catalog,
    bench_commands,
    bench_embed,
    bench_gpu,
    bench_index,
    bench_knn,
    bench_plan,
    bench_serve,
    bench_train,
)
from benchmarks.common import start_ray


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    start_ray()
    for bench in (
        bench_catalog,
        bench_embed,
        bench_knn,
        bench_annotate,
        bench_train,
        bench_index,
        bench_serve,
        bench_plan,
        bench_gpu,
        bench_commands,  # make demo (and make test with BENCH_MAKE_TEST=1) in their own processes
    ):
        bench.main()  # bench_gpu skips itself without CUDA


if __name__ == "__main__":
    main()
