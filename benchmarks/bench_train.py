"""Training throughput: the train stage (Ray Train, 2 workers, DeepSpeed ZeRO-2, Coral on the tiny
Qwen2-VL, the processor in a Ray Data actor) vs a plain single-process PyTorch loop over the same model,
global batch, steps and threads, which runs the processor itself between steps.

Figure: steps/s once running (the stage's own timer, from its first step to its last checkpoint); Ray's
fixed start-up (workers, DeepSpeed initialisation, the first validation-free checkpoint) reported apart.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from benchmarks.common import PeakRSS, timed, write_result
from coral import graph
from coral import schemas as S
from coral.config import TrainConfig, load_config
from coral.models import loader
from coral.models.tiny import build_all
from coral.train import retrievers, step
from coral.train.coral import CoralHeads

STEPS, GLOBAL_BATCH, WORKERS, THREADS, K = 60, 8, 2, 2, 3


def plain_loop(root: Path, base: str) -> float:
    """Steps/s of a plain loop: same model, same loss terms, global batch, 2 threads, torch AdamW."""
    torch.manual_seed(0)
    torch.set_num_threads(THREADS)
    catalog = pq.read_table(root / "catalog" / "data", columns=[S.ID, S.TITLE, S.IMAGE])
    products = step.products_from({k: catalog[k].to_pylist() for k in (S.ID, S.TITLE, S.IMAGE)})
    rows = [r for r in pq.read_table(root / "merit" / "data").to_pylist() if r[S.SPLIT] == "train"]
    model, processor = loader.load_model(base).train(), loader.load_processor(base)
    retriever = retrievers.make("coral", processor)
    heads = CoralHeads(model.config.text_config.hidden_size)
    opt = torch.optim.AdamW([*model.parameters(), *heads.parameters()], lr=3e-4)
    special, rng = set(processor.tokenizer.all_special_ids), random.Random(0)

    def one() -> None:
        examples = step.featurize(retriever, rng.sample(rows, GLOBAL_BATCH), products, K)
        out = step.losses(model, retriever, examples, K, TrainConfig(), heads, special)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()

    one()  # warm-up, as the workers' first step
    t = time.perf_counter()
    for _ in range(STEPS):
        one()
    return STEPS / (time.perf_counter() - t)


def main() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        base = str(build_all(f"{tmp}/tiny", ("qwen2_vl",))["qwen2_vl"])
        cfg = load_config(
            Path(__file__).resolve().parents[1] / "workflows" / "demo.yaml",
            [
                f"run.run_root={tmp}/run",
                "run.stages=[catalog, merit, train]",
                "merit.export=false",
                "merit.rerank_by=null",  # no embed stage here: positives in seeded order
                "train.data=[merit]",
                f"train.base={base}",
                f"train.steps={STEPS}",
                f"train.checkpoint_every={STEPS}",
                f"train.batch_size={GLOBAL_BATCH // WORKERS}",
                f"train.num_workers={WORKERS}",
                f"train.cpus_per_worker={THREADS // WORKERS}",
                "train.validation_queries=0",
                "train.compare=[]",
            ],
        )
        graph.run_graph(cfg, until="merit")
        base_steps = plain_loop(Path(tmp) / "run", base)
        with PeakRSS() as mem:
            stage_s, _ = timed(graph.run_graph, cfg, "train")
        metrics = json.loads((Path(tmp) / "run" / "train" / "metrics.json").read_text())
        ray_steps = metrics["samples_per_s"] / GLOBAL_BATCH
    return write_result(
        "train_ray_deepspeed",
        value=ray_steps,
        unit=f"steps/s (Coral, tiny Qwen2-VL, global batch {GLOBAL_BATCH} x {K + 1} candidates, {WORKERS} workers)",
        baseline={
            "what": "plain single-process PyTorch loop, same model, batch, steps, 2 threads",
            "value": round(base_steps, 3),
        },
        goal={
            "bar": 0.85,
            "direction": "higher",
            "meaning": "Ray Train + DeepSpeed steps/s >= 0.85 of the plain loop",
        },
        steps=STEPS,
        seconds={"stage": round(stage_s, 3), "fixed_start_up": round(stage_s - STEPS / ray_steps, 3)},
        worker_seconds=metrics["worker_seconds"],
        worker_peak_memory_gib=metrics["worker_peak_memory_gib"],  # rank 0's peak RSS (and GPU)
        peak_rss_gib=mem.peak_gib,
        peak_rss_note="whole machine: driver, 2 workers, Ray's processes",
    )


if __name__ == "__main__":
    from benchmarks.run_all import start_ray

    start_ray()
    main()
