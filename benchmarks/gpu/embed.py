"""gpu_embed: the embed stage vs a tight loop, a CLIP of the size (ViT-L/14 at full size) on JPEG bytes
(``bench_gpu.embed``)."""

from __future__ import annotations

from pathlib import Path

from benchmarks import bench_gpu
from benchmarks.gpu.part import main, start_ray
from benchmarks.gpu.sizes import Size


def run(size: Size, work: Path, out: Path) -> None:
    start_ray()
    bench_gpu.embed(
        str(work / "embed"), size.images, size.clip, size.device, "gpu_embed", size.embed_batch, out
    )


if __name__ == "__main__":
    main("embed", run)
