"""The embed stage (Ray Data actor pool) vs a plain single-process loop over the same model and images.
Figure: images/s, ratio = stage / plain loop (decode + preprocess + forward in both).

The model is a random-init CLIP built like the tiny one but compute-bound (224 px, 4 layers, width 256),
so the figure shows what the actor pool costs or gains when the forward pass is the work. The stage's
fixed start-up (actor processes importing Ray Data, torch and transformers, then loading the model) is
measured apart on 30 images and reported with the steady-state rate.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import torch

from benchmarks.common import PeakRSS, start_ray, timed, write_result
from coral import graph
from coral import schemas as S
from coral.config import load_config
from coral.images import decode_image
from coral.models import encoders
from coral.testing.tiny import build_clip

GROUPS, VARIANTS, BATCH = 6000, 3, 32  # 18,000 images: about a minute of work for the plain loop
SMALL_GROUPS = 10
BENCH_CLIP = dict(image_size=224, hidden=256, layers=4, patch=32)


def plain_loop(encoder, images: list[bytes]) -> int:
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
        encoder = encoders.build(cfg.embed.encoders[0])
        plain_loop(encoder, images[:BATCH])  # warm-up, as the actors get with their first batch
        base_s, done = timed(plain_loop, encoder, images)
        assert done == n

        # the same stage on SMALL_GROUPS groups first: its time is (almost all) fixed start-up cost
        small = config(f"{tmp}/small", SMALL_GROUPS, model)
        graph.run_graph(small, until="catalog")
        small_s, _ = timed(graph.run_graph, small, "embed")
        n_small = SMALL_GROUPS * VARIANTS

        with PeakRSS() as mem:
            stage_s, rows = timed(graph.run_graph, cfg, "embed")
        assert rows[0].rows_out == n
    return write_result(
        "embed_stage",
        value=n / stage_s,
        unit="images/s",
        baseline={
            "what": "plain single-process loop, same model, same images, warm",
            "value": round(n / base_s, 3),
        },
        goal={
            "bar": 0.9,
            "direction": "higher",
            "meaning": "the whole stage (Ray Data, actor start-up, Parquet out) at >= 90% of the plain loop's rate",
        },
        images=n,
        model={"kind": "clip (random init)", **BENCH_CLIP},
        actors=cfg.embed.encoders[0].num_actors,
        batch_size=BATCH,
        seconds={
            "stage": round(stage_s, 3),
            "baseline": round(base_s, 3),
            f"stage_on_{n_small}_images": round(small_s, 3),
        },
        steady_state={
            "what": f"(images - {n_small}) / (stage s - stage s on {n_small} images): throughput once actors are up",
            "images_per_s": round((n - n_small) / (stage_s - small_s), 3),
            "ratio": round(((n - n_small) / (stage_s - small_s)) / (n / base_s), 3),
        },
        peak_rss_gib=mem.peak_gib,
    )


if __name__ == "__main__":
    start_ray()
    main()
