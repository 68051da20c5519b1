"""cluster.yaml through Ray's own validation; every workflow's actors, workers and replicas placed on its
node types (coral.cluster); the check_cluster entry point."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from coral import cluster, graph
from coral.config import load_config
from coral.errors import ConfigError
from ray_jobs import check_cluster

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((REPO / "workflows").glob("*.yaml"))


@pytest.fixture(scope="module")
def spec() -> dict:
    return cluster.load(REPO / "cluster.yaml")


@pytest.fixture(scope="module")
def types(spec) -> list[cluster.NodeType]:
    return cluster.node_types(spec)


def test_cluster_yaml_passes_rays_validation_with_the_promised_worker_types(spec, types):
    by_name = {t.name: t for t in types}
    assert set(by_name) == {"head", "cpu_worker", "gpu_inference", "gpu_train"}
    assert by_name["head"].resources["CPU"] == 0  # no stage work on the head
    nodes = spec["available_node_types"]
    for name in ("cpu_worker", "gpu_inference", "gpu_train"):
        assert nodes[name]["min_workers"] == 0 and nodes[name]["max_workers"] >= 1, name  # scale to zero
    assert by_name["gpu_inference"].resources["GPU"] >= 1 and by_name["gpu_train"].resources["GPU"] >= 1
    assert any(k.startswith("accelerator_type:") for k in by_name["gpu_train"].resources)
    assert spec["idle_timeout_minutes"] > 0
    text = (REPO / "cluster.yaml").read_text()
    assert "aws_access_key_id" not in text.lower() and "secret" not in text.lower()
    for name, node in nodes.items():
        assert "IamInstanceProfile" in node["node_config"], name  # S3 through the instance profile
    assert "~/.ray/auth_token" in spec["file_mounts"]  # Ray's token auth on every node
    for command in (*spec["head_start_ray_commands"], *spec["worker_start_ray_commands"]):
        assert "ray stop" in command or "RAY_AUTH_MODE=token" in command


def test_ray_validation_rejects_a_broken_cluster_config():
    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["gpu_train"]["min_workerz"] = 1  # the schema allows no extra keys
    with pytest.raises(ConfigError, match="Ray rejects the cluster config.*gpu_train"):
        cluster.validate(bad, "bad.yaml")
    bad = copy.deepcopy(raw)
    bad["head_node_type"] = "nope"
    with pytest.raises(ConfigError, match="bad.yaml"):
        cluster.validate(bad, "bad.yaml")


def test_node_types_must_declare_their_resources(spec):
    bare = copy.deepcopy(spec)
    del bare["available_node_types"]["gpu_train"]["resources"]
    with pytest.raises(ConfigError, match="'gpu_train' must declare its resources"):
        cluster.node_types(bare)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_every_workflow_loads_orders_its_stages_and_fits_the_cluster(path, spec):
    cfg = load_config(path)
    graph.select(cfg)  # known stages, each after its inputs
    assert cluster.problems(cfg, spec) == []


@pytest.mark.parametrize("name", ["megapairs.yaml", "merit.yaml"])
def test_cluster_workflows_ask_for_gpu_worker_types(name, types):
    cfg = load_config(REPO / "workflows" / name)
    assert cfg.run.run_root.startswith("s3://")
    rows = cluster.plan(cfg, types)
    train = next(r for r in rows if r[0].where == "train")
    assert train[1] == ["gpu_train"] and train[0].bundle["GPU"] == 1 and train[0].gang
    gpu_rows = [r for r in rows if r[0].bundle.get("GPU")]
    assert len(gpu_rows) >= 3 and all(r[1] and not r[2] for r in gpu_rows)
    assert all("head" not in r[1] for r in rows)  # nothing lands on the head


def test_requests_follow_the_configured_stages_and_resources():
    cfg = load_config(
        REPO / "workflows" / "megapairs.yaml",
        [
            "run.stages=[catalog, embed]",
            "embed.encoders=[{name: a, num_actors: 3, num_gpus: 0.5, resources: {x: 2}}]",
        ],
    )
    (r,) = cluster.requests(cfg)
    assert (r.where, r.count, r.gang) == ("embed.encoders[a]", 3, False)
    assert r.bundle == {"CPU": 1.0, "GPU": 0.5, "x": 2.0}
    vllm = load_config(
        REPO / "workflows" / "megapairs.yaml",
        ["run.stages=[annotate]", "annotate.instruct.vllm={tensor_parallel_size: 2}"],
    )
    by = {r.where: r for r in cluster.requests(vllm)}
    assert by["annotate.instruct"].bundle["GPU"] == 2 and by["annotate.describe"].bundle["GPU"] == 1
    served = ["run.stages=[serve]", "serve.index={replicas: 2}"]
    wheres = [r.where for r in cluster.requests(load_config(REPO / "workflows" / "megapairs.yaml", served))]
    assert wheres == ["serve.encoder", "serve.index", "serve.ingress"]
    inside = load_config(REPO / "workflows" / "megapairs.yaml", [*served, "serve.index_in_encoder=true"])
    assert [r.where for r in cluster.requests(inside)] == ["serve.encoder", "serve.ingress"]
    # "auto" decides on the index's size once it is built: the plan keeps room for its deployment
    auto = load_config(REPO / "workflows" / "megapairs.yaml", ["run.stages=[serve]", "serve.index={}"])
    assert auto.serve.index_in_encoder == "auto"
    assert [r.where for r in cluster.requests(auto)] == ["serve.encoder", "serve.index", "serve.ingress"]
    with pytest.raises(ConfigError, match="serve.index_in_encoder"):
        load_config(REPO / "workflows" / "megapairs.yaml", ["serve.index_in_encoder=sometimes"])


def test_placement_problems_name_the_key_and_the_shortfall(spec):
    path = REPO / "workflows" / "megapairs.yaml"
    wrong_gpu = load_config(path, ["train.accelerator_type=H100"])
    (p,) = cluster.problems(wrong_gpu, spec)
    assert p.startswith("train: no node type has") and "accelerator_type:H100" in p
    too_many = load_config(path, ["train.num_workers=17"])  # 2 nodes x 8 A100s hold 16
    (p,) = cluster.problems(too_many, spec)
    assert "17 workers" in p and "holds 16" in p
    # 96 CPUs per node hold 7 workers of 13 CPUs each
    fat = load_config(path, ["train.num_workers=16", "train.cpus_per_worker=13"])
    (p,) = cluster.problems(fat, spec)
    assert "holds 14" in p
    big_actor = load_config(path, ["index.num_gpus=5"])
    assert cluster.problems(big_actor, spec) == [
        "index: no node type has {CPU: 1, GPU: 5, accelerator_type:L4: 0.001}"
    ]


def test_fits_and_per_node():
    node = {"CPU": 8.0, "GPU": 2.0, "accelerator_type:L4": 1.0}
    assert cluster.fits({"CPU": 4, "GPU": 1, "accelerator_type:L4": 0.001}, node)
    assert not cluster.fits({"CPU": 4, "custom": 1}, node)
    assert cluster.per_node({"CPU": 3, "GPU": 0.5}, node) == 2
    assert cluster.per_node({"CPU": 0.5, "GPU": 0.5, "accelerator_type:L4": 0.001}, node) == 4


def test_check_cluster_entry_point(capsys):
    wf = str(REPO / "workflows" / "megapairs.yaml")
    assert check_cluster.main(["--cluster", str(REPO / "cluster.yaml"), "--config", wf]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "gpu_train" in out and "fits" in out
    assert (
        check_cluster.main(
            ["--cluster", str(REPO / "cluster.yaml"), "--config", wf, "train.accelerator_type=H100"]
        )
        == 1
    )
    assert "1 request(s) do not fit" in capsys.readouterr().out
    assert check_cluster.main(["--cluster", "/nonexistent/cluster.yaml", "--config", wf]) == 2
    assert "cluster config not found" in capsys.readouterr().err
