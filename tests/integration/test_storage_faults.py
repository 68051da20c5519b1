"""Storage faults survived, nothing lost: the graph (catalog -> merit) on ``s3://`` behind a proxy that
answers a seeded share of requests with 503 SlowDown and resets connections writes the same rows as the
same run without faults."""

from __future__ import annotations

import hashlib
import json

import pyarrow.parquet as pq
import pytest

from coral import graph, manifest, storage
from coral.config import load_config
from tests.conftest import REPO, SECRET
from tests.servers.faulty_proxy import FaultyProxy

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

STAGES = ("catalog", "merit")


def config(uri: str, endpoint: str, storage_cfg):
    return load_config(
        REPO / "workflows" / "ci_small.yaml",
        [
            f"run.run_root={uri}",
            "run.stages=[catalog, merit]",
            "catalog.num_groups=40",  # 120 products: enough for merit to keep queries, small enough to be quick
            "merit.queries={train: 60, test: 30}",
            "merit.num_tasks=2",
            f"storage.endpoint_url={endpoint}",
            f"storage.access_key_id={storage_cfg.access_key_id}",
            f"storage.secret_access_key={SECRET}",
        ],
    )


def digest(loc) -> tuple[int, str]:
    """Rows and a hash of the sorted rows of every Parquet file under ``loc`` (order-free)."""
    rows = []
    for path in storage.list_files(loc, ".parquet"):
        for row in pq.read_table(path, filesystem=loc.fs).to_pylist():
            rows.append(json.dumps(row, sort_keys=True, default=lambda b: hashlib.sha256(b).hexdigest()))
    return len(rows), hashlib.sha256("\n".join(sorted(rows)).encode()).hexdigest()


def outputs(uri: str, storage_cfg) -> dict:
    """Per stage: the data's and rejected rows' digests and the manifest's counts, read without faults."""
    root = storage.resolve(uri, storage_cfg)
    out = {}
    for stage in STAGES:
        m = manifest.read_complete(root.child(stage))
        assert m is not None and m["status"] == "complete", stage
        out[stage] = {
            "data": digest(root.child(stage, manifest.DATA)),
            "rejected": digest(root.child(stage, manifest.REJECTED)),
            "counts": (m["rows_in"], m["rows_out"], m["rows_rejected"]),
        }
    return out


def test_graph_on_s3_survives_slowdowns_and_resets(s3_bucket, ray_local):
    storage_cfg, bucket = s3_bucket
    clean = f"s3://{bucket}/clean"
    rows = graph.run_graph(config(clean, storage_cfg.endpoint_url, storage_cfg))
    assert [r.status for r in rows] == ["ran", "ran"]

    # 15% of requests fail, in bursts of 1-3 in a row on one key; and for sure three 503s in a row on a
    # write in a Ray task and on a read in the driver: more than two attempts get through, and a pickled
    # pyarrow filesystem (what a Ray task gets) must still retry throttling
    burst = ["slowdown"] * 3 + [None]  # None: the next one goes through
    script = {
        "PUT /faulty/catalog/data/part-00000.parquet?partNumber&uploadId": burst,
        "GET /faulty/catalog/data/part-00001.parquet": burst,
    }
    proxy = FaultyProxy(storage_cfg.endpoint_url, rate=0.15, seed=5, max_burst=3, script=script).start()
    try:
        faulty = f"s3://{bucket}/faulty"
        rows = graph.run_graph(config(faulty, proxy.url, storage_cfg))
    finally:
        proxy.stop()
    assert [r.status for r in rows] == ["ran", "ran"]
    assert proxy.stats["slowdown"] > 0 and proxy.stats["reset"] > 0 and proxy.stats["lost"] > 0, proxy.stats

    expected, got = outputs(clean, storage_cfg), outputs(faulty, storage_cfg)
    assert got == expected
    assert expected["catalog"]["data"][0] == 120 and expected["merit"]["data"][0] > 0
