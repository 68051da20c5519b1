"""GPU benchmarks (run on a CUDA machine; ``make bench`` skips them on CPU):

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

import numpy as np
import torch
from PIL import Image

from benchmarks.common import PeakRSS, timed, write_result
from coral import graph
from coral.catalog.generate import generate_table
from coral.config import load_config
from coral.images import decode_image
from coral.models import encoders
from coral.models.tiny import build_clip

DEVICE = os.environ.get("BENCH_GPU_DEVICE", "cuda")
IMAGES = int(os.environ.get("BENCH_GPU_IMAGES", "20000"))
BATCH = 256
VIT_L14 = dict(image_size=224, hidden=1024, layers=24, patch=14, intermediate=4096, projection=768)
SMALL = dict(image_size=64, hidden=64, layers=2, patch=16)


def jpeg_folder(folder: Path, n: int) -> list[bytes]:
    """``n`` catalog renderings upscaled to 384 px and saved as JPEG (quality 90), the usual web format."""
    from coral.config import CatalogConfig

    groups = -(-n // 3)
    table = generate_table(CatalogConfig(num_groups=groups, variants_per_group=3), range(groups))
    folder.mkdir(parents=True)
    out = []
    for i, png in enumerate(table.column("image").to_pylist()[:n]):
        buf = io.BytesIO()
        Image.open(io.BytesIO(png)).convert("RGB").resize((384, 384)).save(buf, "JPEG", quality=90)
        (folder / f"{i:06d}.jpg").write_bytes(buf.getvalue())
        out.append(buf.getvalue())
    return out


def embed(tmp: str) -> dict:
    model = f"{tmp}/clip"
    build_clip(Path(model), **(SMALL if os.environ.get("BENCH_GPU_SMALL") else VIT_L14))
    images = jpeg_folder(Path(tmp) / "images", IMAGES)
    dtype = "bfloat16" if DEVICE == "cuda" else "float32"
    enc = (
        f"{{name: clip_image, kind: clip_image, model: {model}, batch_size: {BATCH}, num_actors: 1,"
        f" num_cpus: 2, num_gpus: {1 if DEVICE == 'cuda' else 0}, device: {DEVICE}, dtype: {dtype}}}"
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
        for i in range(0, len(images), BATCH):
            done += len(encoder.encode([decode_image(b) for b in images[i : i + BATCH]]))
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return done

    encoder.encode([decode_image(b) for b in images[:BATCH]])  # warm-up
    base_s, done = timed(loop, encoder)
    del encoder
    with PeakRSS() as mem:
        stage_s, rows = timed(graph.run_graph, cfg)
    assert done == len(images) and rows[0].rows_out == len(images)
    return write_result(
        "embed_stage_gpu",
        value=len(images) / stage_s,
        unit="images/s",
        baseline={
            "what": "plain single-process loop (decode, preprocess, forward), same model and JPEGs",
            "value": round(len(images) / base_s, 3),
        },
        goal={"bar": 0.9, "direction": "higher", "meaning": "the whole stage at >= 90% of the loop"},
        images=len(images),
        model={"kind": "clip (random init)", **VIT_L14} if not os.environ.get("BENCH_GPU_SMALL") else SMALL,
        dtype=dtype,
        batch_size=BATCH,
        seconds={"stage": round(stage_s, 3), "baseline": round(base_s, 3)},
        peak_rss_gib=mem.peak_gib,
    )


def knn_gpu() -> dict | None:
    import faiss

    from benchmarks.bench_knn import D, K, N, clustered
    from coral.config import IndexConfig
    from coral.mining import knn

    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        print("faiss-gpu or a GPU is missing: FAISS GPU path not measured")
        return None
    x = clustered(N)
    gpu_cfg, cpu_cfg = (
        IndexConfig(kind="ivf_flat", nprobe=4),
        IndexConfig(kind="ivf_flat", nprobe=4, use_gpu="never"),
    )
    gpu_s, (_, rows) = timed(knn.knn, x, K, gpu_cfg)
    cpu_s, (_, ref) = timed(knn.knn, x, K, cpu_cfg, os.cpu_count())
    sample = np.random.default_rng(1).choice(N, 10_000, replace=False)
    agree = np.mean(
        [len(set(a[1:]) & set(b[1:])) / (K - 1) for a, b in zip(rows[sample], ref[sample], strict=True)]
    )
    return write_result(
        "knn_gpu_1m",
        value=gpu_s,
        unit="s per encoder (1M x 256-d, build + top-11 of every vector) on the GPU",
        baseline={"what": "the same knn() on the CPU path, every core", "value": round(cpu_s, 3)},
        goal={"bar": 1.0, "direction": "lower", "meaning": "faster than the CPU path"},
        index=knn.index_spec(gpu_cfg, N, D, gpu=True),
        neighbours_shared_with_cpu_path=round(float(agree), 4),
    )


def main() -> None:
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: GPU benchmarks skipped")
        return
    with tempfile.TemporaryDirectory() as tmp:
        embed(tmp)
    if DEVICE == "cuda":
        knn_gpu()


if __name__ == "__main__":
    from benchmarks.run_all import start_ray

    start_ray()
    main()
