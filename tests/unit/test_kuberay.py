"""The KubeRay manifests (cluster/kuberay/) and the image they run (cluster/Dockerfile), checked against the
rest of the repository: cluster.yaml's node types, the pinned versions, the workflows and the Serve builder;
and safe by default: Ray's token auth in every Ray container, no optional Secret, NetworkPolicies around the
head, pods that run as non-root without privileges. Static checks only: no Kubernetes, no Ray cluster."""

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
from packaging.version import Version

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


def documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d is not None]


def load(name: str) -> dict:
    """The manifest's one Ray resource; the file's other documents are its NetworkPolicies."""
    docs = documents(name)
    ray = [d for d in docs if d["kind"] in MANIFESTS.values()]
    assert len(ray) == 1, f"{name}: expected one Ray resource, got {len(ray)}"
    others = {d["kind"] for d in docs} - {ray[0]["kind"]}
    assert others <= {"NetworkPolicy"}, f"{name}: unexpected documents {others}"
    return ray[0]


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
    for n in tree.body:  # and the classes it imports from coral (the deployments' own module)
        if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("coral."):
            source = Path(importlib.util.find_spec(n.module).origin).read_text()
            defined = {c.name for c in ast.parse(source).body if isinstance(c, ast.ClassDef)}
            classes |= defined & {a.name for a in n.names}
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
        expected = ray_runtime.remote_args(want)
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
    for pin in ("faiss-gpu==1.15.1", "ray[llm]==2.60.0"):  # vLLM through Ray's llm extra
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


# Safe by default: what anyone in the Kubernetes cluster can reach, and what a pod may do.

AUTH_SECRET, AUTH_KEY = "coral-ray-auth", "auth_token"  # KubeRay's authOptions.secretName reads this key
SERVE_SECRET = "coral-serve"
CLUSTER_LABEL, CLIENT_LABEL = "coral/ray-cluster", "coral/ray-client"
GUARDED_PORTS = {6379, 8265, 10001}  # GCS, dashboard + job API, Ray client
SERVE_PORT = 8000
OPERATOR_POD = {"app.kubernetes.io/name": "kuberay-operator"}  # the Helm chart's label on the operator's pod
AUTH_OPTIONS_SINCE = "1.6.0"  # the first KubeRay whose authOptions takes a secretName
POD_LEVEL = {"runAsNonRoot", "runAsUser", "runAsGroup", "seccompProfile"}  # containers inherit these


def ray_pods(doc: dict) -> dict[str, dict]:
    """Every pod template the manifest has KubeRay create, by role: "head", each worker group, and a RayJob's
    "submitter" (without a template of ours KubeRay makes one without labels or securityContext)."""
    spec = cluster_spec(doc)
    pods = {"head": spec["headGroupSpec"]["template"]}
    pods |= {g["groupName"]: g["template"] for g in spec["workerGroupSpecs"]}
    if doc["kind"] == "RayJob":
        assert doc["spec"].get("submitterPodTemplate"), (
            "the RayJob leaves its submitter pod to KubeRay's default"
        )
        pods["submitter"] = doc["spec"]["submitterPodTemplate"]
    return pods


