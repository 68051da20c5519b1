"""``make gpu-check`` at tiny size on the CPU: every part runs the code it runs on a GPU, each in its own
process, and writes gpu_<part>.json; vLLM is skipped here with its reason. Asserts on structure and on
finite positive numbers, never on speeds."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from benchmarks import gpu_check
from benchmarks.gpu import part
from tests.conftest import REPO

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def positive(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


@pytest.mark.timeout(360)
def test_tiny_gpu_check_writes_every_part(tmp_path):
    env = {
        **os.environ,
        "GPU_CHECK_SIZE": "tiny",
        "GPU_CHECK_OUT": str(tmp_path),
        "GPU_CHECK_PEAK_TFLOPS": "0.1",  # a nominal peak (100 GFLOP/s), so the MFU arithmetic runs
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.gpu_check"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=330)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the check stops its running part on SIGTERM
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stdout[-4000:] + stderr[-4000:]
    results = {p: json.loads((tmp_path / f"gpu_{p}.json").read_text()) for p in gpu_check.PARTS}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"gpu_{p}.json" for p in gpu_check.PARTS)
    for name in ("train", "embed", "knn", "serve"):
        r = results[name]
        assert r["status"] == "ok", (name, r.get("reason"), r.get("traceback"))
        assert r["name"] == f"gpu_{name}" and r["unit"] and r["baseline"]["what"], name
        assert positive(r["value"]) and positive(r["baseline"]["value"]) and positive(r["ratio"]), name
        assert positive(r["peak_rss_gib"]) and "peak_gpu_gib" in r, name
        assert positive(r["part_seconds"]) and r["machine"]["cores"], name
    train = results["train"]
    assert train["mfu_formula"] == "6 * params * tokens / seconds / peak_flops"
    assert positive(train["mfu"]) and positive(train["mfu_by_tower"]) and positive(train["model_tflops"])
    assert math.isclose(train["mfu"], train["ratio"], rel_tol=0.01, abs_tol=1e-3)
    assert train["zero_stage"] == 2 and train["peak_source"] == "GPU_CHECK_PEAK_TFLOPS"
    assert positive(train["params"]) and 0 < train["vision_params"] < train["params"]
    assert positive(train["tokens_per_step"]) and positive(train["patches_per_step"])
    assert math.isfinite(train["loss"])
    assert isinstance(results["knn"]["gpu"], bool) and results["knn"]["vectors"] == gpu_check.TINY.knn_vectors
    assert 0 <= results["knn"]["neighbours_shared_with_cpu_path"] <= 1
    assert results["embed"]["images"] == gpu_check.TINY.images
    serve = results["serve"]
    assert serve["queries"] == gpu_check.TINY.serve_queries
    assert serve["served"]["p50_ms"] <= serve["served"]["p99_ms"]
    annotate = results["annotate"]
    assert annotate["status"] == "skipped" and "CUDA" in annotate["reason"]
    hf = annotate["hf"]
    assert positive(hf["tokens_per_s"]) and hf["prompts"] == gpu_check.TINY.hf_prompts
    assert 0 < hf["generated_tokens"] <= hf["prompts"] * gpu_check.TINY.new_tokens
    for name in gpu_check.PARTS:  # the summary table
        assert any(line.startswith(name) for line in stdout.splitlines()), name
    assert f"results in {tmp_path}" in stdout


def test_a_failing_part_records_its_error_and_a_timeout(tmp_path):
    def broken(size, work, out):
        raise RuntimeError("no such device")

    assert part.run_part("knn", broken, "tiny", tmp_path, tmp_path) == 1
    r = gpu_check.settle("knn", tmp_path, 1, 2.0, 60.0)
    assert (
        r["status"] == "error"
        and r["reason"] == "RuntimeError: no such device"
        and "broken" in r["traceback"]
    )
    r = gpu_check.settle("serve", tmp_path, None, 61.0, 60.0)
    assert r["status"] == "error" and "timed out after 60 s" in r["reason"]
    r = gpu_check.settle("train", tmp_path, -9, 3.0, 60.0)
    assert r["status"] == "error" and "exited with code -9" in r["reason"]
    table = gpu_check.summary({"knn": json.loads((tmp_path / "gpu_knn.json").read_text())}, tmp_path, 5.0)
    assert "knn" in table and "RuntimeError: no such device" in table
