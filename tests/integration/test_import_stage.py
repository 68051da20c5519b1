"""import_triplets: MERIT's exported JSON, and its ``{query, pos, neg}`` lines, come back as the same triplets;
bad items are rejected."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from coral import graph, manifest, storage
from coral import schemas as S
from coral.config import load_config
from tests.conftest import REPO

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


def test_merit_export_imports_back_and_bad_items_are_rejected(ray_local, tmp_path):
    base = [f"run.run_root={tmp_path / 'run'}", "catalog.num_groups=300"]
    merit = load_config(
        REPO / "workflows" / "ci_small.yaml",
        [*base, "run.stages=[catalog, merit]", "merit.queries={train: 100, test: 100}", "merit.export=true"],
    )
    graph.run_graph(merit)
    export = tmp_path / "run" / "merit" / "export"
    items = json.loads((export / "queries-test.json").read_text())
    broken = [{"id": "no-conversations"}, {**items[0], "id": "no-positives", "pos_cand_list": []}]
    (export / "with-bad.json").write_text(json.dumps(items + broken, ensure_ascii=False))
    cfg = load_config(
        REPO / "workflows" / "ci_small.yaml",
        [
            *base,
            "run.stages=[import_triplets]",
            "imports.format=merit",
            f"imports.queries={export / 'with-bad.json'}",
            f"imports.candidates={export / 'candidates-test.json'}",
            "imports.split=test",
        ],
    )
    graph.run_graph(cfg)
    m = manifest.read_complete(storage.resolve(str(tmp_path / "run")).child("import_triplets"))
    assert m["rows_in"] == len(items) + 2 and m["rows_out"] == len(items) and m["rows_rejected"] == 2
    rejected = {
        r[S.ID]: r[S.REASON]
        for r in pq.read_table(tmp_path / "run" / "import_triplets" / "rejected").to_pylist()
    }
    assert rejected[f"item {len(items)}"].startswith("unreadable: KeyError")
    assert rejected[f"item {len(items) + 1}"] == "no positives"
    imported = {
        r[S.QUERY_ID]: r for r in pq.read_table(tmp_path / "run" / "import_triplets" / "data").to_pylist()
    }
    original = {
        r[S.QUERY_ID]: r
        for r in pq.read_table(tmp_path / "run" / "merit" / "data").to_pylist()
        if r[S.SPLIT] == "test"
    }
    assert imported.keys() == original.keys()
    for qid, row in imported.items():
        cols = [S.QUERY_TEXT, S.QUERY_IMAGE_IDS, S.POSITIVE_IDS, S.CLASS]
        if original[qid][S.SOURCE] == "merit":  # a cold-start text names "product style", not the key
            cols += [S.NUM_CONDITIONS, S.CONDITION_KEYS]
        for col in cols:
            assert row[col] == original[qid][col], (qid, col)
    candidates = pq.read_table(tmp_path / "run" / "import_triplets" / "candidates").to_pylist()
    assert len(candidates) == m["details"]["candidates"] > 0
    assert m["details"]["image_root"].endswith("export")
    # the same queries as {query, pos, neg} JSON lines come back as the same triplets, hard negatives too
    qpn = load_config(
        REPO / "workflows" / "ci_small.yaml",
        [
            *base,
            "run.stages=[import_triplets]",
            "imports.format=query_pos_neg",
            f"imports.queries={export / 'test.jsonl'}",
            f"imports.candidates={export / 'candidates-test.json'}",
            "imports.split=test",
        ],
    )
    graph.run_graph(qpn)
    m = manifest.read_complete(storage.resolve(str(tmp_path / "run")).child("import_triplets"))
    assert m["rows_in"] == m["rows_out"] == len(original) and m["rows_rejected"] == 0
    imported = {
        r[S.QUERY_ID]: r for r in pq.read_table(tmp_path / "run" / "import_triplets" / "data").to_pylist()
    }
    assert imported.keys() == original.keys()
    for qid, row in imported.items():
        cols = [S.QUERY_TEXT, S.QUERY_IMAGE_IDS, S.POSITIVE_IDS, S.HARD_NEGATIVE_IDS, S.CLASS, S.SPLIT]
        if original[qid][S.SOURCE] == "merit":
            cols += [S.NUM_CONDITIONS, S.CONDITION_KEYS]
        for col in cols:
            assert row[col] == original[qid][col], (qid, col)


def test_megapairs_paths_outside_the_files_folder_are_rejected(tmp_path):
    """MegaPairs lines naming an image outside their file's folder (``..``, an absolute path, a symlink
    that leaves, another scheme or bucket) are rejected with the reason; the others import (no Ray)."""
    from coral.stages.base import StageContext
    from coral.stages.imports import ImportStage

    data, outside = tmp_path / "data", tmp_path / "outside"
    (data / "images").mkdir(parents=True)
    outside.mkdir()
    (data / "images" / "leak.jpg").symlink_to(outside / "secret.jpg")
    good = {"q_img": "images/q.jpg", "q_text": ["in blue"], "t_img": "images/t.jpg", "hns": ["images/n.jpg"]}
    secret = str(outside / "secret.jpg")
    bad = [  # (the line, the path it names, why it is rejected)
        ({**good, "q_img": "../outside/secret.jpg"}, "../outside/secret.jpg", "'..' escapes the file's folder"),
        ({**good, "t_img": secret}, secret, "absolute path outside the file's folder and the allowed roots"),
        ({**good, "hns": ["images/leak.jpg"]}, "images/leak.jpg", "symlink leaves the file's folder and the allowed roots"),
        ({**good, "t_img": ["s3://b/x.jpg"]}, "s3://b/x.jpg", "s3 path outside the file's folder and the allowed roots"),
    ]  # fmt: skip
    lines = [good, *(line for line, _, _ in bad), good]
    (data / "pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    run = tmp_path / "run"
    cfg = load_config(
        None,
        [f"run.run_root={run}", "run.stages=[import_triplets]", "imports.format=megapairs"]
        + [f"imports.queries={data / 'pairs.jsonl'}"],
    )
    result = ImportStage().run(StageContext(cfg, storage.resolve(str(run))))
    rejected = {r[S.ID]: r[S.REASON] for r in pq.read_table(run / "import_triplets" / "rejected").to_pylist()}
    assert rejected == {f"item {n}": f"image path: {why}: [{p!r}]" for n, (_, p, why) in enumerate(bad, 1)}
    assert (result.rows_in, result.rows_out) == (6, 2) and sum(result.rejected.values()) == 4
    assert result.rejected["image path: '..' escapes the file's folder"] == 1
    assert len(pq.read_table(run / "import_triplets" / "data")) == 2
