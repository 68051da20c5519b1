"""The real graph (catalog -> embed) on a local Ray, local storage and S3; asserts on what it wrote."""

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from coral import graph, manifest, storage
from coral import schemas as S
from coral.config import load_config
from tests.conftest import SECRET, encoders_override

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


def small(run_root: str, tiny_models, *extra):
    return load_config(
        REPO / "workflows" / "ci_small.yaml",
        [f"run.run_root={run_root}", encoders_override(tiny_models), *extra],
    )


def read(loc) -> pa.Table:
    return pq.read_table(loc.path, filesystem=loc.fs)


def check_outputs(root, cfg) -> None:
    catalog = read(root.child("catalog", "data"))
    emb = read(root.child("embed", "data"))
    n = cfg.catalog.num_groups * cfg.catalog.variants_per_group
    assert catalog.num_rows == n
    assert sorted(emb.column(S.ID).to_pylist()) == sorted(catalog.column(S.ID).to_pylist())  # one row each
    for column in ("emb_clip_image", "emb_caption"):
        vectors = np.array(emb.column(column).to_pylist(), dtype=np.float32)
        assert vectors.shape == (n, 32)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    for stage in ("catalog", "embed"):
        m = manifest.read_complete(root.child(stage))
        assert m is not None and m["status"] == "complete"
        assert m["rows_out"] == n and m["rows_rejected"] == 0
    assert manifest.read_complete(root.child("embed"))["inputs"] == {
        "catalog": manifest.read_complete(root.child("catalog"))["hash"]
    }
    check_pairs(root, cfg, n)


def check_pairs(root, cfg, n) -> None:
    """Pairs lie inside their encoders' bands, never pair an image with itself, carry hard negatives with
    the query first, and every query row is either paired or rejected with a reason."""
    table = read(root.child("mine", "data"))
    m = manifest.read_complete(root.child("mine"))
    assert m["rows_in"] == n and m["rows_out"] == table.num_rows > 0
    emb = read(root.child("embed", "data")).to_pylist()
    vec = {(r[S.ID], enc): np.asarray(r[f"emb_{enc}"]) for r in emb for enc in ("clip_image", "caption")}
    ids = {r[S.ID] for r in emb}
    per_query = {}
    for row in table.to_pylist():
        q, t = row[S.QUERY_ID], row[S.TARGET_ID]
        assert q != t and {q, t} <= ids
        for enc, sim in zip(row[S.ENCODERS], row[S.SIMILARITIES], strict=True):
            lo, hi = cfg.mine.band_for(enc)
            assert lo < sim < hi
            assert sim == pytest.approx(float(vec[(q, enc)] @ vec[(t, enc)]), abs=1e-4)  # the right rows
        hn = row[S.HARD_NEGATIVE_IDS]
        assert hn[0] == row[S.QUERY_ID] and row[S.TARGET_ID] not in hn and len(hn) <= cfg.mine.hard_negatives
        per_query[row[S.QUERY_ID]] = per_query.get(row[S.QUERY_ID], 0) + 1
    assert max(per_query.values()) <= cfg.mine.max_pairs_per_query
    assert len(per_query) + m["rows_rejected"] == n
    assert set(m["details"]["encoders"]) == {"clip_image", "caption"}
    assert sum(m["details"]["pairs_by_encoders"].values()) == table.num_rows
    for split in cfg.mine.splits:
        for name in ("clip_image", "caption"):
            png = root.child("mine", "stats", f"sims_{split}_{name}.png")
            assert storage.read_bytes(png)[:8] == b"\x89PNG\r\n\x1a\n"
    assert storage.read_bytes(root.child("mine", "stats", "pairs.png"))[:8] == b"\x89PNG\r\n\x1a\n"
    split_of = {r[S.ID]: r[S.SPLIT] for r in emb}
    for row in table.to_pylist():  # each split is mined among itself: nothing crosses
        named = {row[S.QUERY_ID], row[S.TARGET_ID], *row[S.HARD_NEGATIVE_IDS]}
        assert {split_of[i] for i in named} == {row[S.SPLIT]}, row


def test_local_run_then_rerun_skips_everything(tmp_path, tiny_models, ray_local):
    cfg = small(str(tmp_path / "run"), tiny_models)
    rows = graph.run_graph(cfg)
    assert [(r.stage, r.status) for r in rows] == [("catalog", "ran"), ("embed", "ran"), ("mine", "ran")]
    root = storage.resolve(cfg.run.run_root)
    check_outputs(root, cfg)
    first = (tmp_path / "run" / "embed" / "manifest.json").read_text()
    rows = graph.run_graph(cfg)
    assert [r.status for r in rows] == ["skipped", "skipped", "skipped"]
    assert (tmp_path / "run" / "embed" / "manifest.json").read_text() == first  # untouched


