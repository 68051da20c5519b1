import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def run_script(script: str, *args: str, limit: int) -> subprocess.CompletedProcess:
    """Run a node-loss script in its own process, under an outer timeout with escalation: a cluster that
    cannot place work again may never return."""
    return subprocess.run(
        ["timeout", "-k", "20", "-s", "INT", str(limit), sys.executable, str(HERE / script), *args],
        cwd=HERE.parents[1],
        capture_output=True,
        text=True,
        timeout=limit + 60,
    )


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_embed_survives_losing_a_worker_node(tmp_path):
    r = run_script("node_loss.py", str(tmp_path / "run"), limit=300)
    out = r.stdout + r.stderr[-3000:]
    assert "removing the node that runs the encoder actor" in r.stdout, out
    assert r.returncode == 0, out
    assert "rows_in=600 rows_out=600 unique=600 catalog=600" in r.stdout, out


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(500)
def test_training_survives_losing_the_worker_node(tmp_path, tiny_models):
    r = run_script("train_node_loss.py", str(tmp_path / "run"), str(tiny_models["qwen2_vl"]), limit=420)
    out = r.stdout[-3000:] + r.stderr[-4000:]
    assert "removing the node that runs the train worker" in r.stdout, out
    assert r.returncode == 0, out
    assert "steps=40 history=40 resumed_from_step=" in r.stdout, out
