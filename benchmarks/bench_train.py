"""Training throughput: the train stage (Ray Train, 2 workers, DeepSpeed ZeRO-2, Coral on the tiny
Qwen2-VL, the processor in a Ray Data actor) vs a plain single-process PyTorch loop over the same model,
global batch, steps and threads, which runs the processor itself between steps.

Figure: steps/s of the whole stage over the demo's 300 steps (start-up included: Ray Train's workers and
the featurising actor starting, DeepSpeed initialisation, the export at the end) against the plain loop
doing the same (the model loaded, 300 steps, the model saved), the median of 3 runs, each interleaved with
its baseline. Also kept: steps/s once running (the stage's own timer, from its first step to its last
checkpoint) and what the rest of the stage took.

``deepspeed_steps``: the same step (Coral's losses, DeepSpeed ZeRO-2, torch AdamW, as ``coral.train.loop``)
in this one process on any device, counting the tokens each forward runs: the GPU check's training figure.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from benchmarks.common import RUNS, PeakRSS, free_port, interleaved, median, start_ray, write_result
from coral import graph, shipped
from coral import schemas as S
from coral.catalog import lookup
from coral.catalog.generate import generate_table
from coral.config import CatalogConfig, TrainConfig, load_config
from coral.models import loader, retrievers
from coral.models.coral import CoralHeads
from coral.testing import corpus
from coral.testing.tiny import build_all
from coral.train import step
from coral.train.loop import Retriever, peak_memory_gib, scalars_to_buffers

STEPS, GLOBAL_BATCH, WORKERS, THREADS, K = 300, 8, 2, 2, 3  # the demo's steps, batch and workers
ZERO2 = shipped.DEEPSPEED / "zero2.json"
# dense bf16 tensor-core peaks (NVIDIA's data sheets, without sparsity), matched against the device name
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}


def plain_loop(root: Path, base: str, out: Path) -> int:
    """A plain loop over STEPS steps: same model, same loss terms, global batch, 2 threads, torch AdamW;
    the model loaded first and saved at the end, as the stage exports it."""
    torch.manual_seed(0)
    torch.set_num_threads(THREADS)
    catalog = pq.read_table(root / "catalog" / "data", columns=[S.ID, S.TITLE, S.IMAGE])
    products = lookup.products_from({k: catalog[k].to_pylist() for k in (S.ID, S.TITLE, S.IMAGE)})
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

    for _ in range(STEPS):
        one()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return STEPS


def peak_tflops(device: str) -> tuple[float | None, str]:
    """The device's dense bf16 peak in TFLOP/s (``GPU_CHECK_PEAK_TFLOPS`` wins), and where it came from."""
    if os.environ.get("GPU_CHECK_PEAK_TFLOPS"):
        return float(os.environ["GPU_CHECK_PEAK_TFLOPS"]), "GPU_CHECK_PEAK_TFLOPS"
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
        for key, tflops in PEAK_BF16_TFLOPS.items():
            if key in name:
                return tflops, f"{name}: dense bf16 peak"
        return None, f"{name}: peak unknown (set GPU_CHECK_PEAK_TFLOPS)"
    return None, "no peak for a CPU (set GPU_CHECK_PEAK_TFLOPS)"


def triplets(n: int, k: int, image_px: int) -> tuple[lookup.Products, list[dict]]:
    """Catalog products rendered at ``image_px`` and ``n`` triplet rows: per query a product's image with a
    change in words, its sibling variant as the positive, ``k`` products of other groups as negatives."""
    table = generate_table(CatalogConfig(num_groups=n + k, image_size=image_px), range(n + k))
    cols = {c: table.column(c).to_pylist() for c in (S.ID, S.TITLE, S.IMAGE)}
    ids = cols[S.ID]  # three variants per group, in order
    rows = [
        {
            S.QUERY_TEXT: f"a {S.IMAGE_SLOT} but in blue",
            S.QUERY_IMAGE_IDS: [ids[3 * i]],
            S.POSITIVE_IDS: [ids[3 * i + 1]],
            S.HARD_NEGATIVE_IDS: [ids[3 * (i + 1 + j)] for j in range(k)],
        }
        for i in range(n)
    ]
    return lookup.products_from(cols), rows


