"""A CIRCO-style import (a reference image and a text, several targets) evaluated with mAP@k, Recall@K and
MMEB's P@1 besides MERIT's metrics; imported items checked against the catalog, rejected with their
position when they name unknown products or leak held-out ones into training."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from coral import graph, manifest, metrics, storage
from coral import schemas as S
from coral.config import load_config
from tests.conftest import REPO

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]


def released(query: list[str], positives: list[str], negatives: list[str], text: str) -> dict:
    return {"query instruction": text, "query": query, "pos_candidate": positives, "hard_negative": negatives}


def test_circo_style_queries_are_scored_with_map_recall_and_p_at_1(ray_local, tiny_models, tmp_path):
    base = [f"run.run_root={tmp_path / 'run'}", "catalog.num_groups=40"]
    graph.run_graph(load_config(REPO / "workflows" / "ci_small.yaml", [*base, "run.stages=[catalog]"]))
    catalog = pq.read_table(tmp_path / "run" / "catalog" / "data").to_pylist()
    test = sorted(p[S.ID] for p in catalog if p[S.SPLIT] == "test")
    train = sorted(p[S.ID] for p in catalog if p[S.SPLIT] == "train")
    assert len(test) >= 24
    slot = f"{S.IMAGE_SLOT}\n"
    held = [
        released(
            [test[i]], test[i + 1 : i + 4], test[i + 4 : i + 6], f"{slot}the same object in another colour"
        )
        for i in range(0, 20, 2)
    ]
    held.append(released(["nowhere-1"], [test[0]], [], f"{slot}an image the catalog lacks"))
    training = [
        released([train[0]], [train[1]], [], f"{slot}like this"),
        released([train[2]], [test[5]], [], f"{slot}a training query that names a held-out product"),
    ]
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(q) for q in held))
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(q) for q in training))
    cfg = load_config(
        REPO / "workflows" / "ci_small.yaml",
        [
            *base,
            "run.stages=[catalog, import_triplets, index, evaluate]",
            "imports.format=released",
            f"imports.queries={tmp_path / 'train.jsonl'}",
            f"imports.test_queries={tmp_path / 'test.jsonl'}",
            "train.data=[import_triplets]",
            f"index.model={tiny_models['qwen2_vl']}",
            "index.kind=mmret_mllm",
            "evaluate.baseline=false",
            "evaluate.metrics=[circo, recall, mmeb, merit]",
            "evaluate.bootstrap=100",
        ],
    )
    graph.run_graph(cfg)
    root = storage.resolve(str(tmp_path / "run"))
    imported = manifest.read_complete(root.child("import_triplets"))
    assert (imported["rows_in"], imported["rows_out"], imported["rows_rejected"]) == (13, 11, 2)
    rejected = {
        r[S.ID]: r[S.REASON]
        for r in pq.read_table(tmp_path / "run" / "import_triplets" / "rejected").to_pylist()
    }
    assert rejected == {
        "test item 10": "ids not in the catalog: ['nowhere-1']",
        "item 1": f"a training query names held-out products: ['{test[5]}']",
    }

    result = json.loads((tmp_path / "run" / "evaluate" / "metrics.json").read_text())
    names = ["mAP@5", "mAP@10", "mAP@25", "mAP@50", "Recall@1", "Recall@5", "Recall@10", "Recall@50", "P@1"]
    assert result["metrics"] == [*names, "R@1", "R@5", "R@10", "MRR@10"]
    scored = result["models"]["trained"]
    assert scored["queries"] == 10 and set(names) <= set(scored) and 0 <= scored["P@1"] <= 1
    rows = {
        r[S.QUERY_ID]: r for r in pq.read_table(tmp_path / "run" / "import_triplets" / "data").to_pylist()
    }
    evaluated = pq.read_table(tmp_path / "run" / "evaluate" / "data").to_pylist()
    ranked = [e["top_ids"] for e in evaluated]
    positives = [set(rows[e[S.QUERY_ID]][S.POSITIVE_IDS]) for e in evaluated]
    assert all(len(p) == 3 for p in positives)  # several targets, as in CIRCO
    for k in (5, 10):  # the saved top 10 gives the same mAP@k and Recall@k as the metrics file
        assert scored[f"mAP@{k}"] == pytest.approx(metrics.circo_map(ranked, positives, k))
        assert scored[f"Recall@{k}"] == pytest.approx(metrics.recall_at(ranked, positives, k))
    assert (
        len(test) < 50 and scored["Recall@50"] == 1.0 and scored["mAP@50"] > 0
    )  # the whole pool is searched
