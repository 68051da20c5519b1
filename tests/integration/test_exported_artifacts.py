"""What a short training run hands to other tools: the exported model's card (with the evaluation's figures,
the index still bound), coral_retriever.json read by docs/models.md's plain-transformers code (the
endpoint's vector), and the evaluation's TREC files (metrics.json's figures)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from coral import checkpoint
from coral import schemas as S
from coral.catalog import lookup
from coral.search import trec
from coral.search.embedder import Embedder
from tests.snippets import run_snippet
from tests.unit.search.test_trec import figures

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]


def test_the_card_carries_the_evaluation_and_the_index_stays_bound(trained_run):
    root, cfg = trained_run
    m = json.loads((root / "evaluate" / "metrics.json").read_text())
    text = (root / "train" / "model" / "README.md").read_text()
    assert text.startswith("---\nlibrary_name: transformers\n") and "Not evaluated yet" not in text
    trained = m["models"]["trained"]
    row = " | ".join(f"{trained[k]:.4f}" for k in m["metrics"])
    assert f"| this model | {row} | {trained['queries']} |" in text
    assert f"(hash {m['checkpoint']['hash']};" in text and "| untrained base (" in text
    assert "| in distribution |" in text  # merit.ood held values out: scored apart
    meta = json.loads((root / "index" / "index.json").read_text())
    assert checkpoint.content_hash(str(root / "train" / "model")) == meta["checkpoint"]["hash"]
    spec = json.loads((root / "train" / "model" / "coral_retriever.json").read_text())
    assert (spec["retriever"], spec["embedding_dim"]) == (cfg.train.model, meta["dim"])


def test_trec_files_give_the_figures_of_metrics_json(trained_run):
    root, _ = trained_run
    m = json.loads((root / "evaluate" / "metrics.json").read_text())
    folder = root / "evaluate" / "trec"
    assert sorted(p.name for p in folder.iterdir()) == ["baseline.test.run", "test.qrels", "trained.test.run"]
    qrels = trec.parse_qrels((folder / "test.qrels").read_text())
    for model in ("trained", "baseline"):
        run = trec.parse_run((folder / f"{model}.test.run").read_text())
        got, want = figures(run, qrels), m["models"][model]
        assert got["queries"] == want["queries"]
        assert got["R@1"] == pytest.approx(want["R@1"], abs=1e-9)
        assert got["MRR@10"] == pytest.approx(want["MRR@10"], abs=1e-9)


def test_docs_snippet_embeds_a_held_out_query_as_the_endpoint(trained_run):
    root, _ = trained_run
    export = root / "train" / "model"
    embed_query = run_snippet("models.md", "last_token", export)["embed_query"]
    embedder = Embedder(str(export), "coral")
    products = lookup.products_from(
        pq.read_table(root / "catalog" / "data", columns=[S.ID, S.TITLE, S.IMAGE]).to_pydict()
    )
    held = [r for r in pq.read_table(root / "merit" / "data").to_pylist() if r[S.SPLIT] == "test"][:3]
    for row in held:
        images = [products.images(i) for i in row[S.QUERY_IMAGE_IDS]]
        got = np.asarray(embed_query(row[S.QUERY_TEXT], images), dtype=np.float32)
        want = embedder([embedder.retriever.query(row[S.QUERY_TEXT], images)])[0]
        np.testing.assert_allclose(got, want, atol=1e-4)
