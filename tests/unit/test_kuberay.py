"""The KubeRay manifests (cluster/kuberay/) and the image they run (cluster/Dockerfile), checked against the
rest of the repository: cluster.yaml's node types, the pinned versions, the workflows and the Serve builder.
Static checks only: no Kubernetes, no Ray cluster."""

from __future__ import annotations

import ast
import copy
import importlib.util
import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.dockerfile import steps

REPO = Path(__file__).resolve().parents[2]
KUBERAY = REPO / "cluster" / "kuberay"
DOCKERFILE = REPO / "cluster" / "Dockerfile"

MANIFESTS = {"raycluster.yaml": "RayCluster", "rayjob.yaml": "RayJob", "rayservice.yaml": "RayService"}
# The worker groups each manifest must have; a group is cluster.yaml's node type with "-" for "_".
GROUPS = {
    "RayCluster": {"cpu-worker", "gpu-inference", "gpu-train"},
    "RayJob": {"cpu-worker", "gpu-inference", "gpu-train"},
    "RayService": {"gpu-inference"},
}
GPUS = {"gpu-inference": 4, "gpu-train": 8}
GPU_KEY = "nvidia.com/gpu"
SECRET_WORDS = {"KEY", "SECRET", "TOKEN", "PASSWORD", "CREDENTIALS"}  # parts of an env var name

params = pytest.mark.parametrize("name", sorted(MANIFESTS))


def load(name: str) -> dict:
    docs = [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d is not None]
    assert len(docs) == 1, f"{name}: expected one document, got {len(docs)}"
    return docs[0]