def all_containers(template: dict) -> list[dict]:
    spec = template["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def pod_labels(doc: dict, role: str, template: dict) -> dict:
    """The labels of the pod KubeRay creates from a template: the template's, then the operator's own. A RayJob's
    or RayService's cluster gets a generated name (<name>-<random>), so its ray.io/cluster is not known here."""
    labels = dict(template.get("metadata", {}).get("labels", {}))
    name = doc["metadata"]["name"]
    if role == "submitter":
        return labels | {"batch.kubernetes.io/job-name": name}
    cluster = name if doc["kind"] == "RayCluster" else f"{name}-x7k2q"
    node_type = "head" if role == "head" else "worker"
    return labels | {"ray.io/cluster": cluster, "ray.io/node-type": node_type, "ray.io/is-ray-node": "yes"}


def selects(selector: dict, labels: dict) -> bool:
    """Kubernetes' label selector semantics (an empty selector selects everything)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        key, op, values = e["key"], e["operator"], e.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def network_policies(name: str) -> list[dict]:
    return [d for d in documents(name) if d["kind"] == "NetworkPolicy"]


def ingress_rules(name: str, labels: dict) -> tuple[int, list[dict]]:
    """(how many policies isolate a pod with these labels for ingress, the ingress rules that then apply)."""
    policies = [
        p
        for p in network_policies(name)
        if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        and selects(p["spec"]["podSelector"], labels)
    ]
    return len(policies), [r for p in policies for r in p["spec"].get("ingress", [])]


def admitted(rule: dict) -> set[int] | None:
    """The ports a rule admits; None: every port."""
    if not rule.get("ports"):
        return None
    out = set()
    for p in rule["ports"]:
        assert isinstance(p.get("port"), int), f"{p}: name ports by number"
        assert p.get("protocol", "TCP") == "TCP", p
        out |= set(range(p["port"], p.get("endPort", p["port"]) + 1))
    return out


def peer_kind(peer: dict, cluster: str) -> str:
    """What a NetworkPolicy peer names: the pods of this Ray cluster ("cluster"), pods labelled as Ray clients
    in this namespace ("client"), the KubeRay operator's pods in one named namespace ("operator"), or anything
    else ("other")."""
    pods, namespaces = peer.get("podSelector"), peer.get("namespaceSelector") or {}
    if set(peer) == {"podSelector"} and pods == {"matchLabels": {CLUSTER_LABEL: cluster}}:
        return "cluster"
    if set(peer) == {"podSelector"} and pods == {"matchLabels": {CLIENT_LABEL: "true"}}:
        return "client"
    one_namespace = list(namespaces) == ["matchLabels"] and list(namespaces["matchLabels"]) == [
        "kubernetes.io/metadata.name"
    ]
    if (
        set(peer) == {"namespaceSelector", "podSelector"}
        and pods == {"matchLabels": OPERATOR_POD}
        and one_namespace
    ):
        return "operator"
    return "other"


def reaches(rules: list[dict], port: int, peer_labels: dict | None) -> bool:
    """Whether a pod of this namespace with peer_labels (None: any pod, any namespace) gets through to port."""
    for rule in rules:
        ports = admitted(rule)
        if ports is not None and port not in ports:
            continue
        peers = rule.get("from")
        if not peers:
            return True
        if peer_labels is not None and any(
            set(p) == {"podSelector"} and selects(p["podSelector"], peer_labels) for p in peers
        ):
            return True
    return False


@params
def test_ray_token_auth_in_every_container(name):
    """Ray's token auth: the operator's native field (its own clients get the token: job and Serve status, the
    submitter, the autoscaler), and in every container the env Ray reads itself, from a Secret that must exist."""
    doc = load(name)
    assert cluster_spec(doc).get("authOptions") == {"mode": "token", "secretName": AUTH_SECRET}
    for role, template in ray_pods(doc).items():
        for c in all_containers(template):
            where = f"{role}/{c['name']}"
            env = {e["name"]: e for e in c.get("env", [])}
            assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", (
                f"{where}: RAY_AUTH_MODE is not token"
            )
            token = env.get("RAY_AUTH_TOKEN", {})
            assert "value" not in token, f"{where}: the token written inline"
            ref = token.get("valueFrom", {}).get("secretKeyRef")
            assert ref == {"name": AUTH_SECRET, "key": AUTH_KEY}, f"{where}: RAY_AUTH_TOKEN from {ref}"
            assert "RAY_AUTH_TOKEN_PATH" not in env, where
    assert not re.search(r"RAY_AUTH_MODE\W+disabled", (KUBERAY / name).read_text())


def secret_refs(node, path: str = ""):
    """(path, reference) of every Secret reference in a document: env secretKeyRef, envFrom secretRef, volumes."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("secretKeyRef", "secretRef", "secret") and isinstance(value, dict):
                yield f"{path}.{key}", value
            yield from secret_refs(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from secret_refs(value, f"{path}[{i}]")


@params
def test_no_secret_is_optional(name):
    """A pod whose Secret is missing must not start: an optional Secret starts Ray without its token, or Serve
    with an open API."""
    refs = list(secret_refs(documents(name)))
    assert refs
    for path, ref in refs:
        assert ref.get("optional") is not True, f"{path}: optional Secret {ref.get('name')}"
    assert not re.search(r"optional:\s*true", (KUBERAY / name).read_text())
    doc = load(name)
    (head,) = containers(cluster_spec(doc)["headGroupSpec"])
    serve = {e["name"]: e for e in head["env"]}.get("CORAL_SERVE_TOKEN")
    assert serve == {
        "name": "CORAL_SERVE_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": SERVE_SECRET, "key": "token"}},
    }


