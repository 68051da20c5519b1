"""Annotation benchmarks.

- annotate stage (MegaPairs describe + instruct, hf engine, one actor per step): pairs/s of the whole
  stage (actors starting, models loading, Parquet in and out) at the configured batch size vs batch size
  1, same actors, models and pairs, the median of 3 runs, each interleaved with its baseline; the rate
  once the actors are up (the last step's batches after its first) kept beside it. Describe runs on a random Qwen2-VL,
  instruct on a random Qwen2 text LLM, both 512 wide and 4 deep (so the matrix products, not Python, are
  the work). A random model rarely stops early, so every request writes its step's ``max_new_tokens``
  (128 for a 60-100 word description, 64 for three short instructions) and both runs do the same
  generation work. In the stage, instruct's tails are describe's output (byte soup from a random model,
  150-250 tokens once re-tokenized). Per step too, in one process: the describe prompt is short (two
  images and a sentence); the instruct prompt is long (five demonstrations, about 1,100 tokens), but its
  head is one of ``demonstration_sets`` shared heads that the engine's prefix cache computes once, so only
  the pair's description is prefilled per request, and rows with one head attend to it once per batch
  (the stage orders pairs by head; so do these prompts). Batching speeds up decoding, not prefill: the
  per-step figures also give instruct without the prefix cache.
- MERIT query composition over 100,000 products: queries/s of ``compose_table`` (products indexed by
  (class, key, value), positives by set intersection) vs the plain way, a scan of the class's products
  per query, on a sample of the same queries.
- Generated tokens/s of the describe step on the hf engine (``hf_rate``) and on vLLM through
  ``ray.data.llm`` (``vllm_rate``): the GPU check's annotation figure.
"""

from __future__ import annotations

import gc
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch
from PIL import Image

from benchmarks.common import RUNS, PeakGPU, PeakRSS, interleaved, median, start_ray, timed, write_result
from coral import graph, manifest, storage
from coral import schemas as S
from coral.annotate import engines, prompts, vllm
from coral.catalog import draw, vocab
from coral.config import EngineConfig, load_config
from coral.merit import compose
from coral.testing import corpus
from coral.testing.tiny import build_all, build_qwen, build_qwen2_text

PAIRS, BATCH, NEW_TOKENS = 128, 8, {"describe": 128, "instruct": 64}
BENCH_QWEN = dict(hidden=512, layers=4)
SETS = 4  # demonstration sets among the 2 * BATCH per-step prompts (the stage's default is 32)
PRODUCTS, QUERIES, SCAN_SAMPLE = 100_000, 20_000, 1_000


def annotate_config(tmp: str, tiny: dict, batch: int):
    """ci_small's graph up to annotate, both steps on the benchmark model at ``batch``."""

    def engine(step: str) -> str:
        model = tiny["qwen_bench"] if step == "describe" else tiny["qwen_text_bench"]
        return f"{{kind: hf, model: {model}, max_new_tokens: {NEW_TOKENS[step]}, batch_size: {batch}}}"

    return load_config(
        Path(__file__).resolve().parents[1] / "workflows" / "ci_small.yaml",
        [
            f"run.run_root={tmp}/run",
            "run.stages=[catalog, embed, mine, annotate]",
            "catalog.num_groups=100",
            f"embed.encoders=[{{name: clip_image, kind: clip_image, model: {tiny['clip']}, batch_size: 32}}]",
            f"annotate.describe={engine('describe')}",
            f"annotate.instruct={engine('instruct')}",
            f"annotate.max_pairs={PAIRS // 2}",  # per split: train and test
            # 128 pairs over the default 32 sets would make a quarter of the heads first-time misses, a start-up
            # cost that a run over thousands of pairs spreads thin; 4 sets stand for that steady state
            f"annotate.demonstration_sets={SETS}",
        ],
    )


