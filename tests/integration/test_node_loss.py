import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_embed_survives_losing_a_worker_node(tmp_path):
    # an outer timeout with escalation: a cluster that cannot place work again may never return
    r = subprocess.run(
        [
            "timeout",
            "-k",
            "20",
            "-s",
            "INT",
            "300",
            sys.executable,
            str(HERE / "node_loss.py"),
            str(tmp_path / "run"),
        ],
        cwd=HERE.parents[1],
        capture_output=True,
        text=True,
        timeout=360,
    )
    out = r.stdout + r.stderr[-3000:]
    assert "removing the node that runs the encoder actor" in r.stdout, out
    assert r.returncode == 0, out
    assert "rows_in=600 rows_out=600 unique=600 catalog=600" in r.stdout, out


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(500)
def test_training_survives_losing_the_worker_node(tmp_path, tiny_models):
    r = subprocess.run(
        [
            "timeout",
            "-k",
            "20",
            "-s",
            "INT",
            "420",
            sys.executable,
            str(HERE / "train_node_loss.py"),
            str(tmp_path / "run"),
            str(tiny_models["qwen2_vl"]),
        ],
        cwd=HERE.parents[1],
        capture_output=True,
        text=True,
        timeout=470,
    )
    out = r.stdout[-3000:] + r.stderr[-4000:]
    assert "removing the node that runs the train worker" in r.stdout, out
    assert r.returncode == 0, out
    assert "steps=60 history=60 resumed_from_step=" in r.stdout, out
