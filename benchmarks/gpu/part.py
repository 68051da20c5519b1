"""What every gpu-check part shares, in the part's own process: its entry point (``main``), the recording
of a skip or an error as its result (``run_part``), its local Ray, and the Qwen2-VL of its size."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import ray
import torch

from benchmarks.common import write_status
from benchmarks.gpu.sizes import SIZES, Size
from coral.testing import corpus
from coral.testing.tiny import MARKER, build_qwen

Runner = Callable[[Size, Path, Path], None]  # run(size, work dir, results dir)


class Skipped(Exception):
    """A part that cannot run here (what it needs is missing): recorded as skipped with the reason."""


def start_ray() -> None:
    """A local Ray of the part's own, never a cluster that ``ray start`` left on the machine (which a bare
    ``ray.init`` joins), set up as ``coral.ray_runtime.connect`` sets up a local one; the stages then find
    it running."""
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
    out = work / "qwen2_vl"
    if not (out / MARKER).exists():
        build_qwen(out, "2", **size.qwen, corpus=corpus.project())
        (out / MARKER).write_text("gpu_check\n")
        if size.device == "cuda":
            torch.cuda.empty_cache()  # the build's memory goes back to the GPU, for Ray's actors
    return out


def run_part(name: str, run: Runner, size_key: str, work: Path, out: Path) -> int:
    """Run part ``name``; a skip or an error is written as its result."""
    try:
        run(SIZES[size_key], work, out)
    except Skipped as e:
        write_status(f"gpu_{name}", "skipped", str(e), out)
    except BaseException as e:  # the part's result records whatever went wrong, then the others run
        write_status(
            f"gpu_{name}", "error", f"{type(e).__name__}: {e}", out, traceback=traceback.format_exc()
        )
        return 1
    return 0


def main(name: str, run: Runner) -> None:
    """``python -m benchmarks.gpu.<name> <size> <work dir> <results dir>``, as the gpu check launches it."""
    size_key, work, out = sys.argv[1:4]
    sys.exit(run_part(name, run, size_key, Path(work), Path(out)))