def test_undecodable_images_are_rejected_with_reason(tmp_path, tiny_models, ray_local):
    cfg = small(str(tmp_path / "run"), tiny_models)
    graph.run_graph(cfg, until="catalog")
    part = sorted((tmp_path / "run" / "catalog" / "data").glob("*.parquet"))[0]
    t = pq.read_table(part)
    broken_ids = t.column(S.ID).to_pylist()[:2]
    images = t.column(S.IMAGE).to_pylist()
    images[0], images[1] = b"garbage", b""
    pq.write_table(
        t.set_column(t.schema.get_field_index(S.IMAGE), S.IMAGE, pa.array(images, pa.binary())), part
    )

    rows = graph.run_graph(cfg, start="embed", until="embed")
    n = cfg.catalog.num_groups * cfg.catalog.variants_per_group
    assert (rows[0].rows_in, rows[0].rows_out, rows[0].rows_rejected) == (n, n - 2, 2)
    rejected = pq.read_table(tmp_path / "run" / "embed" / "rejected")
    assert sorted(rejected.column(S.ID).to_pylist()) == sorted(broken_ids)
    assert set(rejected.column(S.REASON).to_pylist()) == {
        "undecodable image: UnidentifiedImageError",
        "empty file",
    }
    m = manifest.read_complete(storage.resolve(str(tmp_path / "run" / "embed")))
    assert m["rejected_reasons"] == {"undecodable image: UnidentifiedImageError": 1, "empty file": 1}


def test_s3_run_root(s3_bucket, tiny_models, ray_local):
    storage_cfg, bucket = s3_bucket
    creds = [f"storage.access_key_id={storage_cfg.access_key_id}", f"storage.secret_access_key={SECRET}"]
    cfg = small(
        f"s3://{bucket}/runs/ci", tiny_models, f"storage.endpoint_url={storage_cfg.endpoint_url}", *creds
    )
    rows = graph.run_graph(cfg)
    assert [r.status for r in rows] == ["ran", "ran", "ran"]
    root = storage.resolve(cfg.run.run_root, cfg.storage)
    check_outputs(root, cfg)
    keys = {o["Key"] for o in storage.boto3_client(cfg.storage).list_objects_v2(Bucket=bucket)["Contents"]}
    assert {"runs/ci/catalog/_SUCCESS", "runs/ci/embed/_SUCCESS", "runs/ci/embed/manifest.json"} <= keys
    assert [r.status for r in graph.run_graph(cfg)] == ["skipped", "skipped", "skipped"]
    client = storage.boto3_client(cfg.storage)
    for stage in ("catalog", "embed"):
        text = client.get_object(Bucket=bucket, Key=f"runs/ci/{stage}/manifest.json")["Body"].read().decode()
        assert SECRET not in text and "AKIATESTKEY" not in text


KINDS = {
    "flat": {"kind": "flat"},
    "ivf_flat": {"kind": "ivf_flat", "nlist": 16, "nprobe": 3},
    "ivf_pq": {"kind": "ivf_pq", "nlist": 16, "nprobe": 3, "pq_m": 4, "pq_bits": 4},
    "hnsw": {"kind": "hnsw", "hnsw_m": 8},
}


@pytest.mark.parametrize("tasks", [1, 3])
@pytest.mark.parametrize("kind", list(KINDS))
def test_sharded_knn_matches_one_search(ray_local, tasks, kind):
    """knn() (coarse lists computed once, queries sorted by list, shards on Ray tasks) returns what one
    ``index.search`` over the same index returns, row for row."""
    import faiss

    from coral.config import IndexConfig
    from coral.search import knn

    rng = np.random.default_rng(0)
    x = rng.normal(size=(1001, 16)).astype(np.float32)  # 1001: shards of unequal size
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cfg = IndexConfig(**KINDS[kind])
    faiss.omp_set_num_threads(1)  # HNSW builds the same graph only when built by one thread
    try:
        sims, rows = knn.knn(x, 6, cfg, tasks=tasks)
        ref_sims, ref_rows = knn.search(knn.build_index(x, cfg), x, 6)
    finally:
        faiss.omp_set_num_threads(os.cpu_count() or 1)
    assert (rows == ref_rows).all()
    np.testing.assert_allclose(sims, ref_sims, rtol=1e-5, atol=1e-6)
    if kind != "ivf_pq":  # PQ codes are lossy: only uncompressed indexes find each vector first
        assert (rows[:, 0] == np.arange(len(x))).mean() > 0.95