def deepspeed_steps(
    base: str, device: str, dtype: str, batch: int, steps: int, image_px: int, max_image_tokens: int
) -> dict:
    """Coral steps of ``batch`` queries (each with its positive and K negatives) under DeepSpeed ZeRO-2
    (cluster/deepspeed/zero2.json, bf16 when ``dtype`` is) with torch AdamW, in this process as rank 0 of
    1; two warm-up steps, then ``steps`` timed. Counts the real tokens (text and visual) and the image
    patches of every language-model forward."""
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
    )
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed  # here, not at the top: it reads DS_ACCELERATOR (set just above) when imported

    deepspeed.init_distributed()
    torch.manual_seed(0)
    model = loader.load_model(base, device, dtype)
    processor = loader.load_processor(base)
    retriever = retrievers.make("coral", processor, max_image_tokens)
    scalars_to_buffers(model)
    module = Retriever(model.train(), CoralHeads(model.config.text_config.hidden_size))
    ds_config = {
        **json.loads(ZERO2.read_text()),
        "train_micro_batch_size_per_gpu": batch,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": dtype == "bfloat16"},
    }
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)

    products, rows = triplets(4 * batch, K, image_px)  # four distinct batches, taken in turn
    batches = [
        step.featurize(retriever, rows[i : i + batch], products, K) for i in range(0, len(rows), batch)
    ]
    tokens, patches = [], []

    def count(_module, _args, kwargs):  # kept as tensors: no device sync inside the timed steps
        tokens.append(kwargs["attention_mask"].sum())
        if kwargs.get("image_grid_thw") is not None:
            patches.append(kwargs["image_grid_thw"].prod(-1).sum())

    inner = engine.module.model.model
    inner.register_forward_pre_hook(count, with_kwargs=True)
    cfg, special = TrainConfig(), set(processor.tokenizer.all_special_ids)
    generator = torch.Generator().manual_seed(0)

    def one(i: int) -> dict:
        examples = batches[i % len(batches)]
        out = step.losses(
            engine.module.model, retriever, examples, K, cfg, engine.module.heads, special, generator
        )
        engine.backward(out["loss"])
        engine.step()
        return out

    def synchronize() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    for i in range(2):
        one(i)
    synchronize()
    tokens.clear()
    patches.clear()
    started = time.perf_counter()
    for i in range(steps):
        last = one(i)
    synchronize()
    seconds = time.perf_counter() - started
    memory = peak_memory_gib()
    return {
        "seconds": seconds,
        "tokens": int(torch.stack(tokens).sum()),
        "patches": int(torch.stack(patches).sum()) if patches else 0,
        "params": sum(p.numel() for p in engine.module.parameters()),
        "vision_params": sum(p.numel() for p in inner.visual.parameters()),
        "loss": last["loss"].item(),
        "zero_stage": engine.zero_optimization_stage(),
        "peak_rss_gib": memory["rss"],
        "peak_gpu_gib": memory.get("gpu"),
    }


def main() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        base = str(build_all(f"{tmp}/tiny", ("qwen2_vl",), corpus=corpus.project())["qwen2_vl"])
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
        run = Path(tmp) / "run"

        def stage() -> dict:
            shutil.rmtree(run / "train", ignore_errors=True)
            shutil.rmtree(run / "_checkpoints", ignore_errors=True)  # no resuming from the last run
            graph.run_graph(cfg, "train")
            return json.loads((run / "train" / "metrics.json").read_text())

        with PeakRSS() as mem:
            runs = interleaved(stage, lambda: plain_loop(run, base, Path(tmp) / "plain"))
    stage_s = [r["stage"][0] for r in runs]
    base_s = [r["baseline"][0] for r in runs]
    metrics = runs[-1]["stage"][1]
    running = [r["stage"][1]["samples_per_s"] / GLOBAL_BATCH for r in runs]
    return write_result(
        "train_ray_deepspeed",
        value=median(STEPS / s for s in stage_s),
        unit=f"steps/s, the whole stage over {STEPS} steps (Coral, tiny Qwen2-VL, global batch {GLOBAL_BATCH} x {K + 1} candidates, {WORKERS} workers)",
        baseline={
            "what": f"plain single-process PyTorch loop, same model, batch, {STEPS} steps, 2 threads, load and save included",
            "value": round(median(STEPS / s for s in base_s), 3),
        },
        goal={
            "bar": 0.8,
            "direction": "higher",
            "meaning": "the whole Ray Train + DeepSpeed stage >= 0.8 of the plain loop",
        },
        run_ratios=[b / s for s, b in zip(stage_s, base_s, strict=True)],
        steps=STEPS,
        runs=RUNS,
        seconds={"stage": [round(s, 3) for s in stage_s], "baseline": [round(s, 3) for s in base_s]},
        once_running={
            "what": "steps/s from the stage's first step to its last checkpoint, and the stage's other seconds",
            "steps_per_s": round(median(running), 3),
            "other_s": round(median(s - STEPS / r for s, r in zip(stage_s, running, strict=True)), 3),
        },
        worker_seconds=metrics["worker_seconds"],
        worker_peak_memory_gib=metrics["worker_peak_memory_gib"],  # rank 0's peak RSS (and GPU)
        peak_rss_gib=mem.peak_gib,
        peak_rss_note="whole machine: driver, 2 workers, Ray's processes",
    )


if __name__ == "__main__":
    start_ray()
    main()