def run_stage(cfg) -> dict:
    """Rerun annotate; its manifest's per-step details (requests, rate after the first batch)."""
    rows = graph.run_graph(cfg, "annotate")
    assert rows[-1].rows_in == PAIRS
    m = manifest.read_complete(storage.resolve(cfg.run.run_root).child("annotate"))
    return {step: m["details"][step] for step in ("describe", "instruct")}


def run_batches(engine, ps: list, size: int) -> int:
    return sum(len(engine.generate(ps[i : i + size])) for i in range(0, len(ps), size))


def per_step(vlm: str, llm: str) -> dict:
    """Seconds for 2 * BATCH prompts of each step, one at a time vs in batches, in this process."""
    torch.set_num_threads(1)  # as in a one-CPU actor
    img = draw.png_bytes(Image.new("RGB", (64, 64), (200, 30, 40)))
    keys = sorted(
        map(str, range(2 * BATCH)), key=lambda k: prompts.demonstration_set(0, k, SETS)
    )  # as the stage
    demos = [prompts.demonstrations_for(0, k, 5, SETS) for k in keys]
    instruct = [prompts.instruct_prompt("A red mug on a table. " * 5, d, 3, 40) for d in demos]
    steps = {
        "describe": (vlm, [prompts.describe_prompt(img, img, 60 + i) for i in range(2 * BATCH)], {}),
        "instruct": (llm, instruct, {}),
        "instruct_without_prefix_cache": (llm, instruct, {"prefix_cache": 0}),
    }
    out = {}
    for step, (model, ps, extra) in steps.items():
        new = NEW_TOKENS[step.split("_")[0]]
        engine = engines.HFEngine(EngineConfig(model=model, max_new_tokens=new, device="cpu", **extra))
        engine.generate(ps[:1])  # warm-up
        if engine.prefixes is not None:
            engine.generate(ps)  # every head in the cache, as in a long-running actor
        one_s, _ = timed(run_batches, engine, ps, 1)
        batched_s, _ = timed(run_batches, engine, ps, BATCH)
        split = engine._split(ps[0])
        out[step] = {
            "prompt_tokens": len(engine.tokenizer(engine._template(ps[0]))["input_ids"]),
            "prefilled_tokens": len(engine.tokenizer(split[1])["input_ids"])
            if engine.prefixes and split
            else None,
            "batch_1_s": round(one_s, 3),
            "batched_s": round(batched_s, 3),
            "ratio": round(one_s / batched_s, 2),
        }
    return out


def count_generated(engine) -> list[int]:
    """Per generated row, its new tokens up to its end of sequence: the hf engine's decode, wrapped."""
    decode = engine.tokenizer.batch_decode
    eos = getattr(getattr(engine.model, "generation_config", None), "eos_token_id", None)
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    counts: list[int] = []

    def counting(ids, *args, **kwargs):
        for row in ids.tolist():
            counts.append(next((j + 1 for j, t in enumerate(row) if t in eos), len(row)))
        return decode(ids, *args, **kwargs)

    engine.tokenizer.batch_decode = counting
    return counts


def hf_rate(model: str, prompts: list, new_tokens: int, batch: int, device: str, dtype: str) -> dict:
    """Generated tokens/s of the hf engine over ``prompts`` in batches of ``batch``, after a warm-up batch."""
    cfg = EngineConfig(model=model, max_new_tokens=new_tokens, batch_size=batch, device=device, dtype=dtype)
    engine = engines.HFEngine(cfg)
    counts = count_generated(engine)
    engine.generate(prompts[:batch])
    counts.clear()
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
    seconds, _ = timed(run_batches, engine, prompts, batch)  # generate returns after the device is done
    out = {
        "tokens_per_s": round(sum(counts) / seconds, 3),
        "prompts": len(prompts),
        "generated_tokens": sum(counts),
        "batch_size": batch,
        "seconds": round(seconds, 3),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
    }
    if cuda:
        del engine
        gc.collect()
        torch.cuda.empty_cache()  # vLLM's actor asks for most of the GPU's memory next
    return out


