"""Benchmark plumbing: the local Ray, machine facts, peak-memory samplers, and the JSON result writer.

Every figure is a ratio against a baseline measured in the same process on the same data.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import threading
import time
from pathlib import Path

import psutil

from coral import ray_runtime
from coral.config import RayConfig

RESULTS = Path(__file__).resolve().parent / "results"


def start_ray() -> None:
    """The local Ray every benchmark runs on (``make bench`` starts it once for all of them)."""
    ray_runtime.connect(RayConfig(num_cpus=4, include_dashboard=False))


def machine() -> dict:
    gpu = "none"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": gpu,
    }


def commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except OSError:
        return None


class PeakRSS:
    """Samples the summed RSS of this process and every Ray process (the driver plus its workers)."""

    def __init__(self, period_s: float = 0.2):
        self.period_s, self.peak, self._stop = period_s, 0, threading.Event()

    def _sample(self) -> int:
        total = 0
        for p in psutil.process_iter(["pid", "cmdline", "memory_info"]):
            try:
                cmd = " ".join(p.info["cmdline"] or [])
                if p.info["pid"] == os.getpid() or "ray" in cmd:
                    total += p.info["memory_info"].rss
            except (psutil.Error, TypeError):
                continue
        return total

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.period_s)

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def peak_gib(self) -> float:
        return round(self.peak / 2**30, 2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t, out


RUNS = 3  # every whole-stage figure: the median of this many runs, each interleaved with its baseline


def interleaved(stage, baseline, runs: int = RUNS) -> list[dict]:
    """``runs`` rounds of ``baseline()`` then ``stage()`` in this process, so that a drift in the
    machine's speed falls on both alike: per round {"baseline": (seconds, result), "stage": ...}."""
    return [{"baseline": timed(baseline), "stage": timed(stage)} for _ in range(runs)]


def median(xs) -> float:
    return float(statistics.median(xs))


class PeakGPU:
    """Samples the GPU memory in use on device 0 by every process (``nvidia-smi``: no CUDA context here),
    so Ray actors' use counts; ``peak_gib`` is None without nvidia-smi or a GPU."""

    def __init__(self, period_s: float = 0.5):
        self.period_s, self.peak, self._stop = period_s, None, threading.Event()

    @staticmethod
    def used_mib() -> int | None:
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "--id=0"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            return int(out.stdout.split()[0]) if out.returncode == 0 else None
        except (OSError, ValueError, IndexError, subprocess.SubprocessError):
            return None

    def _run(self):
        while not self._stop.is_set():
            used = self.used_mib()
            if used is None:
                return
            self.peak = max(self.peak or 0, used)
            self._stop.wait(self.period_s)

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def peak_gib(self) -> float | None:
        return None if self.peak is None else round(self.peak / 1024, 2)


def write_result(
    name: str,
    value: float,
    unit: str,
    baseline: dict,
    goal: dict,
    goal_on: str = "ratio",
    out_dir: Path | None = None,
    run_ratios: list[float] | None = None,
    **extra,
) -> dict:
    """Write ``out_dir``/<name>.json (default benchmarks/results); ``baseline`` = {"what", "value"}; ``goal``
    = {"bar", "direction"}, judged on the ratio to the baseline, or on the value itself (``goal_on="value"``,
    e.g. added latency). ``run_ratios``: each interleaved run's own ratio (value and baseline are then the
    runs' medians); ``goal_on="every_run"`` judges the worst of them."""
    ratio = round(value / baseline["value"], 3) if baseline.get("value") else None
    if run_ratios is not None:
        extra["run_ratios"] = [round(r, 3) for r in run_ratios]
    worst = min(run_ratios) if run_ratios else None
    if worst is not None and goal["direction"] == "lower":
        worst = max(run_ratios)
    judged = {"value": value, "every_run": worst}.get(goal_on, ratio)
    result = {
        "name": name,
        "value": round(value, 3),
        "unit": unit,
        "baseline": baseline,
        "ratio": ratio,
        "goal": goal,
        "goal_met": None
        if judged is None
        else (judged >= goal["bar"] if goal["direction"] == "higher" else judged <= goal["bar"]),
        "goal_on": goal_on,
        **stamp(),
        **extra,
    }
    return _write(result, out_dir)


def write_status(name: str, status: str, reason: str, out_dir: Path | None = None, **extra) -> dict:
    """Write <name>.json for a benchmark that did not produce its figure: ``status`` "skipped" (what it
    needs is missing here) or "error" (it failed), with the reason and whatever it measured before."""
    return _write({"name": name, "status": status, "reason": reason, **stamp(), **extra}, out_dir)


def stamp() -> dict:
    return {
        "machine": machine(),
        "commit": commit(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _write(result: dict, out_dir: Path | None) -> dict:
    out = Path(out_dir) if out_dir is not None else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{result['name']}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result
