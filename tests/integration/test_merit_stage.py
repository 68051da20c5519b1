"""The merit stage on a real catalog: exact positives, slots, OOD labels, export, sharding invariance."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from coral import graph, manifest, storage
from coral import schemas as S
from coral.config import load_config
from coral.merit import formats
from tests.conftest import REPO

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


def config(run_root, *extra):
    return load_config(
        REPO / "workflows" / "ci_small.yaml",
        [
            f"run.run_root={run_root}",
            "run.stages=[catalog, merit]",
            "catalog.num_groups=300",
            "merit.queries={train: 600, test: 200}",
            "merit.export=true",
            *extra,
        ],
    )


def test_merit_queries_are_exact_and_complete(ray_local, tmp_path):
    cfg = config(tmp_path / "run")
    assert [r.status for r in graph.run_graph(cfg)] == ["ran", "ran"]
    root = storage.resolve(str(tmp_path / "run"))
    m = manifest.read_complete(root.child("merit"))
    catalog = {p[S.ID]: p for p in pq.read_table(tmp_path / "run" / "catalog" / "data").to_pylist()}
    rows = pq.read_table(tmp_path / "run" / "merit" / "data").to_pylist()
    assert m["rows_out"] == len(rows) > 0 and m["rows_in"] == m["rows_out"] + m["rows_rejected"]
    assert len({r[S.QUERY_ID] for r in rows}) == len(rows)
    assert {r[S.NUM_CONDITIONS] for r in rows if r[S.SOURCE] == "merit"} == {2, 3, 4}
    for r in rows:
        query = [catalog[i] for i in r[S.QUERY_IMAGE_IDS]]
        assert r[S.QUERY_TEXT].count(S.IMAGE_SLOT) == len(query) == r[S.QUERY_TEXT].count("</Product")
        assert 1 <= len(r[S.POSITIVE_IDS]) <= cfg.merit.max_positives
        for pid in r[S.POSITIVE_IDS] + r[S.HARD_NEGATIVE_IDS]:
            p = catalog[pid]
            assert p[S.SPLIT] == r[S.SPLIT] and p[S.CLASS] == r[S.CLASS] and pid not in r[S.QUERY_IMAGE_IDS]
        if r[S.SOURCE] == "merit":  # every positive meets every condition; no hard negative meets all
            conditions = list(zip(query, r[S.CONDITION_KEYS], strict=True))
            for pid in r[S.POSITIVE_IDS]:
                assert all(catalog[pid][S.ATTRIBUTES][k] == q[S.ATTRIBUTES][k] for q, k in conditions)
            for pid in r[S.HARD_NEGATIVE_IDS]:
                assert not all(catalog[pid][S.ATTRIBUTES][k] == q[S.ATTRIBUTES][k] for q, k in conditions)
    # OOD: held-out test sets share no query with the training set of the same experiment
    for kind in ("language", "attribute", "class"):
        labels = pq.read_table(tmp_path / "run" / "merit" / "ood" / kind).to_pylist()
        train = {x[S.QUERY_ID] for x in labels if x[S.SPLIT] == "train"}
        held = {x[S.QUERY_ID] for x in labels if x[S.SPLIT].startswith("ood_")}
        assert train and not train & held
    # export: MERIT's JSON reads back into the same queries, and every image it names is there
    exported = json.loads((tmp_path / "run" / "merit" / "export" / "queries-test.json").read_text())
    test_rows = {r[S.QUERY_ID]: r for r in rows if r[S.SPLIT] == "test"}
    assert len(exported) == len(test_rows)
    for item in exported:
        assert item["conversations"][0]["value"] == test_rows[str(item["id"])][S.QUERY_TEXT]
        assert all((tmp_path / "run" / "merit" / "export" / p).exists() for p in item["image"])
    candidates = formats.read_json(tmp_path / "run" / "merit" / "export" / "candidates-test.json")
    assert len(candidates) == sum(p[S.SPLIT] == "test" for p in catalog.values())
    assert [r.status for r in graph.run_graph(cfg)] == ["skipped", "skipped"]


def test_merit_output_does_not_depend_on_sharding(ray_local, tmp_path):
    outputs = []
    for tasks in (1, 3):
        cfg = config(tmp_path / f"run{tasks}", f"merit.num_tasks={tasks}", "merit.export=false")
        graph.run_graph(cfg)
        rows = pq.read_table(tmp_path / f"run{tasks}" / "merit" / "data").to_pylist()
        outputs.append(sorted(rows, key=lambda r: r[S.QUERY_ID]))
    assert outputs[0] == outputs[1]


def test_rewrite_and_judge_run_on_an_engine(ray_local, tiny_models, tmp_path):
    """With a random model: every rewrite that breaks a slot is refused (the template stays), every
    non-answer from the judge drops its query, and the counts add up."""
    engine = f"{{model: {tiny_models['qwen2_vl']}, max_new_tokens: 24, batch_size: 8}}"
    cfg = config(
        tmp_path / "run",
        "merit.queries={train: 40, test: 10}",
        "merit.cold_start=false",
        "merit.export=false",
        f"merit.rewrite={engine}",
        f"merit.judge={engine}",
    )
    graph.run_graph(cfg)
    m = manifest.read_complete(storage.resolve(str(tmp_path / "run")).child("merit"))
    assert m["rows_in"] == 50 and m["rows_out"] + m["rows_rejected"] == 50
    composed = m["rows_in"] - sum(n for r, n in m["rejected_reasons"].items() if not r.startswith("judge:"))
    llm = m["details"]["llm"]
    assert llm["rewrite"]["requests"] == llm["judge"]["requests"] == composed > 0
    assert 0 <= llm["rewrites_failed"] <= composed
    for r in pq.read_table(tmp_path / "run" / "merit" / "data").to_pylist():
        assert r[S.QUERY_TEXT].count(S.IMAGE_SLOT) == len(r[S.QUERY_IMAGE_IDS])


def test_label_step_asks_for_every_product_and_accounts_for_each(ray_local, tiny_models, tmp_path):
    engine = f"{{model: {tiny_models['qwen2_vl']}, max_new_tokens: 24, batch_size: 8}}"
    cfg = config(
        tmp_path / "run",
        "catalog.num_groups=40",
        "merit.queries={train: 20, test: 5}",
        "merit.cold_start=false",
        "merit.export=false",
        "merit.label_products=all",
        f"merit.label={engine}",
    )
    graph.run_graph(cfg)
    m = manifest.read_complete(storage.resolve(str(tmp_path / "run")).child("merit"))
    label = m["details"]["label"]
    assert label["requests"] == 120 and label["labelled"] + label["failed"] == 120
    assert m["rows_out"] + m["rows_rejected"] == m["rows_in"] == 25
    failed_dir = tmp_path / "run" / "merit" / "label_rejected"
    failed = pq.read_table(failed_dir).to_pylist() if failed_dir.exists() else []
    assert len(failed) == label["failed"] and all(r[S.REASON].startswith("label: ") for r in failed)
    # "missing" (the default) on a fully labelled catalog asks nothing
    cfg = config(tmp_path / "run2", "merit.export=false", f"merit.label={engine}")
    graph.run_graph(cfg)
    m = manifest.read_complete(storage.resolve(str(tmp_path / "run2")).child("merit"))
    assert m["details"]["label"] == {"requests": 0}