def vllm_rate(model: str, step, rows: list[dict], new_tokens: int, dtype: str) -> dict:
    """Generated tokens/s of ``step`` on vLLM through ``ray.data.llm`` (``coral.annotate.vllm``), every row
    to exactly ``new_tokens`` (``ignore_eos``; vLLM does not detokenize: a random model picks ids beyond a
    tiny tokenizer's). Steady: the tokens of the blocks after the first one to reach this process over the
    time since it came; the whole run includes the engine's start."""
    engine = EngineConfig(
        kind="vllm",
        model=model,
        max_new_tokens=new_tokens,
        batch_size=64,
        dtype=dtype,
        vllm={"max_model_len": 4096, "gpu_memory_utilization": 0.85},
    )
    processor = vllm.processor(step, engine, sampling={"ignore_eos": True, "detokenize": False})
    arrivals: list[tuple[float, int]] = []
    started = time.perf_counter()
    with PeakGPU() as gpu:
        ds = processor(ray.data.from_items(rows))
        for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            made = sum(block.column("num_generated_tokens").to_pylist())
            arrivals.append((time.perf_counter() - started, made))
    total = sum(n for _, n in arrivals)
    span = arrivals[-1][0] - arrivals[0][0]
    return {
        "tokens_per_s": round(sum(n for _, n in arrivals[1:]) / span, 3) if span > 0 else None,
        "whole_run_tokens_per_s": round(total / arrivals[-1][0], 3),
        "prompts": len(rows),
        "generated_tokens": total,
        "blocks": len(arrivals),
        "first_block_after_s": round(arrivals[0][0], 3),
        "seconds": round(arrivals[-1][0], 3),
        "peak_gpu_gib": gpu.peak_gib,
    }


def annotate_bench() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tiny = build_all(f"{tmp}/tiny", ("clip",), corpus=corpus.project())
        tiny["qwen_bench"], tiny["qwen_text_bench"] = Path(tmp) / "qwen_bench", Path(tmp) / "qwen_text_bench"
        build_qwen(tiny["qwen_bench"], "2", **BENCH_QWEN, corpus=corpus.project())
        build_qwen2_text(tiny["qwen_text_bench"], **BENCH_QWEN, corpus=corpus.project())
        steps = per_step(str(tiny["qwen_bench"]), str(tiny["qwen_text_bench"]))
        graph.run_graph(annotate_config(tmp, tiny, BATCH), until="mine")
        with PeakRSS() as mem:
            runs = interleaved(
                lambda: run_stage(annotate_config(tmp, tiny, BATCH)),
                lambda: run_stage(annotate_config(tmp, tiny, 1)),
            )
    batched_s = [r["stage"][0] for r in runs]
    one_s = [r["baseline"][0] for r in runs]
    rate = "pairs_per_s_after_first_batch"
    batched, one = runs[-1]["stage"][1], runs[-1]["baseline"][1]
    return write_result(
        "annotate_hf_batching",
        value=median(PAIRS / s for s in batched_s),
        unit=(
            "pairs/s, the whole stage (describe on a random Qwen2-VL, instruct on a random Qwen2 LLM, "
            "512x4, hf engine, one actor each, CPU; actor start-up and model loading included)"
        ),
        baseline={
            "what": "the same stage at batch size 1",
            "value": round(median(PAIRS / s for s in one_s), 3),
        },
        goal={"bar": 3.0, "direction": "higher", "meaning": f"batch size {BATCH} >= 3x batch size 1"},
        run_ratios=[o / b for b, o in zip(batched_s, one_s, strict=True)],
        runs=RUNS,
        once_running={
            "what": "pairs/s once the actors are up: the instruct step's batches after its first (last run)",
            "batched": batched["instruct"][rate],
            "batch_1": one["instruct"][rate],
            "ratio": round(batched["instruct"][rate] / one["instruct"][rate], 3),
        },
        steps={"batched": batched, "batch_1": one},
        pairs=PAIRS,
        batch_size=BATCH,
        new_tokens=NEW_TOKENS,
        model={"describe": "qwen2_vl (random init)", "instruct": "qwen2 (random init)", **BENCH_QWEN},
        demonstration_sets=SETS,
        per_step=steps,
        seconds={"batched": [round(s, 3) for s in batched_s], "batch_1": [round(s, 3) for s in one_s]},
        peak_rss_gib=mem.peak_gib,
    )


