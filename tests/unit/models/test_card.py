"""The exported model's card and coral_retriever.json: what they state, the evaluation section rewritten in
place, the checkpoint hash untouched; docs/models.md's plain-transformers snippets embed as Embedder does."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from coral import checkpoint, storage
from coral import schemas as S
from coral.config import TrainConfig, load_config
from coral.models import card
from coral.search.embedder import Embedder
from coral.stages import artifacts
from coral.stages.base import StageContext
from tests.snippets import run_snippet

METRICS = {
    "models": {
        "trained": {
            "R@1": 0.25,
            "R@5": 0.5,
            "R@10": 0.75,
            "MRR@10": 0.375,
            "queries": 4,
            "intervals": {"R@1": [0.0, 0.75]},
            "in_distribution": {"queries": 3, "R@1": 0.3333},
            "ood": {"class": {"ood_class_phone": {"queries": 1, "R@1": 0.0}}},
        },
        "baseline": {
            "R@1": 0.0,
            "R@5": 0.25,
            "R@10": 0.25,
            "MRR@10": 0.0625,
            "queries": 4,
            "intervals": {"R@1": [0.0, 0.0]},
        },
    },
    "checkpoint": {"uri": "x", "kind": "coral", "hash": "0123456789abcdef", "dim": 64},
    "baseline_model": "models/tiny/qwen2_vl",
    "index": {"spec": "Flat", "count": 30},
    "splits": ["test"],
    "metrics": ["R@1", "R@5", "R@10", "MRR@10"],
}


def export_of(tiny_models, name: str, tmp_path):
    """A copy of a tiny model dir, as the train stage exports one (weights, config, processor)."""
    out = tmp_path / "model"
    shutil.copytree(tiny_models[name], out)
    return out


def facts(tmp_path) -> dict:
    ctx = StageContext(
        load_config(None, [f"run.run_root={tmp_path / 'run'}"]), storage.resolve(str(tmp_path))
    )
    tables = {"merit": pa.table({S.SPLIT: ["train"] * 6 + ["test"] * 4})}
    sources = {
        "rows_by_source": {"merit": {"merit": 5}},
        "ood_held_out": {"axes": {"class": ["phone"]}, "rows_dropped": {"class": 1}},
    }
    return artifacts.training_facts(ctx, tables, 5, sources)


def test_card_and_spec_are_written_and_leave_the_checkpoint_hash(tiny_models, tmp_path):
    out = export_of(tiny_models, "qwen2_vl", tmp_path)
    before = checkpoint.content_hash(str(out)), checkpoint.listing_fingerprint(str(out))
    cfg = TrainConfig(model="coral", base="models/tiny/qwen2_vl", steps=3, batch_size=4)
    start = {"queries": 4, "R@1": 0.1, "R@10": 0.5, "MRR@10": 0.2}
    result = {"steps": 3, "validation": {"start": start, "during": [{"step": 2, **start}]}}
    artifacts.write_model_card(cfg, result, storage.resolve(str(out)), facts(tmp_path))
    text = (out / card.CARD).read_text()
    head = text.split("---\n")[1]
    assert "library_name: transformers\n" in head and "pipeline_tag: feature-extraction\n" in head
    assert 'base_model: "models/tiny/qwen2_vl"\n' in head and "- merit\n" in head
    for fact in ("3 optimizer steps", "4 queries per worker x 2 workers", "1e-05", "| merit | 5 | 4 |"):
        assert fact in text, fact
    assert "class: phone (1 training rows dropped)" in text and "Not evaluated yet" in text
    spec = json.loads((out / card.SPEC).read_text())
    assert spec["retriever"] == "coral" and spec["pooling"] == "last_token" and spec["normalization"] == "l2"
    assert spec["embedding_dim"] == checkpoint.embedding_dim(str(out)) and spec["dtype"] == "float32"
    assert spec["query_prefix"] == "" and spec["max_image_tokens"] == 576
    assert spec["candidate_messages"][0]["content"][0]["text"] == "Represent the given product: "
    assert (checkpoint.content_hash(str(out)), checkpoint.listing_fingerprint(str(out))) == before

    loc = storage.resolve(str(out))
    assert card.update_evaluation(loc, METRICS)
    assert card.update_evaluation(loc, {**METRICS, "splits": ["test", "ood_class_phone"]})  # again
    text = (out / card.CARD).read_text()
    assert "Not evaluated yet" not in text and text.count(card.EVALUATION[0]) == 1
    assert "| this model | 0.2500 | 0.5000 | 0.7500 | 0.3750 | 4 | [0.0, 0.75] |" in text
    assert "| untrained base (`models/tiny/qwen2_vl`) | 0.0000 |" in text
    assert "splits: test, ood_class_phone" in text and "| ood_class_phone | 1 | 0.0000 |" in text
    assert text.startswith("---\nlibrary_name: transformers") and "3 optimizer steps" in text
    assert (checkpoint.content_hash(str(out)), checkpoint.listing_fingerprint(str(out))) == before
    assert not card.update_evaluation(storage.resolve(str(tmp_path / "elsewhere")), METRICS)
    artifacts.write_model_card(cfg, result, storage.resolve(str(out)), facts(tmp_path), compare=True)
    assert artifacts.COMPARE_NOTE in (out / card.CARD).read_text()  # train/compare/{model}/: not evaluated


def test_a_dir_of_only_a_card_is_no_checkpoint(tmp_path):
    (tmp_path / "README.md").write_text("# a card")
    with pytest.raises(Exception, match="no files there"):
        checkpoint.content_hash(str(tmp_path))


def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)),
    ]


QUERIES = [
    (
        "Find a bag with the same color as <Product 1> <image>\nred tote </Product 1> and the style of <image>",
        2,
    ),
    ("<image>", 1),
    ("a plain text query", 0),
]
SNIPPETS = [
    ("qwen2_vl", "coral", "last_token"),
    ("qwen2_vl", "mmret_mllm", "last_token"),
    ("qwen2_5_vl", "coral", "last_token"),
    ("clip", "mmret_clip", "clip_score_fusion"),
    ("siglip", "mmret_clip", "clip_score_fusion"),
]


@pytest.mark.parametrize(("tiny", "kind", "snippet"), SNIPPETS, ids=lambda x: str(x))
def test_docs_snippet_embeds_as_the_endpoint_does(tiny_models, tmp_path, tiny, kind, snippet):
    """docs/models.md's code, run as written (its model_dir pointed here), gives Embedder's vector: the
    one ``/v1/embed`` returns for the same text and images."""
    out = export_of(tiny_models, tiny, tmp_path)
    cfg = TrainConfig(model=kind, base=str(tiny_models[tiny]))
    storage.write_json(
        storage.resolve(str(out / card.SPEC)), artifacts.model_spec(cfg, storage.resolve(str(out)))
    )
    embed_query = run_snippet("models.md", snippet, out)["embed_query"]
    embedder = Embedder(str(out), kind)
    for text, n in QUERIES:
        got = np.asarray(embed_query(text, images()[:n]), dtype=np.float32)
        want = embedder([embedder.retriever.query(text, images()[:n])])[0]
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-4)
        assert abs(float(np.linalg.norm(got)) - 1) < 1e-5
