"""The annotate stage (MegaPairs) on real mined pairs with the tiny Qwen2-VL on the hf engine."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from coral import graph, manifest, storage
from coral import schemas as S
from coral.config import load_config
from coral.stages.annotate import first_per_split
from tests.conftest import REPO, annotate_override, encoders_override

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


def config(run_root, tiny_models, *extra):
    return load_config(
        REPO / "workflows" / "ci_small.yaml",
        [
            f"run.run_root={run_root}",
            "run.stages=[catalog, embed, mine, annotate]",
            encoders_override(tiny_models),
            *annotate_override(tiny_models),
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def mined_run(ray_local, tiny_models, tmp_path_factory) -> Path:
    """catalog -> embed -> mine once for the module: the same stages and settings in every test here."""
    root = tmp_path_factory.mktemp("mined") / "run"
    graph.run_graph(config(root, tiny_models), until="mine")
    return root


def with_mined_pairs(mined_run: Path, tmp_path: Path) -> Path:
    """A run root of the test's own holding a copy of the module's complete catalog, embed and mine."""
    root = tmp_path / "run"
    for stage in ("catalog", "embed", "mine"):
        shutil.copytree(mined_run / stage, root / stage)
    return root


def test_annotate_writes_triplets_from_mined_pairs(mined_run, tiny_models, tmp_path):
    cfg = config(with_mined_pairs(mined_run, tmp_path), tiny_models)
    rows = graph.run_graph(cfg)
    assert [r.status for r in rows] == ["skipped"] * 3 + ["ran"]  # the copied stages are complete
    m = manifest.read_complete(storage.resolve(cfg.run.run_root).child("annotate"))
    mined = pq.read_table(tmp_path / "run" / "mine" / "data")
    pairs = first_per_split(mined, cfg.annotate.max_pairs).to_pylist()  # max_pairs caps each split
    by_key = {f"{p[S.QUERY_ID]}>{p[S.TARGET_ID]}": p for p in pairs}
    assert m["rows_in"] == len(pairs) == 2 * 12 and {p[S.SPLIT] for p in pairs} == {"train", "test"}
    assert m["rows_out"] + m["rows_rejected"] == m["rows_in"]
    assert m["details"]["describe"]["requests"] == 24
    assert m["details"]["instruct"]["requests"] == 24 - sum(
        n for reason, n in m["rejected_reasons"].items() if reason.startswith("describe:")
    )
    instruct = m["details"]["instruct"]  # the hf prefix cache: distinct prompt heads per batch, counted
    assert 1 <= instruct["prompt_heads"] <= instruct["requests"] and instruct["batches"] >= 3
    assert "prompt_heads" not in m["details"]["describe"]  # a VLM prompt has no shared head
    table = pq.read_table(tmp_path / "run" / "annotate" / "data")
    assert table.schema.equals(S.TRIPLETS)
    assert m["details"]["triplets"] == table.num_rows
    annotated = set()
    for t in table.to_pylist():
        key = t[S.QUERY_ID].rsplit("#", 1)[0]
        pair = by_key[key]  # every triplet comes from a mined pair
        annotated.add(key)
        assert t[S.QUERY_TEXT].startswith(S.IMAGE_SLOT + "\n") and t[S.QUERY_TEXT].count(S.IMAGE_SLOT) == 1
        assert t[S.QUERY_IMAGE_IDS] == [pair[S.QUERY_ID]] and t[S.POSITIVE_IDS] == [pair[S.TARGET_ID]]
        assert t[S.HARD_NEGATIVE_IDS] == pair[S.HARD_NEGATIVE_IDS]
        assert t[S.SOURCE] == "megapairs" and t[S.NUM_CONDITIONS] == 1
        assert t[S.SPLIT] == pair[S.SPLIT]  # held-out pairs give held-out instructions
    assert len(annotated) == m["rows_out"]
    rejected_dir = tmp_path / "run" / "annotate" / "rejected"
    rejected = pq.read_table(rejected_dir).to_pylist() if rejected_dir.exists() else []
    assert len(rejected) == m["rows_rejected"]
    assert not annotated & {r[S.ID] for r in rejected}  # a pair is annotated or rejected, never both
    for r in rejected:
        assert r[S.REASON].split(":")[0] in ("describe", "instruct") and r[S.ID] in by_key
    assert [r.status for r in graph.run_graph(cfg)] == ["skipped"] * 4


def test_default_validation_rejects_a_random_models_text(mined_run, tiny_models, tmp_path):
    """With the default bounds (English prose, 20-200 words) byte soup never becomes a triplet."""
    cfg = config(
        with_mined_pairs(mined_run, tmp_path),
        tiny_models,
        "annotate.english_only=true",
        "annotate.description_words=[20, 200]",
        "annotate.max_pairs=4",
    )
    with pytest.raises(
        graph.StageFailed, match=r"annotate wrote 0 rows \(8 in\); most common rejections: \d+ x describe: "
    ):
        graph.run_graph(cfg)  # nothing to train on: the graph stops here, naming why
    assert not (tmp_path / "run" / "annotate" / "_SUCCESS").exists()
    rejected = pq.read_table(tmp_path / "run" / "annotate" / "rejected").to_pylist()
    assert len(rejected) == 8  # 4 pairs of each split
    assert all(r[S.REASON].startswith("describe: ") and r[S.RAW] for r in rejected)


@pytest.mark.timeout(240)
def test_openai_engine_survives_a_misbehaving_server(mined_run, tiny_models, tmp_path):
    """HTTP 500s, 429s, timeouts, malformed and empty bodies: the stage finishes, every pair is annotated
    or rejected with a reason, and the retries are counted in the manifest."""
    import httpx

    from tests.servers.openai_server import start_server, stop_server

    url, proc = start_server(tiny_models["qwen2_vl"], faults="500:2,429:5,timeout:7,malformed:11,empty:13")
    try:
        engine = (
            f"{{kind: openai, base_url: '{url}', model: qwen2_vl, max_new_tokens: 24, timeout_s: 2,"
            " max_retries: 2, backoff_s: 0.05, concurrency: 4, batch_size: 4}"
        )
        cfg = config(
            with_mined_pairs(mined_run, tmp_path),
            tiny_models,
            f"annotate.describe={engine}",
            f"annotate.instruct={engine}",
        )
        graph.run_graph(cfg)
        stats = httpx.get(f"{url}/stats", timeout=5).json()
    finally:
        stop_server(proc)
    m = manifest.read_complete(storage.resolve(str(tmp_path / "run")).child("annotate"))
    assert m["rows_in"] == 24 and m["rows_out"] + m["rows_rejected"] == 24
    d = m["details"]
    assert d["describe"]["requests"] == 24 and d["describe"]["retries"] > 0
    requests = d["describe"]["attempts"] + d.get("instruct", {}).get("attempts", 0)
    assert requests == stats["requests"]  # every attempt the client counted reached the server
    for outcome in ("500", "429", "timeout", "malformed", "empty"):
        assert stats["outcomes"].get(outcome, 0) > 0, stats["outcomes"]
    rejected = (
        pq.read_table(tmp_path / "run" / "annotate" / "rejected").to_pylist() if m["rows_rejected"] else []
    )
    assert all(r[S.REASON] for r in rejected)
