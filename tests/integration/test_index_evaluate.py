"""index + evaluate on a short training run: the index is bound to the trained checkpoint, the evaluation
writes trained and baseline rows, a report with plots and every query's rank; a mismatched checkpoint is
refused naming both; a gate below the trained figures stops the graph with exit code 1."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest

from coral import checkpoint, manifest, storage
from coral import schemas as S
from coral.errors import ConfigError
from coral.search import index as search_index
from coral.search import knn
from coral.stages import heldout
from coral.stages.base import StageContext
from coral.stages.registry import STAGES
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
    index, _, table = search_index.load(storage.resolve(str(root / "index")), cfg.index)
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


def test_the_train_stage_draws_its_curves(run):
    root, _ = run
    png = (root / "train" / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


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
        assert set(s["by"]) == {"source", "conditions", "language", "class"}
        assert set(s["ood"]) == {"language", "attribute", "class"}  # the merit stage's OOD labels
        assert all(label.startswith("ood_") for kind in s["ood"].values() for label in kind)
        assert sum(g["queries"] for g in s["ood"]["language"].values()) > 0
        labelled = {q for kind in ("language", "attribute", "class") for q in ood_ids(root, kind)}
        assert s["in_distribution"]["queries"] == len(held) - len(labelled & {r[S.QUERY_ID] for r in held})
    ranks = pq.read_table(root / "evaluate" / "data").to_pylist()
    assert len(ranks) == 2 * len(held)
    trained = [r["rank"] for r in ranks if r["model"] == "trained"]
    assert np.mean([r == 1 for r in trained]) == pytest.approx(m["models"]["trained"]["R@1"])
    figures = (
        "ranks.png",
        "recall_at_k.png",
        "r1_by_conditions.png",
        "r1_by_language.png",
        "r1_by_class.png",
    )
    for name in ("report.md", *figures):
        assert (root / "evaluate" / name).stat().st_size > 100, name
    assert all(f"]({name})" in (root / "evaluate" / "report.md").read_text() for name in figures)
    assert (root / "evaluate" / "ranks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    row = manifest.read_complete(storage.resolve(str(root)).child("evaluate"))
    assert row["details"]["trained"]["queries"] == len(held)


def ood_ids(root, kind: str) -> set[str]:
    """The held-out queries the merit stage labelled out of distribution on ``kind``."""
    labels = pq.read_table(root / "merit" / "ood" / kind).to_pylist()
    return {x[S.QUERY_ID] for x in labels if x[S.SPLIT].startswith("ood_")}


def test_no_training_row_carries_an_ood_label_and_ood_splits_are_evaluated(run, tiny_models):
    root, cfg = run
    trained = pq.read_table(root / "train" / "data").to_pylist()
    assert trained and {t[S.SPLIT] for t in trained} == {"train"}
    m = manifest.read_complete(storage.resolve(str(root)).child("train"))
    assert set(m["details"]["ood_held_out"]["axes"]) == {"language", "attribute", "class"}
    assert sum(m["details"]["ood_held_out"]["rows_dropped"].values()) > 0
    catalog = {p[S.ID]: p for p in pq.read_table(root / "catalog" / "data").to_pylist()}
    for t in trained:  # nothing of a held-out language, class or attribute was trained on
        named = [*t[S.QUERY_IMAGE_IDS], *t[S.POSITIVE_IDS], *t[S.HARD_NEGATIVE_IDS]]
        assert not {catalog[i][S.LANGUAGE] for i in named} & set(cfg.merit.ood_languages), t[S.QUERY_ID]
        assert not {catalog[i][S.CLASS] for i in named} & set(cfg.merit.ood_classes), t[S.QUERY_ID]
        assert not set(t[S.CONDITION_KEYS]) & set(cfg.merit.ood_attributes), t[S.QUERY_ID]
    for kind in ("language", "attribute", "class"):  # and the merit stage labelled every one "train"
        labels = {x[S.QUERY_ID]: x[S.SPLIT] for x in pq.read_table(root / "merit" / "ood" / kind).to_pylist()}
        assert all(labels.get(t[S.QUERY_ID]) == "train" for t in trained), kind
    # evaluate.splits takes an OOD label: exactly that label's held-out queries are scored
    labels = pq.read_table(root / "merit" / "ood" / "language").to_pylist()
    thai = {x[S.QUERY_ID] for x in labels if x[S.SPLIT] == "ood_language_th"}
    assert thai
    only = replace(cfg, evaluate=replace(cfg.evaluate, splits=("ood_language_th",)))
    STAGES["evaluate"].validate(only)
    ctx = StageContext(only, storage.resolve(str(root)))
    got = STAGES["evaluate"].queries(ctx, heldout.ood_labels(ctx))
    assert {q[S.QUERY_ID] for q in got} == thai
    with pytest.raises(ConfigError, match="merit.ood"):
        STAGES["evaluate"].validate(replace(only, merit=replace(cfg.merit, ood=("class",))))


def test_gate_below_the_figures_stops_the_graph_with_exit_code_1(run, tiny_models, tmp_path, capsys):
    """``python -m ray_jobs.run ... --from evaluate`` with a gate above the figures: exit code 1 naming the
    bar that was missed. Run through the command's own ``main`` in this process (its Ray already up), on a
    copy of the session's run, so that the shared run's evaluation stays complete for the serve tests."""
    from ray_jobs import run as command

    root = tmp_path / "run"
    for stage in ("catalog", "merit", "train", "index", "evaluate"):
        shutil.copytree(run[0] / stage, root / stage)
    code = command.main(
        [
            "--config",
            str(REPO / "workflows" / "ci_small.yaml"),
            "--from",
            "evaluate",
            *overrides(root, tiny_models),
            "evaluate.gate={R@10: 1.0, R@1: 0.0}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1, err[-3000:]
    value = json.loads((root / "evaluate" / "metrics.json").read_text())["models"]["trained"]["R@10"]
    assert value < 1.0
    assert f"R@10 = {value:.4f} is below the bar 1.0" in err, err[-3000:]
    assert "R@1 =" not in err  # a met bar is not reported
    assert (run[0] / "evaluate" / "_SUCCESS").exists()  # the shared run was not touched
