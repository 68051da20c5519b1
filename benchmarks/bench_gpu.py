"""GPU benchmarks (run on a CUDA machine; ``make bench`` skips them on CPU; ``make gpu-check`` runs them
with the other GPU figures, see ``benchmarks.gpu_check``):

- embed stage vs a tight loop with a ViT-L/14-size CLIP (random init), bf16, on JPEG bytes: images/s;
- FAISS kNN on the GPU (faiss-gpu, ``pip install .[gpu]``) over 1M clustered 256-d vectors vs the CPU path.

    python -m benchmarks.bench_gpu            # both
    BENCH_GPU_IMAGES=200 BENCH_GPU_DEVICE=cpu BENCH_GPU_SMALL=1 python -m benchmarks.bench_gpu   # smoke run
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import faiss
import numpy as np
import torch
from PIL import Image

from benchmarks.bench_knn import D, K, N, clustered
from benchmarks.common import PeakGPU, PeakRSS, start_ray, timed, write_result
from coral import graph
from coral.catalog.generate import generate_table
from coral.config import CatalogConfig, IndexConfig, load_config
from coral.images import decode_image
from coral.models import encoders
from coral.search import knn
from coral.testing.tiny import build_clip

DEVICE = os.environ.get("BENCH_GPU_DEVICE", "cuda")
IMAGES = int(os.environ.get("BENCH_GPU_IMAGES", "20000"))
BATCH = 256
VIT_L14 = dict(image_size=224, hidden=1024, layers=24, patch=14, intermediate=4096, projection=768)
SMALL = dict(image_size=64, hidden=64, layers=2, patch=16)


def jpeg_folder(folder: Path, n: int, px: int = 384) -> list[bytes]:
    """``n`` catalog renderings upscaled to ``px`` and saved as JPEG (quality 90), the usual web format."""
    groups = -(-n // 3)
    table = generate_table(CatalogConfig(num_groups=groups, variants_per_group=3), range(groups))
    folder.mkdir(parents=True)
    out = []
    for i, png in enumerate(table.column("image").to_pylist()[:n]):
        buf = io.BytesIO()
        Image.open(io.BytesIO(png)).convert("RGB").resize((px, px)).save(buf, "JPEG", quality=90)
        (folder / f"{i:06d}.jpg").write_bytes(buf.getvalue())
        out.append(buf.getvalue())
    return out


def embed(
    tmp: str,
    images: int = IMAGES,
    model: dict | None = None,
    device: str = DEVICE,
    name: str = "embed_stage_gpu",
    batch: int = BATCH,
    out_dir: Path | None = None,
) -> dict:
    """The embed stage (one actor) vs a plain loop over the same JPEGs and model: images/s of each."""
    model = model or (SMALL if os.environ.get("BENCH_GPU_SMALL") else VIT_L14)
    ref = f"{tmp}/clip"
    build_clip(Path(ref), **model)
    jpegs = jpeg_folder(Path(tmp) / "images", images)
    cuda = device == "cuda"
    dtype = "bfloat16" if cuda else "float32"
    enc = (
        f"{{name: clip_image, kind: clip_image, model: {ref}, batch_size: {batch}, num_actors: 1,"
        f" num_cpus: 2, num_gpus: {1 if cuda else 0}, device: {device}, dtype: {dtype}}}"
    )
    cfg = load_config(
        None,
        [
            f"run.run_root={tmp}/run",
            "run.stages=[embed]",
            "embed.source=images",
            f"embed.images.uri={tmp}/images",
            f"embed.encoders=[{enc}]",
        ],
    )
    encoder = encoders.build(cfg.embed.encoders[0])

    def loop(encoder) -> int:
        done = 0
        for i in range(0, len(jpegs), batch):
            done += len(encoder.encode([decode_image(b) for b in jpegs[i : i + batch]]))
        if cuda:
            torch.cuda.synchronize()
        return done

    encoder.encode([decode_image(b) for b in jpegs[:batch]])  # warm-up
    with PeakGPU() as loop_gpu:
        base_s, done = timed(loop, encoder)
    del encoder
    if cuda:
        torch.cuda.empty_cache()
    with PeakRSS() as mem, PeakGPU() as gpu:
        stage_s, rows = timed(graph.run_graph, cfg)
    assert done == len(jpegs) and rows[0].rows_out == len(jpegs)
    return write_result(
        name,
        value=len(jpegs) / stage_s,
        unit="images/s",
        baseline={
            "what": "plain single-process loop (decode, preprocess, forward), same model and JPEGs",
            "value": round(len(jpegs) / base_s, 3),
        },
        goal={"bar": 0.9, "direction": "higher", "meaning": "the whole stage at >= 90% of the loop"},
        out_dir=out_dir,
        images=len(jpegs),
        model={"kind": "clip (random init)", **model},
        device=device,
        dtype=dtype,
        batch_size=batch,
        seconds={"stage": round(stage_s, 3), "baseline": round(base_s, 3)},
        peak_rss_gib=mem.peak_gib,
        peak_gpu_gib=gpu.peak_gib,  # the whole device, every process: the stage's actor
        peak_gpu_gib_baseline=loop_gpu.peak_gib,
    )


def faiss_gpu() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def knn_gpu(n: int | None = None, name: str = "knn_gpu_1m", out_dir: Path | None = None) -> dict | None:
    """``knn()`` on the GPU vs the same call on the CPU path (every core) over ``n`` clustered vectors.
    Without faiss-gpu or a GPU, both calls take the CPU path (``gpu`` false in the result)."""
    n = n or N
    x = clustered(n)
    gpu_cfg, cpu_cfg = (
        IndexConfig(kind="ivf_flat", nprobe=4),
        IndexConfig(kind="ivf_flat", nprobe=4, use_gpu="never"),
    )
    gpu = knn.gpu_available(gpu_cfg)
    knn.knn(x[:20_000], K, cpu_cfg, os.cpu_count())  # the CPU path's Ray workers up before it is timed
    with PeakGPU() as gpu_mem:
        gpu_s, (_, rows) = timed(knn.knn, x, K, gpu_cfg)
    with PeakRSS() as mem:
        cpu_s, (_, ref) = timed(knn.knn, x, K, cpu_cfg, os.cpu_count())
    sample = np.random.default_rng(1).choice(n, min(n, 10_000), replace=False)
    agree = np.mean(
        [len(set(a[1:]) & set(b[1:])) / (K - 1) for a, b in zip(rows[sample], ref[sample], strict=True)]
    )
    where = "on the GPU" if gpu else "on the CPU (no faiss-gpu or GPU here: both calls on the CPU path)"
    return write_result(
        name,
        value=gpu_s,
        unit=f"s per encoder ({n:,} x {D}-d, build + top-{K} of every vector) {where}",
        baseline={"what": "the same knn() on the CPU path, every core", "value": round(cpu_s, 3)},
        goal={"bar": 1.0, "direction": "lower", "meaning": "faster than the CPU path"},
        out_dir=out_dir,
        gpu=gpu,
        vectors=n,
        index=knn.index_spec(gpu_cfg, n, D, gpu=gpu),
        neighbours_shared_with_cpu_path=round(float(agree), 4),
        peak_rss_gib=mem.peak_gib,
        peak_gpu_gib=gpu_mem.peak_gib,
    )


def main() -> None:
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: GPU benchmarks skipped")
        return
    with tempfile.TemporaryDirectory() as tmp:
        embed(tmp)
    if DEVICE == "cuda":
        if faiss_gpu():
            knn_gpu()
        else:
            print("faiss-gpu or a GPU is missing: FAISS GPU path not measured")


if __name__ == "__main__":
    start_ray()
    main()
