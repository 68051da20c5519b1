"""The index stage's FAISS kinds agree with exact search on clustered data within their recall; checkpoint
hashes follow content, not location; the gate names metric, value and bar."""

from __future__ import annotations

import shutil

import faiss
import numpy as np
import pytest

from coral import checkpoint, storage
from coral import schemas as S
from coral.config import IndexConfig, IndexStageConfig
from coral.search import index as search_index
from coral.search import knn
from coral.stages import evaluate


def clustered(n: int, d: int = 64, centres: int = 100, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d), dtype=np.float32)
    x = c[rng.integers(centres, size=n)] + 0.4 * rng.standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize(
    ("kind", "floor", "refine"),
    [("flat", 1.0, 0), ("ivf_flat", 0.9, 0), ("hnsw", 0.9, 0), ("ivf_pq", 0.5, 0), ("ivf_pq", 0.95, 4)],
)
def test_index_kinds_agree_with_exact_search_within_their_recall(kind, floor, refine):
    x = clustered(20_000)
    queries = clustered(500, seed=1)
    exact = faiss.IndexFlatIP(x.shape[1])
    exact.add(x)
    _, want = exact.search(queries, 10)
    cfg = IndexStageConfig(
        index=IndexConfig(kind=kind, list_size=100, nprobe=16, pq_m=16, ef_search=128, refine=refine)
    )
    index = search_index.build(x, cfg)
    assert index.ntotal == len(x)
    _, got = index.search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, want, strict=True)])
    assert recall >= floor, (kind, recall)
    # and it survives the round trip through the bytes the stage writes: the same batch in the same
    # process, so the answers must be bit-equal (a copy of the index, not a recomputation)
    again = faiss.deserialize_index(faiss.serialize_index(index))
    knn.set_search_params(again, cfg.index)  # search settings are the config's, not the file's
    before, after = index.search(queries[:20], 10), again.search(queries[:20], 10)
    assert np.array_equal(after[1], before[1]) and np.array_equal(after[0], before[0])


def test_checkpoint_hash_follows_content_not_location(tiny_models, tmp_path):
    src = str(tiny_models["clip"])
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    assert checkpoint.content_hash(src) == checkpoint.content_hash(str(copy))
    (copy / "config.json").write_text((copy / "config.json").read_text().replace("}", " }", 1))
    assert checkpoint.content_hash(src) != checkpoint.content_hash(str(copy))
    assert checkpoint.embedding_dim(src) == 32  # CLIP: the projection
    assert checkpoint.embedding_dim(str(tiny_models["qwen2_vl"])) == 64  # MLLM: the text model's width


def test_gate_names_metric_value_and_bar():
    trained = {"R@1": 0.12, "R@5": 0.4, "R@10": 0.6, "MRR@10": 0.2}
    assert evaluate.gate_failures({"R@1": 0.1}, trained) == []
    assert evaluate.gate_failures({"R@1": 0.3, "R@10": 0.5}, trained) == [
        "R@1 = 0.1200 is below the bar 0.3 (evaluate.gate)"
    ]


def test_scores_by_group_count_every_query():
    rows = [
        {"source": "merit", "num_conditions": c, "language": lang, "class": "mug"}
        for c, lang in [(2, "en"), (3, "th"), (2, "en")]
    ]
    s = evaluate.score([1, -1, 4], rows, resamples=100)
    assert s["queries"] == 3 and s["R@1"] == pytest.approx(1 / 3)
    assert s["by"]["conditions"]["2"] == {"R@1": 0.5, "R@5": 1.0, "R@10": 1.0, "MRR@10": 0.625, "queries": 2}
    assert s["by"]["language"]["th"]["R@10"] == 0.0


def test_scores_in_and_out_of_distribution_apart_and_any_metric_family():
    from coral.config import EvaluateConfig

    rows = [
        {
            S.QUERY_ID: q,
            "source": "merit",
            "num_conditions": 2,
            "language": "en",
            "class": "mug",
            S.POSITIVE_IDS: p,
        }
        for q, p in [("q1", ["x"]), ("q2", ["y", "z"]), ("q3", ["w"])]
    ]
    ranked = [["x", "a", "b"], ["a", "z", "y"], ["a", "b", "c"]]
    cfg = EvaluateConfig(metrics=("circo", "recall", "merit"), recall_k=(1, 3), map_k=(3,))
    ranks = [1, 2, -1]
    values = evaluate.per_query_values(cfg, ranked, rows, ranks)
    assert list(values) == ["mAP@3", "Recall@1", "Recall@3", "R@1", "R@5", "R@10", "MRR@10"]
    ood = {"language": {"q2": "ood_language_th", "q1": "train"}}
    s = evaluate.score(ranks, rows, 50, ood, values)
    assert s["mAP@3"] == pytest.approx((1 + (1 / 2 + 2 / 3) / 2 + 0) / 3)
    assert s["Recall@1"] == pytest.approx(1 / 3) and s["Recall@3"] == pytest.approx(2 / 3)
    assert s["in_distribution"]["queries"] == 2 and s["in_distribution"]["R@1"] == pytest.approx(0.5)
    assert s["ood"]["language"] == {
        "ood_language_th": pytest.approx({**{k: v[1] for k, v in values.items()}, "queries": 1})
    }
    assert set(s["by"]) == {"source", "conditions", "language", "class"}


def test_mmeb_precision_at_1_over_each_querys_own_candidates():
    import numpy as np

    cands = ["p", "n1", "n2", "q"]
    emb = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6]], np.float32)
    rows = [
        {S.POSITIVE_IDS: ["p"], S.HARD_NEGATIVE_IDS: ["n1", "n2"]},  # query along p: right
        {S.POSITIVE_IDS: ["p"], S.HARD_NEGATIVE_IDS: ["n1"]},  # query along n1: wrong
        {S.POSITIVE_IDS: ["gone"], S.HARD_NEGATIVE_IDS: ["n1"]},  # positive outside the pool: a miss
        {S.POSITIVE_IDS: ["q"], S.HARD_NEGATIVE_IDS: ["missing"]},  # no negative in the pool: right
    ]
    q = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
    assert evaluate.precision_at_1(q, rows, cands, emb).tolist() == [1.0, 0.0, 0.0, 1.0]


def test_an_s3_checkpoint_rewritten_in_place_is_fetched_again(s3_bucket):
    """The node-local copy of an ``s3://`` checkpoint is keyed by its content: new weights at the same URI
    are never served from the old copy."""
    from pathlib import Path

    cfg, bucket = s3_bucket
    client = storage.boto3_client(cfg)
    uri = f"s3://{bucket}/ckpt"
    client.put_object(Bucket=bucket, Key="ckpt/model.safetensors", Body=b"old weights")
    client.put_object(Bucket=bucket, Key="ckpt/config.json", Body=b"{}")
    first = checkpoint.local_dir(uri, cfg)
    assert (Path(first) / "model.safetensors").read_bytes() == b"old weights"
    assert checkpoint.local_dir(uri, cfg) == first  # unchanged: the copy is reused
    old_hash = checkpoint.content_hash(uri, cfg)
    client.put_object(Bucket=bucket, Key="ckpt/model.safetensors", Body=b"new weights, longer")
    second = checkpoint.local_dir(uri, cfg)
    assert second != first and (Path(second) / "model.safetensors").read_bytes() == b"new weights, longer"
    new_hash = checkpoint.content_hash(uri, cfg)
    assert new_hash != old_hash and checkpoint.local_dir(uri, cfg, new_hash) != first