def cluster_spec(doc: dict) -> dict:
    """The RayCluster spec inside a RayCluster, RayJob or RayService."""
    field = {"RayCluster": None, "RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}[doc["kind"]]
    return doc["spec"] if field is None else doc["spec"][field]


def cluster_yaml() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def node_type(group: str) -> dict:
    types = cluster_yaml()["available_node_types"]
    key = group.replace("-", "_")
    assert key in types, f"worker group {group} has no node type {key} in cluster.yaml ({sorted(types)})"
    return types[key]


def accelerator_resources(resources: dict) -> dict:
    return {k: v for k, v in resources.items() if k.startswith("accelerator_type:")}


def custom_resources(ray_start_params: dict) -> dict:
    """rayStartParams.resources in KubeRay's format, '"{\\"accelerator_type:L4\\": 1}"' (quoted for the shell)."""
    raw = ray_start_params.get("resources")
    if raw is None:
        return {}
    assert raw.startswith('"') and raw.endswith('"'), f"resources must be a quoted JSON string: {raw!r}"
    return json.loads(raw[1:-1].replace("\\", ""))


def containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def pod_templates(doc: dict) -> list[dict]:
    spec = cluster_spec(doc)
    return [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]


def requirement_pin(package: str) -> str:
    for line in (REPO / "requirements.txt").read_text().splitlines():
        m = re.match(rf"{re.escape(package)}(\[[^\]]*\])?==(\S+)", line.strip())
        if m:
            return m.group(2)
    raise AssertionError(f"requirements.txt does not pin {package}")


def project_version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def test_every_manifest_is_checked():
    assert sorted(p.name for p in KUBERAY.glob("*.yaml")) == sorted(MANIFESTS)


@params
def test_kind(name):
    doc = load(name)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == MANIFESTS[name]
    assert doc["metadata"]["name"]
    assert cluster_spec(doc)["rayVersion"] == requirement_pin("ray")


@params
def test_head_takes_no_work(name):
    head = cluster_spec(load(name))["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # a string: KubeRay passes it to `ray start`
    for c in containers(head):
        for kind in ("requests", "limits"):
            assert GPU_KEY not in c["resources"].get(kind, {}), f"head {kind} a GPU"


@params
def test_worker_groups_match_cluster_yaml(name):
    doc = load(name)
    groups = {g["groupName"]: g for g in cluster_spec(doc)["workerGroupSpecs"]}
    assert set(groups) == GROUPS[doc["kind"]]
    for group_name, group in groups.items():
        want = node_type(group_name)
        gpus = GPUS.get(group_name, 0)
        assert want["resources"].get("GPU", 0) == gpus, f"cluster.yaml's {group_name} GPUs"
        for c in containers(group):
            for kind in ("requests", "limits"):
                have = c["resources"].get(kind, {})
                if gpus:
                    assert int(str(have.get(GPU_KEY))) == gpus, f"{group_name} {kind} {GPU_KEY}"
                else:
                    assert GPU_KEY not in have, f"{group_name} {kind} a GPU"
        declared = accelerator_resources(custom_resources(group["rayStartParams"]))
        assert declared == accelerator_resources(want["resources"]), group_name
        assert bool(declared) == bool(gpus), f"{group_name}: a GPU group names its GPU type, and only it"
        if gpus:
            assert group["template"]["spec"].get("nodeSelector"), f"{group_name} has no nodeSelector"
        assert int(group["rayStartParams"]["num-cpus"]) == want["resources"]["CPU"], group_name


@params
def test_autoscaling_from_zero(name):
    spec, launcher = cluster_spec(load(name)), cluster_yaml()
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] == launcher["idle_timeout_minutes"] * 60
    for group in spec["workerGroupSpecs"]:
        want = node_type(group["groupName"])
        assert group["minReplicas"] == 0 and group.get("replicas", 0) == 0, group["groupName"]
        assert group["maxReplicas"] == want["max_workers"], group["groupName"]


@params
def test_ray_autoscaler_reads_the_node_types(name):
    """Ray's own KubeRay translation (what the autoscaler sees before any pod exists) gives each group the
    CPUs, GPUs and accelerator type that cluster.yaml's node type declares."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    doc = load(name)
    cr = {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": doc["metadata"]["name"], "namespace": "default"},
        "spec": copy.deepcopy(cluster_spec(doc)),
    }
    derived = _derive_autoscaling_config_from_ray_cr(cr)["available_node_types"]
    launcher = cluster_yaml()
    expected = {launcher["head_node_type"]: "headgroup"} | {
        g["groupName"].replace("-", "_"): g["groupName"] for g in cr["spec"]["workerGroupSpecs"]
    }
    for type_name, group_name in expected.items():
        have = {k: v for k, v in derived[group_name]["resources"].items() if k != "memory" and v}
        want = {k: v for k, v in launcher["available_node_types"][type_name]["resources"].items() if v}
        assert have == want, group_name


@params
def test_image_is_the_projects(name):
    images = {c["image"] for t in pod_templates(load(name)) for c in t["spec"]["containers"]}
    assert len(images) == 1, images
    (image,) = images
    assert ":" in image.rsplit("/", 1)[-1], f"{image}: no tag"
    assert image.rsplit(":", 1)[1] == project_version(), f"{image}: tag is not pyproject's version"


@params
def test_no_credentials(name):
    doc = load(name)
    for template in pod_templates(doc):
        assert template["spec"].get("serviceAccountName"), "cloud access comes from the ServiceAccount"
        for c in template["spec"]["containers"]:
            for env in c.get("env", []):
                if SECRET_WORDS & set(env["name"].upper().split("_")):
                    assert "value" not in env, f"{env['name']} set inline; use valueFrom"
    text = (KUBERAY / name).read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|secret_access_key:", text)


def test_rayjob():
    spec = load("rayjob.yaml")["spec"]
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "ray_jobs.run"]
    assert (REPO / "ray_jobs" / "run.py").is_file()
    workflow = argv[argv.index("--config") + 1]
    assert re.fullmatch(r"workflows/[\w.-]+\.ya?ml", workflow), workflow
    overrides = [a for a in argv[3:] if "=" in a]
    assert any(re.fullmatch(r"run\.run_root=s3://[^/]+/\S+", a) for a in overrides), overrides
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    wanted = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())["env_vars"]
    assert wanted.items() <= runtime_env["env_vars"].items()
    assert (REPO / workflow).is_file(), f"the RayJob runs {workflow}, which is not in the repository"


def serve_app() -> tuple[dict, dict, dict]:
    """(the RayService, its parsed serveConfigV2, its one application)."""
    doc = load("rayservice.yaml")
    serve = yaml.safe_load(doc["spec"]["serveConfigV2"])
    (app,) = serve["applications"]
    return doc, serve, app


def test_rayservice_builder_and_deployments_exist():
    doc, serve, app = serve_app()
    host = serve.get("http_options", {}).get("host", "0.0.0.0")
    assert host == "0.0.0.0", "the Kubernetes Service cannot reach a proxy bound to 127.0.0.1"
    assert app["route_prefix"].startswith("/")
    module, _, attr = app["import_path"].partition(":")
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, f"{module} is not in the repository"
    tree = ast.parse(Path(spec.origin).read_text())
    functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    assert attr in functions, f"{module} has no builder {attr}()"
    assert set(app["args"]) <= {"config", "overrides"}, "coral.serve.app:build reads only these args"
    assert any(re.fullmatch(r"run\.run_root=s3://[^/]+/\S+", o) for o in app["args"]["overrides"])
    deployments = {d["name"]: d for d in app["deployments"]}
    assert set(deployments) == {"Encoder", "Index", "Ingress"}
    assert set(deployments) <= classes, f"deployments not defined in {module}"
    encoder = deployments["Encoder"]["ray_actor_options"]
    assert 0 < encoder["num_gpus"] < 1, "replicas share a GPU"
    groups = {g["groupName"]: g for g in cluster_spec(doc)["workerGroupSpecs"]}
    wanted = f"accelerator_type:{encoder['accelerator_type']}"
    assert wanted in custom_resources(groups["gpu-inference"]["rayStartParams"])
    assert wanted in node_type("gpu-inference")["resources"]
    assert (REPO / app["args"]["config"]).is_file(), f"{app['args']['config']} is not in the repository"


def test_rayservice_matches_the_workflow():
    """serveConfigV2 is what `ray_jobs.serve --write-config` generates for its args, and its deployments'
    options are those the builder would set from the workflow's serve section (Serve's config wins over them,
    so a drift would silently replace the workflow's settings)."""
    from coral import ray_runtime
    from coral.config import load_config
    from coral.serve import deploy

    _, serve, app = serve_app()
    args = app["args"]
    config = load_config(REPO / args["config"], args["overrides"])
    generated = deploy.serve_config(config.serve, args["config"], args["overrides"])
    without_deployments = copy.deepcopy(serve)
    for a in without_deployments["applications"]:
        a.pop("deployments")
    assert without_deployments == generated
    sections = {"Encoder": config.serve.encoder, "Index": config.serve.index, "Ingress": config.serve.ingress}
    for d in app["deployments"]:
        want = sections[d["name"]]
        expected = ray_runtime.remote_args(want.num_cpus, want.num_gpus, want.accelerator_type)
        assert d["ray_actor_options"] == expected, d["name"]
        assert d["max_ongoing_requests"] == want.max_ongoing_requests, d["name"]
        if want.autoscaling:
            assert d["autoscaling_config"] == want.autoscaling and "num_replicas" not in d, d["name"]
        else:
            assert d["num_replicas"] == want.replicas and "autoscaling_config" not in d, d["name"]


def dockerfile() -> list[tuple[str, str]]:
    return steps(DOCKERFILE)


def test_dockerfile():
    steps = dockerfile()
    bases = [args.split()[0] for ins, args in steps if ins == "FROM"]
    assert bases
    for image in bases:
        assert "$" not in image, f"FROM {image}: resolve the tag in the file"
        name, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "")
        assert "@sha256:" in image or (tag and tag != "latest"), f"FROM {image} is not pinned"
        if name == "rayproject/ray":
            assert tag.startswith(requirement_pin("ray") + "-"), f"FROM {image}: not requirements.txt's Ray"
    runs = [args for ins, args in steps if ins == "RUN"]
    requirements = next(i for i, r in enumerate(runs) if re.search(r"-r\s+requirements\.txt", r))
    torch = next(i for i, r in enumerate(runs) if "torch==" in r)
    assert torch <= requirements
    assert re.search(r"torch==.*&&.*-r\s+requirements\.txt", " ".join(runs)), "torch goes in first"
    assert any(ins == "COPY" and "requirements.txt" in args for ins, args in steps)
    assert any(re.search(r"pip install (--no-deps -e|--no-deps) \.", r) for r in runs), "the project"
    for pin in ("faiss-gpu==1.15.1", "vllm==0.33.0"):
        assert any(pin in r for r in runs), pin
    env = " ".join(args for ins, args in steps if ins == "ENV")
    for setting in ("HF_HOME=", "RAY_USAGE_STATS_ENABLED=0", "TOKENIZERS_PARALLELISM=false"):
        assert setting in env, setting
    args = dict(a.split("=", 1) for ins, a in steps if ins == "ARG" and "=" in a)
    assert args.get("CORAL_VERSION") == project_version()


def test_dockerignore_keeps_the_package():
    patterns = {p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()}
    patterns -= {p for p in patterns if not p or p.startswith("#")}
    assert {".venv", ".git", "runs", "models"} <= patterns
    assert not patterns & {"**/models", "coral", "coral/models", "workflows", "requirements.txt"}
