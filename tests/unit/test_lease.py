"""One run per run_root: the lease (coral.lease) on local storage and on a real S3 endpoint (moto), and
the graph refusing a run_root another run holds before it touches a stage folder or starts Ray."""

import json
import logging
import os
import re
import socket
import time

import pytest

from coral import graph, ray_runtime, storage
from coral.config import StorageConfig, load_config
from coral.errors import UserInputError
from coral.lease import LEASE, Lease, LeaseLost
from tests.conftest import REPO, SECRET


def local(tmp_path):
    return storage.resolve(str(tmp_path / "run")), StorageConfig()


def s3(s3_bucket):
    cfg, bucket = s3_bucket
    return storage.resolve(f"s3://{bucket}/runs/r", cfg), cfg


def stored(root) -> dict | None:
    loc = root.child(LEASE)
    return json.loads(storage.read_bytes(loc)) if storage.exists(loc) else None


def hold(root, owner="someone-else", age_s=0.0) -> bytes:
    """A lease as another run on another host writes it, its heartbeat ``age_s`` old; without ``ttl_s``
    (optional), so the reader's own TTL judges it."""
    now = time.time()
    body = json.dumps(
        {
            "owner": owner,
            "host": "other-host",
            "pid": 4242,
            "started": now - age_s - 5,
            "heartbeat": now - age_s,
        }
    ).encode()
    storage.write_bytes(root.child(LEASE), body)
    return body


# a second lease on a live one fails, naming the holder; release removes it and lets the next run in


def second_lease_fails_naming_holder(root, cfg):
    first = Lease(root, cfg, ttl_s=60).acquire()
    try:
        assert set(stored(root)) == {"owner", "host", "pid", "started", "heartbeat", "ttl_s"}
        assert stored(root)["owner"] == first.owner and stored(root)["pid"] == os.getpid()
        with pytest.raises(UserInputError) as e:
            Lease(root, cfg, ttl_s=60).acquire()
        msg = str(e.value)
        assert first.owner in msg and socket.gethostname() in msg and f"pid {os.getpid()}" in msg
        # the heartbeat written just now: 0 s ago, or a second or two where the store answers slowly
        age = re.search(r"last heartbeat (\d+) s ago", msg)
        assert age and int(age.group(1)) <= 3 and root.child(LEASE).uri in msg
        assert stored(root)["owner"] == first.owner  # the holder's lease is untouched
    finally:
        first.release()
    assert stored(root) is None  # released: gone
    first.release()  # twice is fine
    second = Lease(root, cfg, ttl_s=60).acquire()
    assert stored(root)["owner"] == second.owner
    second.release()
    assert stored(root) is None


def test_second_lease_fails_naming_holder_local(tmp_path):
    second_lease_fails_naming_holder(*local(tmp_path))


def test_second_lease_fails_naming_holder_s3(s3_bucket):
    second_lease_fails_naming_holder(*s3(s3_bucket))


# a stale lease is taken over with a warning; its old holder then finds it lost and leaves it alone


def stale_lease_taken_over_with_warning(root, cfg, caplog):
    hold(root, owner="crashed-run", age_s=300)
    with caplog.at_level(logging.WARNING, logger="coral.lease"):
        taker = Lease(root, cfg, ttl_s=60).acquire()
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "taking over a stale lease" in warning and "crashed-run" in warning and "other-host" in warning
    assert "last heartbeat 300 s ago" in warning
    assert stored(root)["owner"] == taker.owner
    taker.release()
    assert stored(root) is None


def test_stale_lease_taken_over_with_warning_local(tmp_path, caplog):
    stale_lease_taken_over_with_warning(*local(tmp_path), caplog)


def test_stale_lease_taken_over_with_warning_s3(s3_bucket, caplog):
    stale_lease_taken_over_with_warning(*s3(s3_bucket), caplog)


def holder_that_stalls_loses_its_lease(root, cfg):
    """A run whose heartbeat stops for longer than the TTL is taken over; it then fails its check and its
    heartbeat, and its release leaves the new holder's lease in place."""
    stalled = Lease(root, cfg, ttl_s=0.4).acquire()
    stalled._stop.set()  # its heartbeat stops (a paused or hung process)
    stalled._thread.join()
    time.sleep(0.5)
    taker = Lease(root, cfg, ttl_s=60).acquire()
    try:
        with pytest.raises(LeaseLost, match=f"now held by run {taker.owner}"):
            stalled.check()
        with pytest.raises(LeaseLost):
            stalled.refresh()
        stalled.release()
        assert stored(root)["owner"] == taker.owner
    finally:
        taker.release()
    assert stored(root) is None


def test_holder_that_stalls_loses_its_lease_local(tmp_path):
    holder_that_stalls_loses_its_lease(*local(tmp_path))


def test_holder_that_stalls_loses_its_lease_s3(s3_bucket):
    holder_that_stalls_loses_its_lease(*s3(s3_bucket))