def products(n: int, seed: int = 0) -> list[dict]:
    """Catalog-like products (groups of 3 variants differing in one attribute), without images."""
    rng = np.random.default_rng(seed)
    classes, out = list(vocab.CLASSES), []
    for g in range(n // 3):
        cls = classes[rng.integers(len(classes))]
        base = {k: str(rng.choice(vocab.ATTRIBUTE_VALUES[k])) for k in S.ATTRIBUTE_KEYS}
        key = S.ATTRIBUTE_KEYS[rng.integers(len(S.ATTRIBUTE_KEYS))]
        values = rng.permutation(vocab.ATTRIBUTE_VALUES[key])
        for v in range(3):
            attrs = dict(base, **{key: str(values[v % len(values)])})
            out.append(
                {
                    S.ID: f"p{g:06d}-{v}",
                    S.GROUP_ID: f"g{g:06d}",
                    S.CLASS: cls,
                    S.ATTRIBUTES: attrs,
                    S.TITLE: vocab.title("en", cls, attrs),
                    S.LANGUAGE: "en",
                    S.SPLIT: "train",
                }
            )
    return out


def scan_positives(pool: list[dict], row: dict, by_id: dict) -> list[str]:
    """The plain way: every product of the class, every condition checked."""
    conditions = [
        (by_id[q][S.ATTRIBUTES], k)
        for q, k in zip(row[S.QUERY_IMAGE_IDS], row[S.CONDITION_KEYS], strict=True)
    ]
    return [
        p[S.ID]
        for p in pool
        if p[S.CLASS] == row[S.CLASS]
        and p[S.ID] not in row[S.QUERY_IMAGE_IDS]
        and all(p[S.ATTRIBUTES][k] == a[k] for a, k in conditions)
    ]


def compose_bench() -> dict:
    pool = products(PRODUCTS)
    by_id = {p[S.ID]: p for p in pool}
    with PeakRSS() as mem:
        index_s, index = timed(compose.ProductIndex, pool)
        compose_s, (rows, rejected) = timed(
            compose.compose_table, index, compose.ComposeParams(num_queries=QUERIES)
        )
    sample = rows[:SCAN_SAMPLE]
    t = time.perf_counter()
    for row in sample:
        positives = scan_positives(pool, row, by_id)
        assert set(row[S.POSITIVE_IDS]) <= set(positives)  # the index found real positives
    scan_per_query = (time.perf_counter() - t) / len(sample)
    total_s = index_s + compose_s
    return write_result(
        "merit_compose_100k",
        value=QUERIES / total_s,
        unit="query draws/s over 100k products (index build included)",
        baseline={
            "what": "positives by scanning the class's products per query, on 1,000 of the same queries",
            "value": round(1 / scan_per_query, 3),
        },
        goal={"bar": 1.0, "direction": "higher", "meaning": "faster than a scan per query"},
        products=PRODUCTS,
        draws=QUERIES,
        kept=len(rows),
        rejected=len(rejected),
        seconds={"index": round(index_s, 3), "compose": round(compose_s, 3)},
        peak_rss_gib=mem.peak_gib,
    )


def main() -> None:
    compose_bench()
    annotate_bench()


if __name__ == "__main__":
    start_ray()
    main()