def image_user() -> tuple[int, int | None]:
    """The uid (and gid) the image runs as: its last USER, by number (Kubernetes checks runAsNonRoot on it)."""
    users = [args for ins, args in dockerfile() if ins == "USER"]
    assert users, "cluster/Dockerfile does not state the user it runs as"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and (not gid or gid.isdigit()), f"USER {users[-1]}: not numeric"
    return int(uid), int(gid) if gid else None


def test_image_runs_as_a_non_root_user():
    uid, gid = image_user()
    assert uid != 0 and gid != 0, "the image runs as root"


@params
def test_pods_run_as_non_root_without_privileges(name):
    uid, gid = image_user()
    doc = load(name)
    for role, template in ray_pods(doc).items():
        spec = template["spec"]
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(key), f"{role}: {key}"
        pod = {k: v for k, v in spec.get("securityContext", {}).items() if k in POD_LEVEL}
        for c in all_containers(template):
            where = f"{role}/{c['name']}"
            sc = pod | c.get("securityContext", {})
            assert sc.get("runAsNonRoot") is True, f"{where}: runAsNonRoot"
            assert sc.get("runAsUser") == uid, (
                f"{where}: runAsUser {sc.get('runAsUser')}, the image's user is {uid}"
            )
            assert sc.get("runAsGroup", gid) == gid, f"{where}: runAsGroup"
            assert sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation"
            assert sc.get("privileged") is not True, f"{where}: privileged"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: capabilities not dropped"
            assert not sc.get("capabilities", {}).get("add"), f"{where}: capabilities added"
            assert sc.get("seccompProfile") == {"type": "RuntimeDefault"}, f"{where}: seccompProfile"
    # the autoscaler container KubeRay adds to the head pod: the head's pod-level settings, these for itself
    autoscaler = cluster_spec(doc)["autoscalerOptions"].get("securityContext", {})
    assert autoscaler.get("allowPrivilegeEscalation") is False, "autoscaler: allowPrivilegeEscalation"
    assert autoscaler.get("capabilities", {}).get("drop") == ["ALL"], "autoscaler: capabilities"


