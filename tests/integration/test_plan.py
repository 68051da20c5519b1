"""The scale plan on a measured run: the demo workflow (workflows/demo.yaml: its stages and protocols, tiny
models) run end to end at a small size, every stage's manifest carrying its cost block, then
``ray_jobs.plan`` projecting 4x from those manifests with cluster.yaml and its price table.

How close a projection comes to a run 4x larger is a timing, so a benchmark measures it, not a test:
``benchmarks/bench_plan.py`` (``make bench``) runs the demo at a quarter and at full size and records each
stage's error (benchmarks/results/plan_projection.json)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from coral import graph, manifest, storage
from coral.config import load_config
from tests.conftest import REPO, annotate_override, free_port

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]

SCALE = 4


def sized(root, k: int, tiny_models) -> list[str]:
    """The demo at ``k`` times a small size: products, MERIT queries, annotated pairs, training steps."""
    m = tiny_models
    encoders = (
        f"embed.encoders=[{{name: clip_image, kind: clip_image, model: {m['clip']}, batch_size: 32}},"
        f" {{name: dinov2, kind: dinov2, model: {m['dinov2']}, pooling: cls, batch_size: 32}},"
        f" {{name: caption, kind: clip_text, model: {m['clip']}, batch_size: 64}}]"
    )
    return [
        f"run.run_root={root}",
        encoders,
        *annotate_override(m),
        f"train.base={m['qwen2_vl']}",
        f"catalog.num_groups={60 * k}",
        f"merit.queries={{train: {150 * k}, test: {150 * k}}}",
        f"annotate.max_pairs={3 * k}",
        f"train.steps={8 * k}",
        "train.checkpoint_every=1000",  # one checkpoint, at the end, at both sizes
        "train.validation_queries=8",  # validation at start and end: the same work at both sizes
        "evaluate.baseline=false",  # the untrained base scored too: the same path twice, in CI's time
        f"serve.port={free_port()}",
    ]


def costs(root, stages) -> dict[str, dict]:
    return {s: manifest.read_complete(storage.resolve(str(root / s)))["cost"] for s in stages}


def test_the_demo_records_its_costs_and_the_plan_projects_from_them(ray_local, tiny_models, tmp_path):
    small = load_config(REPO / "workflows" / "demo.yaml", sized(tmp_path / "x1", 1, tiny_models))
    rows = graph.run_graph(small)
    assert [r.status for r in rows] == ["ran"] * len(small.run.stages)
    measured = costs(tmp_path / "x1", small.run.stages)
    for stage, c in measured.items():  # the manifest's cost block, and the summary table that shows it
        assert c["wall_s"] > 0 and c["peak_memory_bytes"] > 0 and c["samples"] >= 1, stage
        assert c["fixed_s"] + c["work_s"] == pytest.approx(c["wall_s"], abs=2e-3), stage
        # cpu_s is rounded to 0.01 s and wall_s to 0.001 s: a stage of 0.64 s on warm workers can read
        # cpu_s 0.64 against 1 CPU x 0.639 s
        assert c["cpu_s"] <= c["peak_cpus"] * (c["wall_s"] + 0.0005) + 0.005 + 1e-6, stage
        assert c["gpu_s"] == 0 and c["memory_scope"] == "driver and local Ray", stage
        if c["unit"]:
            assert c["rows_per_s"] == pytest.approx(c["units"] / c["wall_s"], rel=1e-2), stage
    for stage in ("embed", "annotate", "train", "index", "evaluate"):  # Ray actors held CPUs
        assert measured[stage]["cpu_s"] > 0, stage
    assert all(p["startup_s"] is not None for p in measured["embed"]["pools"].values())
    table = graph.format_summary(rows)
    assert table.splitlines()[-1].split()[0] == "total" and "peak_mem" in table

    for stage in ("catalog", "embed", "merit", "annotate", "train", "index", "evaluate"):
        assert measured[stage]["units"] > 0, stage  # the count a projection grows the stage's work with
    for p in measured["embed"]["pools"].values():  # its pools' first batches, counted from its start
        assert 0 < p["first_batch_s"] <= measured["embed"]["wall_s"]

    # the plan command on the first run's manifests, at 4x, on cluster.yaml's node types and prices
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "ray_jobs.plan",
            "--config",
            "workflows/demo.yaml",
            "--from-run",
            str(tmp_path / "x1"),
        ]
        + ["--scale", str(SCALE)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert f"figures: the manifests under {tmp_path / 'x1'}" in out.stdout
    assert "a projection from CPU figures" in out.stdout and "dominant stage: " in out.stdout
    for stage in small.run.stages:
        assert any(line.startswith(stage + " ") for line in out.stdout.splitlines()), stage
