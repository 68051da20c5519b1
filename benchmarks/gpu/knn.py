"""gpu_knn: faiss-gpu kNN over the size's clustered vectors (1M at full size) vs the CPU path
(``bench_gpu.knn_gpu``)."""

from __future__ import annotations

from pathlib import Path

from benchmarks import bench_gpu
from benchmarks.gpu.part import Skipped, main, start_ray
from benchmarks.gpu.sizes import Size


def run(size: Size, work: Path, out: Path) -> None:
    if size.device == "cuda" and not bench_gpu.faiss_gpu():
        raise Skipped("faiss-gpu or a GPU is missing: pip uninstall faiss-cpu, then pip install .[gpu]")
    start_ray()
    bench_gpu.knn_gpu(size.knn_vectors, "gpu_knn", out)


if __name__ == "__main__":
    main("knn", run)
