"""``make gpu-check``: the figures that need a GPU, in one command of at most 8 minutes on one H100/H200.

Models are random-init at real sizes, built from configs (no download): a Qwen2-VL-2B-size VLM (the sizes
of Qwen2-VL-2B-Instruct's config.json) and a ViT-L/14-size CLIP. Each part runs in a process of its own
with its own time limit, inside one overall budget, and writes ``gpu_<part>.json`` (``status`` "ok",
"skipped" with the reason, or "error" with the error); a failing part does not stop the others.

- train: Coral training steps (``coral.train.step.losses``, the ``coral`` retriever, ``CoralHeads``) on the
  Qwen2-VL-2B-size model, bf16, DeepSpeed ZeRO-2 (cluster/deepspeed/zero2.json) on one GPU in a single
  process (no Ray Train): tokens/s and MFU (6 x params x tokens/s over the GPU's dense bf16 peak).
- embed: the embed stage vs a tight loop, ViT-L/14-size CLIP on JPEG bytes (``bench_gpu.embed``).
- knn: faiss-gpu kNN over 1M clustered vectors vs the CPU path (``bench_gpu.knn_gpu``).
- serve: the search route with the Qwen2-VL-2B-size query encoder on the GPU, single queries one at a
  time over HTTP: p50/p99 vs the same work in this process (``bench_serve``).
- annotate: the describe step on vLLM (``ray.data.llm``, ``coral.annotate.vllm``) vs the hf engine,
  generated tokens/s at a fixed number of new tokens (random weights write gibberish).

    make gpu-check                                      # full size on a GPU; results: benchmarks/results/gpu_*.json
    GPU_CHECK_SIZE=tiny python -m benchmarks.gpu_check  # the same code at tiny size on the CPU (the CI test)

Environment: ``GPU_CHECK_SIZE`` (auto: full with a CUDA GPU, else tiny), ``GPU_CHECK_OUT`` (results; tiny
default: a new temp dir), ``GPU_CHECK_BUDGET_S``, ``GPU_CHECK_PARTS`` (e.g. ``train,knn``),
``GPU_CHECK_PEAK_TFLOPS`` (the peak for MFU on a device not in ``bench_train.PEAK_BF16_TFLOPS``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARTS = ("train", "embed", "knn", "serve", "annotate")  # the most uncertain and longest last
# Qwen2-VL-2B-Instruct's config.json: 2.21B parameters (language model 1.54B with the tied embedding,
# vision tower 0.67B); the tokenizer stays the tiny one (its ids are a subset of the vocabulary)
QWEN2_VL_2B = {
    "text": dict(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
    ),
    "vision": dict(
        depth=32,
        embed_dim=1280,
        hidden_size=1536,
        num_heads=16,
        mlp_ratio=4,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
    ),
    "tie_word_embeddings": True,
}


@dataclass(frozen=True)
class Size:
    device: str
    dtype: str
    qwen: dict  # build_qwen's keyword arguments
    train_batch: int  # queries per step, each with its positive and hard negatives
    train_steps: int  # timed, after two warm-up steps
    train_image_px: int
    max_image_tokens: int
    clip: dict
    images: int
    embed_batch: int
    knn_vectors: int
    serve_queries: int  # a multiple of bench_serve.ROUND
    hf_prompts: int
    vllm_prompts: int
    new_tokens: int
    gen_batch: int
    describe_px: int
    serve_groups: int  # catalog groups (3 products each) of the served run
    budget_s: float
    limits: dict = field(default_factory=dict)  # seconds per part at most


FULL = Size(
    device="cuda",
    dtype="bfloat16",
    qwen=dict(sizes=QWEN2_VL_2B, max_pixels=448 * 448, device="cuda", dtype="bfloat16"),
    train_batch=4,
    train_steps=10,
    train_image_px=280,  # 100 visual tokens an image
    max_image_tokens=256,
    clip=dict(image_size=224, hidden=1024, layers=24, patch=14, intermediate=4096, projection=768),
    images=4096,
    embed_batch=256,
    knn_vectors=1_000_000,
    serve_queries=200,
    hf_prompts=64,
    vllm_prompts=512,
    new_tokens=128,
    gen_batch=16,
    describe_px=336,  # 144 visual tokens an image (two a describe prompt, one a served query)
    serve_groups=100,
    budget_s=480.0,
    limits={"train": 150, "embed": 150, "knn": 120, "serve": 150, "annotate": 240},
)
TINY = Size(
    device="cpu",
    dtype="float32",
    qwen=dict(sizes={"text": {"vocab_size": 2048}}),  # more ids than the tokenizer has, as at full size
    train_batch=2,
    train_steps=2,
    train_image_px=56,
    max_image_tokens=16,
    clip=dict(image_size=64, hidden=64, layers=2, patch=16),
    images=16,
    embed_batch=8,
    knn_vectors=5_000,
    serve_queries=10,
    hf_prompts=4,
    vllm_prompts=0,
    new_tokens=8,
    gen_batch=2,
    describe_px=64,
    serve_groups=20,
    budget_s=240.0,
    limits={"train": 90, "embed": 90, "knn": 60, "serve": 120, "annotate": 60},
)


class Skipped(Exception):
    """A part that cannot run here (what it needs is missing): recorded as skipped with the reason."""


def size_name() -> str:
    name = os.environ.get("GPU_CHECK_SIZE", "auto")
    if name == "auto":
        import torch

        return "full" if torch.cuda.is_available() else "tiny"
    if name not in ("full", "tiny"):
        raise SystemExit(f"GPU_CHECK_SIZE must be full, tiny or auto, got {name!r}")
    return name


def start_ray() -> None:
    """A local Ray of the part's own, never a cluster that ``ray start`` left on the machine (which a bare
    ``ray.init`` joins), set up as ``coral.ray_runtime.connect`` sets up a local one; the stages then find
    it running."""
    import logging

    import ray

    os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
    ray.init(
        address="local",
        num_cpus=max(4, os.cpu_count() or 1),  # logical CPUs: actor pools beside their read tasks
        include_dashboard=False,
        configure_logging=True,
        logging_level=logging.WARNING,
    )


def qwen(size: Size, work: Path) -> Path:
    """The Qwen2-VL of this size, built once into ``work`` by the first part that needs it."""
    from coral.models.tiny import MARKER, build_qwen

    out = work / "qwen2_vl"
    if not (out / MARKER).exists():
        build_qwen(out, "2", **size.qwen)
        (out / MARKER).write_text("gpu_check\n")
        if size.device == "cuda":
            import torch

            torch.cuda.empty_cache()  # the build's memory goes back to the GPU, for Ray's actors
    return out


def part_train(size: Size, work: Path, out: Path) -> None:
    from benchmarks import bench_train
    from benchmarks.common import write_result

    base = str(qwen(size, work))
    m = bench_train.deepspeed_steps(
        base,
        size.device,
        size.dtype,
        size.train_batch,
        size.train_steps,
        size.train_image_px,
        size.max_image_tokens,
    )
    peak, source = bench_train.peak_tflops(size.device)
    params, vision, seconds = m["params"], m["vision_params"], m["seconds"]
    per_s = m["tokens"] / seconds
    flops = 6 * params * per_s
    by_tower = 6 * ((params - vision) * m["tokens"] + vision * m["patches"]) / seconds
    write_result(
        "gpu_train",
        value=per_s,
        unit="language-model tokens/s (the real tokens, text and visual, of every forward of a step)",
        baseline={
            "what": "tokens/s at the device's dense bf16 peak: peak FLOP/s / (6 x params); the ratio is the MFU",
            "value": round(peak * 1e12 / (6 * params), 3) if peak else None,
        },
        goal={
            "bar": 0.25,
            "direction": "higher",
            "meaning": "MFU >= 25% (a first bar, to revisit once measured)",
        },
        out_dir=out,
        mfu=round(flops / (peak * 1e12), 4) if peak else None,
        mfu_formula="6 * params * tokens / seconds / peak_flops",
        mfu_by_tower=round(by_tower / (peak * 1e12), 4) if peak else None,
        mfu_by_tower_formula=(
            "6 * ((params - vision params) * tokens + vision params * image patches) / seconds / peak_flops"
        ),
        model_tflops=round(flops / 1e12, 3),
        peak_tflops=peak,
        peak_source=source,
        params=params,
        vision_params=vision,
        tokens_per_step=m["tokens"] / size.train_steps,
        patches_per_step=m["patches"] / size.train_steps,
        steps=size.train_steps,
        step_s=round(seconds / size.train_steps, 4),
        batch={
            "queries": size.train_batch,
            "candidates_per_query": bench_train.K + 1,
            "image_px": size.train_image_px,
        },
        loss=round(m["loss"], 4),
        zero_stage=m["zero_stage"],
        device=size.device,
        dtype=size.dtype,
        model={"kind": "qwen2_vl (random init)", **{k: v for k, v in size.qwen.items() if k != "device"}},
        peak_rss_gib=m["peak_rss_gib"],
        peak_gpu_gib=m["peak_gpu_gib"],
    )


def part_embed(size: Size, work: Path, out: Path) -> None:
    from benchmarks import bench_gpu

    start_ray()
    bench_gpu.embed(
        str(work / "embed"), size.images, size.clip, size.device, "gpu_embed", size.embed_batch, out
    )


def part_knn(size: Size, work: Path, out: Path) -> None:
    from benchmarks import bench_gpu

    if size.device == "cuda" and not bench_gpu.faiss_gpu():
        raise Skipped("faiss-gpu or a GPU is missing: pip uninstall faiss-cpu, then pip install .[gpu]")
    start_ray()
    bench_gpu.knn_gpu(size.knn_vectors, "gpu_knn", out)


def part_serve(size: Size, work: Path, out: Path) -> None:
    from benchmarks import bench_serve
    from benchmarks.common import PeakGPU, PeakRSS, write_result

    start_ray()
    gpus = 1 if size.device == "cuda" else 0
    where = [f"device={size.device}", f"dtype={size.dtype}"]
    extra = (
        f"catalog.image_size={size.describe_px}",  # query and candidate images of a real size
        f"catalog.num_groups={size.serve_groups}",
        *[f"index.{w}" for w in where],
        f"index.num_gpus={gpus}",
        *[f"serve.{w}" for w in where],
        f"serve.encoder.num_gpus={gpus}",
    )
    cfg, queries = bench_serve.prepare(str(work / "serve"), base=str(qwen(size, work)), extra=extra)
    local = bench_serve.InProcess(cfg)

    def run(url: str) -> dict:
        path = "proxy" if url == bench_serve.deploy.url_of(cfg.serve) else "direct"
        return {"path": path, **bench_serve.sequential({"served": url}, local, queries, size.serve_queries)}

    with PeakRSS() as mem, PeakGPU() as gpu:
        times = bench_serve.with_serve(cfg, run)
    served, base = bench_serve.ms(times["served"]), bench_serve.ms(times["in_process"])
    write_result(
        "gpu_serve",
        value=served["p50_ms"],
        unit="ms, p50 of single /v1/search queries one at a time over HTTP (one product part each)",
        baseline={
            "what": "in-process call: processor, model on the same device, FAISS search",
            "value": base["p50_ms"],
        },
        goal={
            "bar": 25.0,
            "direction": "lower",
            "meaning": "p50 <= 25 ms (a first bar, to revisit once measured)",
        },
        goal_on="value",
        out_dir=out,
        served=served,
        in_process=base,
        in_process_after_idle=bench_serve.ms(times["in_process_idle"]),
        queries=size.serve_queries,
        path=times["path"],
        device=size.device,
        dtype=size.dtype,
        peak_rss_gib=mem.peak_gib,
        peak_gpu_gib=gpu.peak_gib,
    )


def part_annotate(size: Size, work: Path, out: Path) -> None:
    from benchmarks import bench_annotate
    from benchmarks.common import PeakRSS, write_result, write_status
    from coral import schemas as S
    from coral.catalog.generate import generate_table
    from coral.config import AnnotateConfig, CatalogConfig
    from coral.stages.annotate import PAIR_ID, Describe

    base = str(qwen(size, work))
    images = generate_table(CatalogConfig(num_groups=16, image_size=size.describe_px), range(16))
    step = Describe(AnnotateConfig(), images.select([S.ID, S.IMAGE]))
    ids = images.column(S.ID).to_pylist()
    rows = [
        {PAIR_ID: f"pair{i:05d}", S.QUERY_ID: ids[i % len(ids)], S.TARGET_ID: ids[(i + 1) % len(ids)]}
        for i in range(max(size.hf_prompts, size.vllm_prompts))
    ]
    prompts = [step.prompt(r) for r in rows[: size.hf_prompts]]
    with PeakRSS() as mem:
        hf = bench_annotate.hf_rate(base, prompts, size.new_tokens, size.gen_batch, size.device, size.dtype)
    common = dict(
        out_dir=out,
        step="describe: two images a prompt (coral.annotate.prompts.describe_prompt)",
        new_tokens=size.new_tokens,
        hf=hf,
        device=size.device,
        dtype=size.dtype,
        peak_rss_gib=mem.peak_gib,
        peak_gpu_gib=hf["peak_gpu_gib"],
    )
    reason = None
    if size.device != "cuda":
        reason = "vLLM needs a CUDA GPU (the tiny size runs on the CPU); the hf engine was measured"
    else:
        try:
            import vllm
        except Exception as e:  # any import failure: a missing or broken install
            reason = f"vllm is not importable ({type(e).__name__}: {e}); pip install .[vllm]"
    if reason:
        write_status("gpu_annotate", "skipped", reason, **common)
        return
    start_ray()
    v = bench_annotate.vllm_rate(base, step, rows[: size.vllm_prompts], size.new_tokens, size.dtype)
    common["peak_gpu_gib"] = max(x for x in (hf["peak_gpu_gib"], v["peak_gpu_gib"], 0) if x is not None)
    write_result(
        "gpu_annotate",
        value=v["tokens_per_s"] or v["whole_run_tokens_per_s"],
        unit=f"generated tokens/s, vLLM through ray.data.llm, {size.new_tokens} new tokens a prompt"
        " (steady: the blocks after the first)",
        baseline={
            "what": "the hf engine (transformers generate), batched, in this process",
            "value": hf["tokens_per_s"],
        },
        goal={"bar": 3.0, "direction": "higher", "meaning": "vLLM >= 3x the hf engine's generated tokens/s"},
        vllm={**v, "version": vllm.__version__},
        **common,
    )


RUNNERS = {
    "train": part_train,
    "embed": part_embed,
    "knn": part_knn,
    "serve": part_serve,
    "annotate": part_annotate,
}


def run_part(name: str, size_key: str, work: Path, out: Path) -> int:
    """In the part's own process: run it; a skip or an error is written as its result."""
    from benchmarks.common import write_status

    size = {"full": FULL, "tiny": TINY}[size_key]
    try:
        RUNNERS[name](size, work, out)
    except Skipped as e:
        write_status(f"gpu_{name}", "skipped", str(e), out)
    except BaseException as e:  # the part's result records whatever went wrong, then the others run
        write_status(
            f"gpu_{name}", "error", f"{type(e).__name__}: {e}", out, traceback=traceback.format_exc()
        )
        return 1
    return 0


