"""The embed stage (Ray Data actor pool) vs a plain single-process loop over the same model and images.
Figure: images/s of the whole stage (Ray Data, the actors starting, importing torch and transformers and
loading the model, Parquet in and out) over 3,000 images, ratio = stage / plain loop (the model loaded,
then decode + preprocess + forward), the median of 3 runs, each interleaved with its baseline.

The model is a random-init CLIP built like the tiny one but compute-bound (224 px, 4 layers, width 256),
so the figure shows what the actor pool costs or gains when the forward pass is the work. Also measured:
when the pool's first batch began, counted from the stage's start (the manifest's ``first_batch_s``).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import torch

from benchmarks.common import RUNS, PeakRSS, interleaved, median, start_ray, write_result
from coral import graph, manifest, storage
from coral import schemas as S
from coral.config import load_config
from coral.images import decode_image
from coral.models import encoders
from coral.testing.tiny import build_clip

GROUPS, VARIANTS, BATCH = 1000, 3, 32  # 3,000 images: about 11 s of work for the plain loop
FIRST_BATCH_S = 5.0  # the pool up and embedding within this many seconds of the stage starting
BENCH_CLIP = dict(image_size=224, hidden=256, layers=4, patch=32)


def plain_loop(cfg, images: list[bytes]) -> int:
    encoder = encoders.build(cfg)
    done = 0
    for i in range(0, len(images), BATCH):
        done += len(encoder.encode([decode_image(b) for b in images[i : i + BATCH]]))
    return done


def config(run_root: str, groups: int, model: str):
    return load_config(
        None,
        [
            f"run.run_root={run_root}",
            f"catalog.num_groups={groups}",
            f"catalog.variants_per_group={VARIANTS}",
            "run.stages=[catalog, embed]",
            f"embed.encoders=[{{name: clip_image, kind: clip_image, model: {model}, batch_size: {BATCH}, num_actors: 2}}]",
        ],
    )


def main() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        model = f"{tmp}/clip-bench"
        build_clip(Path(model), **BENCH_CLIP)
        cfg = config(f"{tmp}/run", GROUPS, model)
        graph.run_graph(cfg, until="catalog")
        images = pq.read_table(f"{tmp}/run/catalog/data", columns=[S.IMAGE]).column(S.IMAGE).to_pylist()
        n = len(images)
        torch.set_num_threads(2)
        plain_loop(cfg.embed.encoders[0], images[:BATCH])  # warm: this process has imported torch already

        def stage() -> dict:
            shutil.rmtree(f"{tmp}/run/embed", ignore_errors=True)
            rows = graph.run_graph(cfg, "embed")
            assert rows[0].rows_out == n
            return manifest.read_complete(storage.resolve(cfg.run.run_root).child("embed"))["cost"]

        with PeakRSS() as mem:
            runs = interleaved(stage, lambda: plain_loop(cfg.embed.encoders[0], images))
    stage_s = [r["stage"][0] for r in runs]
    base_s = [r["baseline"][0] for r in runs]
    firsts = [min(p["first_batch_s"] for p in r["stage"][1]["pools"].values()) for r in runs]
    return write_result(
        "embed_stage",
        value=median(n / s for s in stage_s),
        unit="images/s, the whole stage (start-up included)",
        baseline={
            "what": "plain single-process loop, same model (loaded in the timed part), same images, 2 threads",
            "value": round(median(n / s for s in base_s), 3),
        },
        goal={
            "bar": 0.9,
            "direction": "higher",
            "meaning": "the whole stage (Ray Data, actor start-up, Parquet in and out) at >= 90% of the plain loop's rate",
        },
        run_ratios=[b / s for s, b in zip(stage_s, base_s, strict=True)],
        images=n,
        model={"kind": "clip (random init)", **BENCH_CLIP},
        actors=cfg.embed.encoders[0].num_actors,
        batch_size=BATCH,
        runs=RUNS,
        seconds={"stage": [round(s, 3) for s in stage_s], "baseline": [round(s, 3) for s in base_s]},
        first_batch={
            "what": "seconds from the stage's start to its pool's first batch (imports, model load, Ray Data's first block)",
            "seconds": firsts,
            "median": round(median(firsts), 3),
            "bar": FIRST_BATCH_S,
            "met": median(firsts) <= FIRST_BATCH_S,
        },
        first_run={
            "what": "run 1, in Ray worker processes new to this Ray (importing torch and transformers, as a "
            "graph's first model stage does without a prewarm); runs 2-3 find them warm (ray.warm_workers)",
            "ratio": round(base_s[0] / stage_s[0], 3),
            "first_batch_s": firsts[0],
        },
        peak_rss_gib=mem.peak_gib,
    )


if __name__ == "__main__":
    start_ray()
    main()
