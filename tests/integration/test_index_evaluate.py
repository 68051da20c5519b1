"""index + evaluate on a short training run: the index is bound to the trained checkpoint, the evaluation
writes trained and baseline rows, a report with plots and every query's rank; a mismatched checkpoint is
refused naming both; a gate below the trained figures stops the graph with exit code 1."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from coral import checkpoint, manifest, storage
from coral import schemas as S
from coral.mining import knn
from coral.stages import index as index_stage
from tests.conftest import REPO
from tests.integration.conftest import overrides

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def run(trained_run):
    return trained_run


def test_index_is_bound_to_the_trained_checkpoint(run, tiny_models):
    root, cfg = run
    meta = json.loads((root / "index" / "index.json").read_text())
    trained = checkpoint.describe(str(root / "train" / "model"), "coral")
    assert meta["checkpoint"]["hash"] == trained.hash and meta["dim"] == trained.dim
    test_products = [p for p in pq.read_table(root / "catalog" / "data").to_pylist() if p[S.SPLIT] == "test"]
    assert meta["count"] == len(test_products)
    index, _, table = index_stage.load(storage.resolve(str(root / "index")), cfg.index)
    assert table["row"].to_pylist() == list(range(meta["count"]))
    assert sorted(table[S.ID].to_pylist()) == sorted(p[S.ID] for p in test_products)
    emb = np.asarray(table["embedding"].combine_chunks().flatten(), np.float32).reshape(meta["count"], -1)
    _, top = knn.search(index, emb[:20], 1)
    assert top[:, 0].tolist() == list(range(20))  # every candidate finds itself
    untrained = checkpoint.describe(str(tiny_models["qwen2_vl"]), "coral")
    with pytest.raises(checkpoint.IndexMismatch) as e:
        checkpoint.check_bound(meta, untrained, "the run's index")
    assert trained.hash in str(e.value) and untrained.hash in str(e.value)
    clip = checkpoint.describe(str(tiny_models["clip"]), "mmret_clip")
    with pytest.raises(
        checkpoint.IndexMismatch, match=f"embedding size {meta['dim']}.*embedding size {clip.dim}"
    ):
        checkpoint.check_bound(meta, clip, "the run's index")


def test_evaluation_writes_trained_and_baseline_rows(run):
    root, _ = run
    m = json.loads((root / "evaluate" / "metrics.json").read_text())
    held = [r for r in pq.read_table(root / "merit" / "data").to_pylist() if r[S.SPLIT] == "test"]
    for model in ("trained", "baseline"):
        s = m["models"][model]
        assert s["queries"] == len(held)
        assert 0 <= s["R@1"] <= s["R@5"] <= s["R@10"] <= 1 and s["R@1"] <= s["MRR@10"] <= s["R@10"]
        lo, hi = s["intervals"]["R@1"]
        assert lo <= s["R@1"] <= hi
        assert sum(g["queries"] for g in s["by"]["conditions"].values()) == len(held)
        assert set(s["by"]) == {"conditions", "language", "class"}
        assert set(s["ood"]) == {"language", "attribute", "class"}  # the merit stage's OOD labels
        assert all(label.startswith("ood_") for kind in s["ood"].values() for label in kind)
        assert sum(g["queries"] for g in s["ood"]["language"].values()) > 0
    ranks = pq.read_table(root / "evaluate" / "data").to_pylist()
    assert len(ranks) == 2 * len(held)
    trained = [r["rank"] for r in ranks if r["model"] == "trained"]
    assert np.mean([r == 1 for r in trained]) == pytest.approx(m["models"]["trained"]["R@1"])
    for name in ("report.md", "ranks.png", "r1_by_conditions.png", "r1_by_language.png", "r1_by_class.png"):
        assert (root / "evaluate" / name).stat().st_size > 100, name
    assert (root / "evaluate" / "ranks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    row = manifest.read_complete(storage.resolve(str(root)).child("evaluate"))
    assert row["details"]["trained"]["queries"] == len(held)


def test_gate_below_the_figures_stops_the_graph_with_exit_code_1(run, tiny_models):
    root, _ = run
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "ray_jobs.run",
            "--config",
            str(REPO / "workflows" / "ci_small.yaml"),
            "--from",
            "evaluate",
            *overrides(root, tiny_models),
            "evaluate.gate={R@10: 1.0, R@1: 0.0}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 1, r.stderr[-3000:]
    value = json.loads((root / "evaluate" / "metrics.json").read_text())["models"]["trained"]["R@10"]
    assert value < 1.0
    assert f"R@10 = {value:.4f} is below the bar 1.0" in r.stderr, r.stderr[-3000:]
    assert "R@1 =" not in r.stderr  # a met bar is not reported