def launch(name: str, size_key: str, work: Path, out: Path, limit_s: float) -> tuple[int | None, float]:
    """Run a part in a process group of its own; past ``limit_s`` (or when this process is interrupted or
    terminated) stop it. Returns (its exit code, or None when it timed out; seconds)."""
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--part", name, size_key, str(work), str(out)]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True)
    try:
        return proc.wait(timeout=limit_s), time.monotonic() - started
    except subprocess.TimeoutExpired:
        stop(proc)
        return None, time.monotonic() - started
    except BaseException:  # Ctrl-C or SIGTERM here: the part must not outlive this process
        stop(proc)
        raise


def stop(proc: subprocess.Popen) -> None:
    """SIGINT first, so the part's finally blocks shut Serve and Ray down; then kill its process group."""
    for sig, wait_s in ((signal.SIGINT, 20), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            pass


def terminated(signum, frame) -> None:
    raise SystemExit(128 + signum)


def settle(name: str, out: Path, code: int | None, seconds: float, limit_s: float) -> dict:
    """The part's result, with its wall time; written here when the part could not write it."""
    from benchmarks.common import write_status

    path = out / f"gpu_{name}.json"
    if code is None:
        write_status(f"gpu_{name}", "error", f"timed out after {limit_s:.0f} s (its output is above)", out)
    elif not path.exists():
        write_status(f"gpu_{name}", "error", f"its process exited with code {code} without a result", out)
    result = json.loads(path.read_text())
    result.setdefault("status", "ok")
    result["part_seconds"] = round(seconds, 1)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def summary(results: dict[str, dict], out: Path, seconds: float) -> str:
    def num(x) -> str:
        return "-" if x is None else f"{x:,.3f}" if isinstance(x, float) and abs(x) < 1000 else f"{x:,.0f}"

    head = (
        f"{'part':<9} {'status':<8} {'value':>12} {'baseline':>12} {'ratio':>8} {'GPU GiB':>8} {'RSS GiB':>8}"
        f" {'s':>5}  unit / reason"
    )
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        ok = r["status"] == "ok"
        lines.append(
            f"{name:<9} {r['status']:<8} {num(r.get('value')):>12} {num((r.get('baseline') or {}).get('value')):>12}"
            f" {num(r.get('ratio')):>8} {num(r.get('peak_gpu_gib')):>8} {num(r.get('peak_rss_gib')):>8}"
            f" {r.get('part_seconds', 0):>5.0f}  "
            + (r.get("unit" if ok else "reason") or "-").splitlines()[0][:100]
        )
    lines.append(f"{len(results)} parts in {seconds:.0f} s; results in {out}")
    return "\n".join(lines)


def main() -> int:
    size_key = size_name()
    size = {"full": FULL, "tiny": TINY}[size_key]
    if size_key == "full":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("GPU_CHECK_SIZE=full needs a CUDA GPU; GPU_CHECK_SIZE=tiny runs on the CPU")
    default_out = REPO / "benchmarks" / "results" if size_key == "full" else None
    out = Path(os.environ.get("GPU_CHECK_OUT") or default_out or tempfile.mkdtemp(prefix="gpu_check_"))
    out.mkdir(parents=True, exist_ok=True)
    budget = float(os.environ.get("GPU_CHECK_BUDGET_S", size.budget_s))
    parts = [p for p in os.environ.get("GPU_CHECK_PARTS", ",".join(PARTS)).split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise SystemExit(f"GPU_CHECK_PARTS: unknown parts {sorted(unknown)}; known: {', '.join(PARTS)}")
    print(
        f"gpu check, {size_key} size, {budget:.0f} s budget, parts {', '.join(parts)}; results in {out}",
        flush=True,
    )
    from benchmarks.common import write_status

    signal.signal(signal.SIGTERM, terminated)  # a timeout's SIGTERM stops the running part too
    started, results = time.monotonic(), {}
    with tempfile.TemporaryDirectory(prefix="gpu_check_work_") as work:
        for name in parts:
            (out / f"gpu_{name}.json").unlink(missing_ok=True)
            left = budget - (time.monotonic() - started)
            if left < 10:
                write_status(f"gpu_{name}", "skipped", f"the {budget:.0f} s budget was spent before it", out)
                results[name] = settle(name, out, 0, 0.0, 0.0)
                continue
            limit = min(size.limits.get(name, left), left)
            code, seconds = launch(name, size_key, Path(work), out, limit)
            results[name] = settle(name, out, code, seconds, limit)
    print(summary(results, out, time.monotonic() - started), flush=True)
    return 1 if any(r["status"] == "error" for r in results.values()) else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--part"]:
        name, size_key, work, out = sys.argv[2:6]
        sys.exit(run_part(name, size_key, Path(work), Path(out)))
    sys.exit(main())
