"""``make gpu-check``: the figures that need a GPU, in one command of at most 8 minutes on one H100/H200.

Models are random-init at real sizes, built from configs (no download): a Qwen2-VL-2B-size VLM (the sizes
of Qwen2-VL-2B-Instruct's config.json) and a ViT-L/14-size CLIP. Each part runs in a process of its own
with its own time limit, inside one overall budget (one part at a time on the GPU; two side by side at
tiny size on the CPU, ``Size.lanes``), and writes ``gpu_<part>.json`` (``status`` "ok",
"skipped" with the reason, or "error" with the error); a failing part does not stop the others. This
driver imports no part: each is a module of ``benchmarks.gpu`` that its own process runs
(``python -m benchmarks.gpu.<part> <size> <work dir> <results dir>``), so a part that cannot even be
imported fails alone; sizes in ``benchmarks.gpu.sizes``.

- train: Coral training steps (``coral.train.step.losses``, the ``coral`` retriever, ``CoralHeads``) on the
  Qwen2-VL-2B-size model, bf16, DeepSpeed ZeRO-2 (cluster/deepspeed/zero2.json) on one GPU in a single
  process (no Ray Train): tokens/s and MFU (6 x params x tokens/s over the GPU's dense bf16 peak).
- embed: the embed stage vs a tight loop, ViT-L/14-size CLIP on JPEG bytes (``bench_gpu.embed``).
- knn: faiss-gpu kNN over 1M clustered vectors vs the CPU path (``bench_gpu.knn_gpu``).
- serve: the search route with the Qwen2-VL-2B-size query encoder on the GPU, single queries one at a
  time over HTTP: p50/p99 vs the same work in this process (``serve_setup``, ``serve_load``).
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
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.common import write_status
from benchmarks.gpu.sizes import FULL, PARTS, SIZES, TINY, Size

__all__ = ["FULL", "PARTS", "SIZES", "TINY", "Size", "launch", "main", "settle", "summary"]

REPO = Path(__file__).resolve().parents[1]


def size_name() -> str:
    name = os.environ.get("GPU_CHECK_SIZE", "auto")
    if name == "auto":
        import torch

        return "full" if torch.cuda.is_available() else "tiny"
    if name not in ("full", "tiny"):
        raise SystemExit(f"GPU_CHECK_SIZE must be full, tiny or auto, got {name!r}")
    return name


_running: dict[str, subprocess.Popen] = {}  # the parts' processes now running, by part
_stopping = threading.Event()  # set when this process is interrupted: no part starts after


def launch(name: str, size_key: str, work: Path, out: Path, limit_s: float) -> tuple[int | None, float]:
    """Run a part in a process group of its own; past ``limit_s`` (or when this process is interrupted or
    terminated) stop it. Returns (its exit code, or None when it timed out; seconds)."""
    cmd = [sys.executable, "-m", f"benchmarks.gpu.{name}", size_key, str(work), str(out)]
    started = time.monotonic()
    if _stopping.is_set():
        raise RuntimeError("the gpu check was interrupted")
    proc = _running[name] = subprocess.Popen(cmd, cwd=REPO, start_new_session=True)
    try:
        return proc.wait(timeout=limit_s), time.monotonic() - started
    except subprocess.TimeoutExpired:
        stop(proc)
        return None, time.monotonic() - started
    except BaseException:  # Ctrl-C or SIGTERM here: the part must not outlive this process
        stop(proc)
        raise
    finally:
        _running.pop(name, None)


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
    size = SIZES[size_key]
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
    signal.signal(signal.SIGTERM, terminated)  # a timeout's SIGTERM stops the running parts too
    started, results = time.monotonic(), {}

    def one(name: str, work: Path) -> None:
        (out / f"gpu_{name}.json").unlink(missing_ok=True)
        left = budget - (time.monotonic() - started)
        if left < 10:
            write_status(f"gpu_{name}", "skipped", f"the {budget:.0f} s budget was spent before it", out)
            results[name] = settle(name, out, 0, 0.0, 0.0)
            return
        limit = min(size.limits.get(name, left), left)
        if size.lanes > 1:  # parts side by side: none builds a model into a folder another reads
            work = work / name
            work.mkdir()
        code, seconds = launch(name, size_key, work, out, limit)
        results[name] = settle(name, out, code, seconds, limit)

    with tempfile.TemporaryDirectory(prefix="gpu_check_work_") as work:
        if size.lanes == 1:
            for name in parts:
                one(name, Path(work))
        else:  # the longest first (by its limit), so the lanes end together
            order = sorted(parts, key=lambda n: -size.limits.get(n, 0))
            pool = ThreadPoolExecutor(max_workers=size.lanes)
            try:
                for f in [pool.submit(one, name, Path(work)) for name in order]:
                    f.result()
            except BaseException:  # Ctrl-C or SIGTERM: no part outlives this process
                _stopping.set()
                for proc in list(_running.values()):
                    stop(proc)
                raise
            finally:
                pool.shutdown(wait=False, cancel_futures=True)
    results = {name: results[name] for name in parts if name in results}
    print(summary(results, out, time.monotonic() - started), flush=True)
    return 1 if any(r["status"] == "error" for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