@params
def test_network_policies_guard_the_head(name):
    """The head's job API and dashboard (8265), Ray client (10001) and GCS (6379) are reachable only from the
    pods of the same Ray cluster, from pods labelled coral/ray-client in the namespace and (8265 only) from
    the KubeRay operator; Serve (8000, its own bearer token) from anywhere; the workers only from the cluster."""
    doc = load(name)
    cluster = doc["metadata"]["name"]
    assert network_policies(name), f"{name} has no NetworkPolicy"
    pods = ray_pods(doc)
    labels = {role: pod_labels(doc, role, t) for role, t in pods.items()}
    for role in labels.keys() - {"submitter"}:
        assert labels[role].get(CLUSTER_LABEL) == cluster, f"{role}: pod template without {CLUSTER_LABEL}"

    isolated, rules = ingress_rules(name, labels["head"])
    assert isolated, "no NetworkPolicy selects the head"
    for rule in rules:
        ports = admitted(rule)
        guarded = GUARDED_PORTS if ports is None else GUARDED_PORTS & ports
        if not guarded:
            continue
        assert rule.get("from"), f"{sorted(guarded)} open to anyone: {rule}"
        for peer in rule["from"]:
            kind = peer_kind(peer, cluster)
            assert kind != "other", f"{sorted(guarded)} open to {peer}"
            if kind == "client":
                assert ports is not None and ports <= GUARDED_PORTS, (
                    f"Ray clients get more than they need: {rule}"
                )
            if kind == "operator":
                assert ports == {8265}, f"the operator gets more than the job API: {rule}"
    # the cluster's own pods reach every port; another Ray cluster's pods, or any pod, none but Serve's
    worker = labels[next(role for role in labels if role not in ("head", "submitter"))]
    other_pod = {"ray.io/cluster": "another", "ray.io/node-type": "worker", CLUSTER_LABEL: "another"}
    for port in (*GUARDED_PORTS, 8080, 52365, 20000):  # ..., metrics, the dashboard agent, a worker's port
        assert reaches(rules, port, worker), f"{port}: closed to the cluster's own pods"
        assert not reaches(rules, port, other_pod), f"{port}: open to another Ray cluster's pods"
        assert not reaches(rules, port, None), f"{port}: open to any pod"
    for port in (8265, 10001):
        assert reaches(rules, port, {CLIENT_LABEL: "true"}), f"{port}: closed to {CLIENT_LABEL} pods"
    operator = [
        r
        for r in rules
        if 8265 in (admitted(r) or {8265})
        and any(peer_kind(p, cluster) == "operator" for p in r.get("from", []))
    ]
    assert operator, "the KubeRay operator cannot reach the job API (job and Serve status)"
    assert reaches(rules, SERVE_PORT, None), "Serve's port is closed"
    if "submitter" in labels:
        assert reaches(rules, 8265, labels["submitter"]), "the RayJob's submitter cannot reach the job API"

    for role in labels.keys() - {"head", "submitter"}:
        isolated, worker_rules = ingress_rules(name, labels[role])
        assert isolated, f"no NetworkPolicy selects {role}"
        for rule in worker_rules:
            assert rule.get("from") and all(peer_kind(p, cluster) == "cluster" for p in rule["from"]), (
                f"{role} reachable from outside its cluster: {rule}"
            )


def header(path: Path) -> str:
    lines = path.read_text().splitlines()
    return "\n".join(line for line in lines[: next(i for i, x in enumerate(lines) if not x.startswith("#"))])


@params
def test_header_says_how_to_create_the_secrets_and_install_the_operator(name):
    text = header(KUBERAY / name)
    assert f"kubectl create secret generic {AUTH_SECRET} --from-literal={AUTH_KEY}=" in text
    assert f"kubectl create secret generic {SERVE_SECRET} --from-literal=token=" in text
    assert "NetworkPolicies" in text
    install = r"helm install kuberay-operator\b.*?--version (\S+)"
    installs = re.findall(install, text)
    assert installs, "no operator install"
    docs = (REPO / "README.md").read_text() + (REPO / "docs" / "cluster.md").read_text()
    for version in installs + re.findall(install, docs):
        assert Version(version) >= Version(AUTH_OPTIONS_SINCE), f"KubeRay {version} drops authOptions"
    namespaces = set(re.findall(r"--namespace (\S+)", text))
    peers = {
        p["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        for policy in network_policies(name)
        for rule in policy["spec"].get("ingress", [])
        for p in rule.get("from", [])
        if "namespaceSelector" in p
    }
    assert peers and peers <= namespaces, (
        f"policies admit the operator from {peers}, it is installed in {namespaces}"
    )
