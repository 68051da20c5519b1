"""``python -m ray_jobs.run`` as a user runs it: exit codes, messages, nothing written on bad input,
and an interrupted run that completes when started again. The command itself runs in a process of its
own where that is the point (its exit code from ``-m``, Ctrl-C); elsewhere its ``main`` runs in this
process with the same arguments (``sys.exit(main())`` is all ``-m`` adds), sparing a Python that imports
torch, transformers and Ray (about 3.5 s each) or a second local Ray."""

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ray_jobs import run as command
from tests.conftest import encoders_override, free_port

REPO = Path(__file__).resolve().parents[2]
SMALL = str(REPO / "workflows" / "ci_small.yaml")


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ray_jobs.run", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def main(capsys, *args: str) -> subprocess.CompletedProcess:
    """``ray_jobs.run.main(args)`` in this process: its exit code and what it printed."""
    capsys.readouterr()
    code = command.main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def test_unknown_key_exits_2_naming_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("catalog:\n  num_grups: 3\n")
    r = cli("--config", str(bad), f"run.run_root={tmp_path / 'run'}")
    assert r.returncode == 2, r.stderr
    assert "catalog.num_grups" in r.stderr and str(bad) in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_wrong_type_exits_2(tmp_path, capsys):
    r = main(capsys, "--config", SMALL, "catalog.image_size=big", f"run.run_root={tmp_path / 'run'}")
    assert r.returncode == 2 and "catalog.image_size" in r.stderr and "expected int" in r.stderr
    assert not (tmp_path / "run").exists()


def test_unknown_stage_in_from_exits_2(tmp_path, capsys):
    r = main(capsys, "--config", SMALL, "--from", "train", f"run.run_root={tmp_path / 'run'}")
    assert r.returncode == 2 and "--from train" in r.stderr
    assert not (tmp_path / "run").exists()


def test_unwritable_run_root_exits_2(tmp_path, tiny_models, capsys):
    (tmp_path / "file").write_text("x")
    root = tmp_path / "file" / "run"
    r = main(capsys, "--config", SMALL, f"run.run_root={root}", encoders_override(tiny_models))
    assert r.returncode == 2 and str(root) in r.stderr and "cannot write" in r.stderr


def test_unreachable_s3_exits_2_within_30s_without_leaking_credentials(tiny_models, capsys):
    secret = "do-not-print-this-secret"
    t = time.time()
    r = main(
        capsys,
        "--config",
        SMALL,
        "run.run_root=s3://somebucket/run",
        encoders_override(tiny_models),
        f"storage.endpoint_url=http://127.0.0.1:{free_port()}",
        "storage.access_key_id=AKIANOTPRINTED",
        f"storage.secret_access_key={secret}",
    )
    assert time.time() - t < 30
    assert r.returncode == 2 and "s3://somebucket/run" in r.stderr
    assert secret not in r.stderr + r.stdout and "AKIANOTPRINTED" not in r.stderr + r.stdout


@pytest.mark.ray
@pytest.mark.timeout(420)
def test_interrupted_embed_completes_on_rerun(ray_local, tmp_path, tiny_models, capsys):
    args = [
        "--config",
        SMALL,
        f"run.run_root={tmp_path / 'run'}",
        encoders_override(tiny_models),
        "catalog.num_groups=40",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "ray_jobs.run", *args],
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        # a shell without job control starts background commands with SIGINT ignored, and Python then
        # never raises KeyboardInterrupt: give the driver the default handling whoever runs the tests
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.default_int_handler),
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    deadline, seen = time.time() + 180, False
    while time.time() < deadline and not seen:
        try:
            seen = "embed: running" in lines.get(timeout=1)
        except queue.Empty:
            assert proc.poll() is None, "driver exited before embed started"
    assert seen, "embed never started"
    time.sleep(3)  # let the actor pool start
    proc.send_signal(signal.SIGINT)
    try:
        rc = proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait(timeout=30)
    assert rc == 130, "the graph finished before the interrupt" if rc == 0 else f"exit code {rc}"
    assert (tmp_path / "run" / "catalog" / "_SUCCESS").exists()
    assert not (tmp_path / "run" / "embed" / "_SUCCESS").exists()
    assert json.loads((tmp_path / "run" / "embed" / "manifest.json").read_text())["status"] == "failed"

    r = main(capsys, *args)  # the same command again (in this process's Ray: the first one's is gone)
    assert r.returncode == 0, r.stderr[-3000:]
    status = {
        line.split()[0]: line.split()[1]
        for line in r.stdout.splitlines()
        if line[:7] in ("catalog", "embed  ")
    }
    assert status == {"catalog": "skipped", "embed": "ran"}
    catalog_ids = pq.read_table(tmp_path / "run" / "catalog" / "data").column("id").to_pylist()
    embed_ids = pq.read_table(tmp_path / "run" / "embed" / "data").column("id").to_pylist()
    assert len(catalog_ids) == 120 and sorted(embed_ids) == sorted(catalog_ids)


def test_missing_model_exits_2_before_any_stage_runs(tmp_path, capsys):
    r = main(
        capsys,
        "--config",
        SMALL,
        f"run.run_root={tmp_path / 'run'}",
        "embed.encoders=[{name: clip_image, model: models/nowhere/clip}]",
    )
    assert r.returncode == 2 and "models/nowhere/clip" in r.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_failing_stage_exits_1_naming_it_and_keeps_earlier_stages(ray_local, tmp_path, tiny_models, capsys):
    broken = tmp_path / "broken-clip"
    shutil.copytree(tiny_models["clip"], broken)
    (broken / "model.safetensors").write_bytes(b"not weights")  # config is valid, weights are not
    r = main(
        capsys,
        "--config",
        SMALL,
        f"run.run_root={tmp_path / 'run'}",
        f"embed.encoders=[{{name: clip_image, model: {broken}}}]",
    )
    assert r.returncode == 1, r.stderr[-2000:]
    assert "stage 'embed' failed" in r.stderr
    assert "catalog  ran" in r.stdout  # the summary still lists what completed
    assert (tmp_path / "run" / "catalog" / "_SUCCESS").exists()
    assert not (tmp_path / "run" / "embed" / "_SUCCESS").exists()
