"""Shared fixtures: tiny models, a local Ray, a real S3 endpoint (moto) on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller looks at its workers every 2 s by default, so each train stage waits seconds
# for its worker group to start, its reports and its end; every Ray these tests start (here, in a
# subprocess or under `ray start`) inherits this. A slow answer is not a failure: only one hanging for
# RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S (10 min) is.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


SECRET = "moto-secret-never-logged"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    from coral.testing import corpus
    from coral.testing.tiny import build_all

    return build_all(tmp_path_factory.mktemp("tiny"), corpus=corpus.project())


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session, sized like the driver's default (logical CPUs > cores)."""
    import ray

    from coral import ray_runtime
    from coral.config import RayConfig

    ray_runtime.connect(RayConfig(num_cpus=4, include_dashboard=False))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint (moto's server) on 127.0.0.1; yields its URL. Any credentials are accepted."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield f"http://127.0.0.1:{port}"
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket on the moto server; yields (StorageConfig with explicit credentials, bucket name)."""
    from coral.config import StorageConfig
    from coral.storage import boto3_client

    cfg = StorageConfig(endpoint_url=s3_server, access_key_id="AKIATESTKEY", secret_access_key=SECRET)
    name = "t-" + request.node.name.lower().replace("_", "-")[:40].strip("-[]")
    boto3_client(cfg).create_bucket(Bucket=name)
    return cfg, name


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run only where CUDA is available."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def encoders_override(tiny_models, kinds=("clip_image", "caption")) -> str:
    """``embed.encoders=[...]`` pointing the ci_small encoders at this session's tiny models."""
    specs = {
        "clip_image": f"{{name: clip_image, kind: clip_image, model: {tiny_models['clip']}, batch_size: 8}}",
        "caption": f"{{name: caption, kind: clip_text, model: {tiny_models['clip']}, batch_size: 8}}",
        "dinov2": f"{{name: dinov2, kind: dinov2, model: {tiny_models['dinov2']}, batch_size: 8}}",
    }
    return "embed.encoders=[" + ", ".join(specs[k] for k in kinds) + "]"


def annotate_override(tiny_models) -> list[str]:
    """Point the annotation steps at this session's tiny models: Qwen2-VL describes, a Qwen2 LLM instructs."""
    return [
        f"annotate.describe.model={tiny_models['qwen2_vl']}",
        f"annotate.instruct.model={tiny_models['qwen2']}",
    ]
