"""The graph through ``ray job submit``: a real Ray head started here (``ray start --head`` with its own
ports and temp dir), run_root on S3 (moto on 127.0.0.1), the repo uploaded as the job's working dir.

One job is stopped (``ray job stop``) in the middle of a stage; the next submission completes the graph
with every stage's output written once; a third skips every stage. The head, and every process it
started, is gone afterwards. The same head refuses a submission without its token (token auth, as the
cluster's nodes start Ray)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import pyarrow.parquet as pq
import pytest

from coral import storage
from coral.config import StorageConfig
from tests.conftest import REPO, encoders_override, free_port

RAY = str(Path(sys.executable).with_name("ray"))
STAGES = ("catalog", "embed", "mine")
AUTH = {"RAY_AUTH_MODE": "token"}  # Ray's token auth, with a token of the test's own (RAY_AUTH_TOKEN_PATH)


def head_processes(marker: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if marker in " ".join(p.info["cmdline"] or ()):
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


@pytest.fixture(scope="module")
def ray_head(s3_server):
    """A Ray head of its own (ports, temp dir), started after the S3 fixture so its processes see the S3
    credentials in their environment, as cluster nodes get theirs from an instance profile."""
    temp = tempfile.mkdtemp(prefix="crh", dir="/tmp")  # short: Ray's socket paths have a length limit
    token = Path(temp) / "auth_token"
    token.write_text(secrets.token_hex(32))
    AUTH["RAY_AUTH_TOKEN_PATH"] = str(token)
    ports = {
        "port": free_port(),
        "dashboard-port": free_port(),
        "ray-client-server-port": free_port(),
        "node-manager-port": free_port(),
        "object-manager-port": free_port(),
        "dashboard-agent-listen-port": free_port(),
        "dashboard-agent-grpc-port": free_port(),
        "metrics-export-port": free_port(),
        "runtime-env-agent-port": free_port(),
    }
    lo = 20000 + (os.getpid() % 50) * 200  # workers' ports: below the kernel's ephemeral range of the others
    cmd = [
        RAY,
        "start",
        "--head",
        "--block",
        "--num-cpus=4",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--temp-dir={temp}",
        f"--min-worker-port={lo}",
        f"--max-worker-port={lo + 200}",
        "--disable-usage-stats",
        *(f"--{k}={v}" for k, v in ports.items()),
    ]
    log = open(Path(temp) / "head.log", "w")  # noqa: SIM115 - closed below
    # no drain on SIGTERM: the head would wait up to 30 s for its node to go idle (a Kubernetes pod's
    # grace for Serve traffic), and the jobs' Ray Data actors keep it busy
    env = {**os.environ, **AUTH, "RAY_USAGE_STATS_ENABLED": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        deadline = time.time() + 120
        with api(address) as http:  # a request, not a `ray` CLI process, every half second
            while time.time() < deadline:
                if head.poll() is not None:
                    raise RuntimeError(
                        f"ray start exited {head.returncode}: {Path(temp, 'head.log').read_text()[-2000:]}"
                    )
                try:
                    if http.get("/api/jobs/").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            else:
                raise TimeoutError("the Ray head's job server did not answer in 120 s")
        yield address
    finally:
        tree = head_processes(temp)
        # SIGTERM to `ray start --block` alone: it stops the processes it started, raylet first, as
        # `ray stop` would on this node (SIGTERM to all of them at once left the GCS and the autoscaler's
        # monitor up for the whole wait)
        head.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(tree, timeout=30)
        for p in alive:
            p.kill()
        head.wait(timeout=20)
        log.close()
        left = [p.pid for p in head_processes(temp)]
        shutil.rmtree(temp, ignore_errors=True)
        assert left == [], f"Ray processes of the test's head still running: {left}"


def api(address: str) -> httpx.Client:
    """The head's job REST API (what ``ray job status`` and ``ray job logs`` call), with its token."""
    token = Path(AUTH["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    return httpx.Client(base_url=address, timeout=30, headers={"Authorization": f"Bearer {token}"})


def cli(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, **AUTH, "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run([RAY, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def files(loc) -> dict:
    return {i.path: (i.size, i.mtime) for i in loc.fs.get_file_info(storage.list_files(loc))}


def job_status(address: str, job: str) -> str:
    done = cli("job", "status", "--address", address, job, timeout=60)
    out = done.stdout + done.stderr
    for said, status in (("succeeded", "SUCCEEDED"), ("was stopped", "STOPPED"), ("failed", "FAILED")):
        if f"Job '{job}' {said}" in out:
            return status
    for status in ("RUNNING", "PENDING"):
        if f"Status for job '{job}': {status}" in out:
            return status
    return "UNKNOWN: " + out[-500:]


@pytest.mark.timeout(180)
def test_job_api_refuses_callers_without_the_token(ray_head, tmp_path):
    """The head's job API answers only callers that carry its token: over HTTP, no Authorization header is
    401 and a wrong token 403; `ray job submit` with a wrong token, or with token auth off on the caller's
    side, exits non-zero with an authentication error. None of these submissions creates a job."""
    token = Path(AUTH["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    jobs = f"{ray_head}/api/jobs/"
    refused = ["coral-no-header", "coral-wrong-token", "coral-cli-wrong-token", "coral-cli-auth-off"]
    entrypoint = "python -c 'print(1)'"
    with httpx.Client(timeout=30) as http:
        assert http.get(f"{ray_head}/api/gcs_healthz").status_code == 200  # the head is up: health is public
        assert http.get(jobs).status_code == 401
        answer = http.post(jobs, json={"entrypoint": entrypoint, "submission_id": refused[0]})
        assert answer.status_code == 401, answer.text
        wrong = {"Authorization": f"Bearer {secrets.token_hex(32)}"}
        answer = http.post(jobs, json={"entrypoint": entrypoint, "submission_id": refused[1]}, headers=wrong)
        assert answer.status_code == 403, answer.text

    wrong_token = tmp_path / "wrong_token"
    wrong_token.write_text(secrets.token_hex(32))
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_")}
    callers = {
        # the head's answers, as the CLI reports them: 403 and 401
        refused[2]: (
            base | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(wrong_token)},
            "Forbidden: Invalid authentication token",
        ),
        refused[3]: (base | {"RAY_AUTH_MODE": "disabled"}, "Unauthorized: Missing authentication token"),
    }
    for submission, (env, answer) in callers.items():
        done = subprocess.run(
            [RAY, "job", "submit", "--address", ray_head, "--submission-id", submission, "--no-wait", "--"]
            + ["python", "-c", "print(1)"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env | {"RAY_USAGE_STATS_ENABLED": "0"},
            cwd=REPO,
        )
        said = done.stdout + done.stderr
        assert done.returncode != 0, f"{submission}: submitted without the token\n{said[-2000:]}"
        assert answer in said, f"{submission}: {said[-2000:]}"

    with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {token}"}) as http:
        listed = http.get(jobs)
    assert listed.status_code == 200, listed.text
    created = {j.get("submission_id") for j in listed.json()}
    assert not created & set(refused), f"refused submissions created jobs: {created & set(refused)}"


@pytest.mark.timeout(900)
def test_graph_through_ray_job_submit_on_s3_stop_resubmit_skip(ray_head, s3_bucket, tiny_models):
    s3_cfg, bucket = s3_bucket
    run_root = f"s3://{bucket}/runs/submitted"
    entry = [
        sys.executable,
        "-m",
        "ray_jobs.run",
        "--config",
        "workflows/ci_small.yaml",
        f"run.run_root={run_root}",
        f"storage.endpoint_url={s3_cfg.endpoint_url}",  # credentials: the head's environment
        "catalog.num_groups=100",
        encoders_override(tiny_models),
    ]
    submit = [
        "job",
        "submit",
        "--address",
        ray_head,
        "--working-dir",
        ".",
        "--runtime-env",
        "cluster/runtime_env.yaml",
    ]

    # 1. submitted and stopped once the embed stage has started
    first = cli(*submit, "--submission-id", "coral-stopped", "--no-wait", "--", *entry, timeout=120)
    assert first.returncode == 0, first.stderr
    deadline = time.time() + 300
    logs = ""
    with api(ray_head) as http:  # polled over REST: a `ray` CLI process per look takes seconds of CPU
        while time.time() < deadline and "embed: running" not in logs:
            time.sleep(0.5)
            logs = http.get("/api/jobs/coral-stopped/logs").json()["logs"]
            status = http.get("/api/jobs/coral-stopped").json()["status"]
            assert status in ("PENDING", "RUNNING"), logs[-3000:]
    assert "embed: running" in logs, logs[-3000:]
    stop = cli("job", "stop", "--address", ray_head, "coral-stopped", timeout=120)
    assert stop.returncode == 0, stop.stderr
    assert job_status(ray_head, "coral-stopped") == "STOPPED"

    cfg = StorageConfig(endpoint_url=s3_cfg.endpoint_url)
    root = storage.resolve(run_root, cfg)
    assert storage.exists(root.child("catalog", "_SUCCESS"))
    assert not storage.exists(root.child("embed", "_SUCCESS")), "the stop came after the embed stage finished"
    catalog_files = files(root.child("catalog"))

    # 2. submitted again: the catalog is kept, the stopped stage and the rest run once
    second = cli(*submit, "--submission-id", "coral-resumed", "--", *entry, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-2000:]
    assert "catalog: skipped" in second.stdout and "embed: running" in second.stdout
    assert job_status(ray_head, "coral-resumed") == "SUCCEEDED"
    manifests = {}
    for stage in STAGES:
        assert storage.exists(root.child(stage, "_SUCCESS")), stage
        manifests[stage] = json.loads(storage.read_bytes(root.child(stage, "manifest.json")))
        assert manifests[stage]["status"] == "complete" and manifests[stage]["rows_out"] > 0, stage
    assert files(root.child("catalog")) == catalog_files  # not rewritten
    products = pq.read_table(root.child("catalog", "data").path, filesystem=root.fs, columns=["id"])["id"]
    embedded = pq.read_table(root.child("embed", "data").path, filesystem=root.fs, columns=["id"])["id"]
    assert sorted(embedded.to_pylist()) == sorted(products.to_pylist())  # each product once
    assert manifests["embed"]["rows_out"] == len(products) == 300
    pairs = pq.read_table(root.child("mine", "data").path, filesystem=root.fs)
    assert pairs.num_rows == manifests["mine"]["rows_out"]
    keys = list(zip(pairs["query_id"].to_pylist(), pairs["target_id"].to_pylist(), strict=True))
    assert len(set(keys)) == len(keys)

    # 3. a third submission skips every stage and changes nothing
    third = cli(*submit, "--submission-id", "coral-skipped", "--", *entry, timeout=600)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-2000:]
    for stage in STAGES:
        assert f"{stage}: skipped" in third.stdout, stage
        again = json.loads(storage.read_bytes(root.child(stage, "manifest.json")))
        assert again == manifests[stage], stage
