"""The annotate stage (MegaPairs) on real mined pairs with the tiny Qwen2-VL on the hf engine."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from coral import graph, manifest, storage
from coral import schemas as S
from coral.config import load_config
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


def test_annotate_writes_triplets_from_mined_pairs(ray_local, tiny_models, tmp_path):
    cfg = config(tmp_path / "run", tiny_models)
    rows = graph.run_graph(cfg)
    assert [r.status for r in rows] == ["ran"] * 4
    m = manifest.read_complete(storage.resolve(cfg.run.run_root).child("annotate"))
    pairs = pq.read_table(tmp_path / "run" / "mine" / "data").to_pylist()[: cfg.annotate.max_pairs]
    by_key = {f"{p[S.QUERY_ID]}>{p[S.TARGET_ID]}": p for p in pairs}
    assert m["rows_in"] == len(pairs) == 12
    assert m["rows_out"] + m["rows_rejected"] == m["rows_in"]
    assert m["details"]["describe"]["requests"] == 12
    assert m["details"]["instruct"]["requests"] == 12 - sum(
        n for reason, n in m["rejected_reasons"].items() if reason.startswith("describe:")
    )
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
    assert len(annotated) == m["rows_out"]
    rejected = pq.read_table(tmp_path / "run" / "annotate" / "rejected").to_pylist()
    assert len(rejected) == m["rows_rejected"]
    assert not annotated & {r[S.ID] for r in rejected}  # a pair is annotated or rejected, never both
    for r in rejected:
        assert r[S.REASON].split(":")[0] in ("describe", "instruct") and r[S.ID] in by_key
    assert [r.status for r in graph.run_graph(cfg)] == ["skipped"] * 4


def test_default_validation_rejects_a_random_models_text(ray_local, tiny_models, tmp_path):
    """With the default bounds (English prose, 20-200 words) byte soup never becomes a triplet."""
    cfg = config(
        tmp_path / "run",
        tiny_models,
        "annotate.english_only=true",
        "annotate.description_words=[20, 200]",
        "annotate.max_pairs=4",
    )
    graph.run_graph(cfg)
    m = manifest.read_complete(storage.resolve(cfg.run.run_root).child("annotate"))
    assert m["rows_in"] == 4 and m["rows_out"] == 0 and m["rows_rejected"] == 4
    rejected = pq.read_table(tmp_path / "run" / "annotate" / "rejected").to_pylist()
    assert all(r[S.REASON].startswith("describe: ") and r[S.RAW] for r in rejected)
