import dataclasses
import pickle
import time

import pyarrow.fs as pafs
import pytest

from coral import storage
from coral.config import StorageConfig
from coral.errors import StorageError


def test_resolve_local_and_file_uri(tmp_path):
    a = storage.resolve(str(tmp_path / "x"))
    b = storage.resolve(f"file://{tmp_path}/x")
    assert a.path == b.path == str(tmp_path / "x")
    assert isinstance(a.fs, pafs.LocalFileSystem) and not a.is_s3
    assert a.child("embed", "data").path == str(tmp_path / "x" / "embed" / "data")


def test_resolve_s3_uri_keeps_bucket_and_prefix():
    loc = storage.resolve("s3://bucket/some/prefix/", StorageConfig(endpoint_url="http://127.0.0.1:9"))
    assert loc.is_s3 and loc.path == "bucket/some/prefix" and loc.uri == "s3://bucket/some/prefix"
    assert isinstance(loc.fs, pafs.S3FileSystem)
    assert loc.child("a").uri == "s3://bucket/some/prefix/a"


@pytest.mark.parametrize("uri", ["gs://b/x", "s3://", "http://host/x"])
def test_resolve_rejects_bad_uris(uri):
    with pytest.raises(StorageError, match="s3://|scheme|bucket"):
        storage.resolve(uri)


def test_local_roundtrip_and_delete(tmp_path):
    root = storage.resolve(str(tmp_path / "run"))
    storage.ensure_writable(root)
    storage.write_json(root.child("s", "manifest.json"), {"a": 1})
    storage.write_bytes(root.child("s", "data", "x.parquet"), b"123")
    assert storage.read_json(root.child("s", "manifest.json")) == {"a": 1}
    assert [p.rsplit("/", 1)[1] for p in storage.list_files(root.child("s"), ".parquet")] == ["x.parquet"]
    storage.delete_tree(root.child("s"))
    assert not storage.exists(root.child("s"))
    assert list((tmp_path / "run").iterdir()) == []  # the write probe is gone too


def test_unwritable_local_root_names_uri(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    loc = storage.resolve(str(blocker / "run"))
    with pytest.raises(StorageError) as e:
        storage.ensure_writable(loc)
    assert str(blocker / "run") in str(e.value)


def test_s3_roundtrip(s3_bucket):
    cfg, bucket = s3_bucket
    root = storage.resolve(f"s3://{bucket}/runs/r1", cfg)
    storage.ensure_writable(root)
    storage.write_json(root.child("st", "manifest.json"), {"ok": True})
    storage.write_bytes(root.child("st", "_SUCCESS"), b"")
    assert storage.read_json(root.child("st", "manifest.json")) == {"ok": True}
    manifest = root.child("st", "manifest.json")
    assert storage.size(manifest) == len(storage.read_bytes(manifest)) > 0
    objects = storage.boto3_client(cfg).list_objects_v2(Bucket=bucket)["Contents"]
    keys = {o["Key"] for o in objects if not o["Key"].endswith("/")}  # pyarrow keeps directory markers
    assert keys == {"runs/r1/st/manifest.json", "runs/r1/st/_SUCCESS"}
    storage.delete_tree(root.child("st"))
    assert storage.list_files(root) == []


def test_s3_missing_bucket_is_named(s3_server):
    loc = storage.resolve("s3://no-such-bucket/x", StorageConfig(endpoint_url=s3_server))
    with pytest.raises(StorageError, match="no-such-bucket"):
        storage.ensure_writable(loc)


def test_unreachable_s3_endpoint_fails_fast_and_names_uri():
    from tests.conftest import free_port

    cfg = StorageConfig(
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        access_key_id="AKIAUNSEEN",
        secret_access_key="never-shown",
    )
    loc = storage.resolve("s3://bucket/run", cfg)
    t = time.time()
    with pytest.raises(StorageError) as e:
        storage.ensure_writable(loc)
    assert time.time() - t < 30
    assert "s3://bucket/run" in str(e.value)
    assert "AKIAUNSEEN" not in str(e.value) and "never-shown" not in str(e.value)


def test_size_of_a_file_and_a_missing_one_named(tmp_path):
    loc = storage.resolve(str(tmp_path)).child("index.faiss")
    storage.write_bytes(loc, b"x" * 1234)
    assert storage.size(loc) == 1234
    with pytest.raises(FileNotFoundError, match="nothing.faiss"):
        storage.size(storage.resolve(str(tmp_path)).child("nothing.faiss"))


def test_s3_retries_throttling_in_the_driver_and_in_a_pickled_copy(s3_bucket):
    """Three 503 SlowDown in a row on one request are retried through (max_attempts >= 5): by the
    filesystem, by the pickled copy a Ray task gets (pyarrow's own pickling drops the retry strategy: the
    copy would retry connection errors only), on a read of a range smaller than the error's body (which the
    AWS SDK reports as a non-retryable INTERNAL_FAILURE) and by boto3 (adaptive)."""
    from tests.servers.faulty_proxy import FaultyProxy

    cfg, bucket = s3_bucket
    storage.write_bytes(storage.resolve(f"s3://{bucket}/k", cfg), b"x")
    throttled = ["slowdown"] * 3 + [None]
    # boto3 backs off up to 1 s, 2 s, 4 s...: two 503s are enough to need more than the old two attempts
    script = {f"HEAD /{bucket}/k": throttled * 2, f"GET /{bucket}/k": throttled + ["slowdown"] * 2}
    proxy = FaultyProxy(cfg.endpoint_url, rate=0.0, script=script).start()
    try:
        via = dataclasses.replace(cfg, endpoint_url=proxy.url)
        assert via.max_attempts >= 5
        loc = storage.resolve(f"s3://{bucket}/k", via)
        assert storage.size(loc) == 1
        assert storage.size(pickle.loads(pickle.dumps(loc))) == 1
        assert storage.read_bytes(loc) == b"x"  # a 1-byte range: the 503's XML overflows it
        assert storage.boto3_client(via).get_object(Bucket=bucket, Key="k")["Body"].read() == b"x"
        assert storage.boto3_client(via).meta.config.retries["mode"] == "adaptive"
        assert proxy.stats["slowdown"] == 11
    finally:
        proxy.stop()
