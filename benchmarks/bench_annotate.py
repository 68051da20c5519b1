"""Annotation benchmarks.

- annotate stage (MegaPairs describe + instruct, hf engine, one actor per step): pairs/s at the
  configured batch size vs batch size 1, same actors, models and pairs. Describe runs on a random Qwen2-VL,
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
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import PeakRSS, timed, write_result
from coral import graph
from coral import schemas as S
from coral.catalog import vocab
from coral.config import load_config
from coral.merit import compose
from coral.models.tiny import build_all, build_qwen, build_qwen2_text

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
            f"annotate.max_pairs={PAIRS}",
            # 128 pairs over the default 32 sets would make a quarter of the heads first-time misses, a start-up
            # cost that a run over thousands of pairs spreads thin; 4 sets stand for that steady state
            f"annotate.demonstration_sets={SETS}",
        ],
    )


def run_stage(cfg) -> dict:
    """Rerun annotate; its manifest's per-step details (requests, rate after the first batch)."""
    from coral import manifest, storage

    rows = graph.run_graph(cfg, "annotate")
    assert rows[-1].rows_in == PAIRS
    m = manifest.read_complete(storage.resolve(cfg.run.run_root).child("annotate"))
    return {step: m["details"][step] for step in ("describe", "instruct")}


def run_batches(engine, ps: list, size: int) -> int:
    return sum(len(engine.generate(ps[i : i + size])) for i in range(0, len(ps), size))


def per_step(vlm: str, llm: str) -> dict:
    """Seconds for 2 * BATCH prompts of each step, one at a time vs in batches, in this process."""
    import torch
    from PIL import Image

    from coral.annotate import engines, prompts
    from coral.catalog import draw
    from coral.config import EngineConfig

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


def annotate_bench() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tiny = build_all(f"{tmp}/tiny", ("clip",))
        tiny["qwen_bench"], tiny["qwen_text_bench"] = Path(tmp) / "qwen_bench", Path(tmp) / "qwen_text_bench"
        build_qwen(tiny["qwen_bench"], "2", **BENCH_QWEN)
        build_qwen2_text(tiny["qwen_text_bench"], **BENCH_QWEN)
        steps = per_step(str(tiny["qwen_bench"]), str(tiny["qwen_text_bench"]))
        graph.run_graph(annotate_config(tmp, tiny, BATCH), until="mine")
        one_s, one = timed(run_stage, annotate_config(tmp, tiny, 1))
        with PeakRSS() as mem:
            batched_s, batched = timed(run_stage, annotate_config(tmp, tiny, BATCH))
    rate = "pairs_per_s_after_first_batch"
    return write_result(
        "annotate_hf_batching",
        value=batched["instruct"][rate],
        unit=(
            "pairs/s once the actors are up (the last step's batches after its first; describe on a random "
            "Qwen2-VL, instruct on a random Qwen2 LLM, 512x4, hf engine, one actor each, CPU)"
        ),
        baseline={"what": "the same stage at batch size 1", "value": one["instruct"][rate]},
        goal={"bar": 3.0, "direction": "higher", "meaning": f"batch size {BATCH} >= 3x batch size 1"},
        whole_stage={
            "what": "pairs/s over the stage's whole run, actor start-up and model loading included",
            "batched": round(PAIRS / batched_s, 3),
            "batch_1": round(PAIRS / one_s, 3),
            "ratio": round(one_s / batched_s, 3),
        },
        steps={"batched": batched, "batch_1": one},
        pairs=PAIRS,
        batch_size=BATCH,
        new_tokens=NEW_TOKENS,
        model={"describe": "qwen2_vl (random init)", "instruct": "qwen2 (random init)", **BENCH_QWEN},
        demonstration_sets=SETS,
        per_step=steps,
        seconds={"batched": round(batched_s, 3), "batch_1": round(one_s, 3)},
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
    from benchmarks.run_all import start_ray

    start_ray()
    main()