def heartbeat_keeps_it_live(root, cfg):
    lease = Lease(root, cfg, ttl_s=0.8).acquire()  # a beat every 0.1 s
    try:
        first = stored(root)["heartbeat"]
        time.sleep(1.2)  # longer than the TTL: only the heartbeat keeps it from going stale
        assert stored(root)["heartbeat"] > first + 0.5
        with pytest.raises(UserInputError, match=lease.owner):
            Lease(root, cfg, ttl_s=0.8).acquire()
        lease.check()
    finally:
        lease.release()


def test_heartbeat_keeps_it_live_local(tmp_path):
    heartbeat_keeps_it_live(*local(tmp_path))


def test_heartbeat_keeps_it_live_s3(s3_bucket):
    heartbeat_keeps_it_live(*s3(s3_bucket))


def test_local_lease_leaves_no_temp_files(tmp_path):
    root, cfg = local(tmp_path)
    hold(root, age_s=300)
    lease = Lease(root, cfg, ttl_s=60).acquire()
    lease.refresh()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LEASE]
    lease.release()
    assert list((tmp_path / "run").iterdir()) == []


# the graph: a run_root another run holds is refused before any stage folder is touched or Ray starts


def graph_refuses_a_held_run_root(root, cfg_extra, monkeypatch):
    def no_ray(cfg):
        raise AssertionError("Ray must not start")

    monkeypatch.setattr(ray_runtime, "connect", no_ray)
    config = load_config(
        REPO / "workflows" / "ci_small.yaml",
        [f"run.run_root={root.uri}", "run.stages=[catalog, merit]", *cfg_extra],
    )
    done = root.child("catalog", "manifest.json")
    storage.write_bytes(done, b'{"stage": "catalog"}')  # a stage folder the refused run must not touch
    body = hold(root, owner="the-live-run")
    with pytest.raises(UserInputError) as e:
        graph.run_graph(config)
    msg = str(e.value)
    assert "the-live-run" in msg and "other-host" in msg and "pid 4242" in msg and "s ago" in msg
    assert storage.read_bytes(root.child(LEASE)) == body  # the holder's lease is untouched
    assert storage.read_bytes(done) == b'{"stage": "catalog"}'
    files = {p.rsplit("/", 1)[1] for p in storage.list_files(root)}
    assert files == {LEASE, "manifest.json"}  # no merit/ folder, no marker, nothing else


def test_graph_refuses_a_held_run_root_local(tmp_path, monkeypatch):
    graph_refuses_a_held_run_root(local(tmp_path)[0], [], monkeypatch)


def test_graph_refuses_a_held_run_root_s3(s3_bucket, monkeypatch):
    root, cfg = s3(s3_bucket)
    creds = [
        f"storage.endpoint_url={cfg.endpoint_url}",
        f"storage.access_key_id={cfg.access_key_id}",
        f"storage.secret_access_key={SECRET}",
    ]
    graph_refuses_a_held_run_root(root, creds, monkeypatch)


def test_s3_lease_survives_lost_replies(s3_bucket):
    """A conditional write that went through but whose reply was lost is retried and refused (412); the
    lease recognises its own bytes instead of reporting itself as the holder, or as having lost it."""
    from tests.servers.faulty_proxy import FaultyProxy

    cfg, bucket = s3_bucket
    key = f"/{bucket}/runs/r/{LEASE}"
    script = {f"PUT {key}": ["lost", None, "lost"], f"DELETE {key}": ["lost"]}
    proxy = FaultyProxy(cfg.endpoint_url, rate=0.0, script=script).start()
    try:
        via = StorageConfig(endpoint_url=proxy.url, access_key_id=cfg.access_key_id, secret_access_key=SECRET)
        root = storage.resolve(f"s3://{bucket}/runs/r", via)
        lease = Lease(root, via, ttl_s=60).acquire()  # create: lost, then refused as existing
        lease.refresh()  # If-Match: lost, then refused as the ETag changed
        lease.check()
        lease.release()  # If-Match delete: lost, then 404
        assert stored(root) is None
        assert [e[1] for e in proxy.events if e[0].startswith("PUT")] == [
            "lost",
            "forwarded",
            "lost",
            "forwarded",
        ]
    finally:
        proxy.stop()


def test_the_driver_exits_2_naming_the_holder(tmp_path, capsys, monkeypatch):
    from ray_jobs.run import main

    monkeypatch.setattr(ray_runtime, "connect", lambda cfg: pytest.fail("Ray must not start"))
    root = local(tmp_path)[0]
    hold(root, owner="the-live-run")
    # catalog only: its checks need no built models (a fresh clone has none)
    args = [
        "--config",
        str(REPO / "workflows" / "ci_small.yaml"),
        f"run.run_root={root.uri}",
        "run.stages=[catalog]",
    ]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and "the-live-run" in err and "other-host" in err and "pid 4242" in err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LEASE]
