"""What a workflow asks of a cluster, checked against the node types of a Ray cluster launcher config
(``cluster.yaml``) before anything starts.

Every actor pool, train worker group and Serve deployment of the run's stages becomes a request: one
bundle of resources (CPU, GPU, ``accelerator_type:<name>``, custom ones) times a count. A bundle must fit
one node type; train workers start together (one placement group), so their whole group must fit in the
node type's ``max_workers``. Node types declare their resources in the file so the check needs no cloud
API; Ray's own schema validation runs first (``ray up`` runs the same)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from coral.config import Config, DeploymentConfig, EngineConfig
from coral.errors import ConfigError

ACCELERATOR = "accelerator_type:"
ACCELERATOR_SHARE = 0.001  # what Ray asks of a node per actor with an accelerator_type


@dataclass(frozen=True)
class Request:
    where: str  # the config key that asks, e.g. "embed.encoders[dinov2]"
    bundle: dict[str, float]  # one actor, worker or replica
    count: int
    gang: bool = False  # every one at once (a train worker group)


@dataclass(frozen=True)
class NodeType:
    name: str
    resources: dict[str, float]
    max_workers: int


def load(path: str | Path) -> dict:
    """The cluster launcher config as Ray will see it: defaults filled in and Ray's schema checked."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: cluster config not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return validate(raw, str(path))


def validate(raw: dict, source: str = "cluster.yaml") -> dict:
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        prepared = prepare_config(copy.deepcopy(raw))
        validate_config(prepared)
    except (jsonschema.ValidationError, ValueError, KeyError) as e:
        message = e.message if isinstance(e, jsonschema.ValidationError) else str(e)
        where = "/".join(str(p) for p in getattr(e, "absolute_path", ()))
        raise ConfigError(
            f"{source}: Ray rejects the cluster config{' at ' + where if where else ''}: {message}"
        ) from None
    return prepared


def node_types(cluster: dict, source: str = "cluster.yaml") -> list[NodeType]:
    types = []
    for name, spec in cluster["available_node_types"].items():
        resources = spec.get("resources")
        if not resources or "CPU" not in resources:
            raise ConfigError(
                f"{source}: node type {name!r} must declare its resources (CPU, GPU, accelerator_type:<name>)"
                " so that workflows can be checked against it without a cloud API"
            )
        head = name == cluster["head_node_type"]
        types.append(
            NodeType(name, {k: float(v) for k, v in resources.items()}, 1 if head else spec["max_workers"])
        )
    return types


def bundle(
    num_cpus: float, num_gpus: float = 0.0, accelerator_type: str = "", resources=None
) -> dict[str, float]:
    out = {
        "CPU": float(num_cpus),
        "GPU": float(num_gpus),
        **{k: float(v) for k, v in (resources or {}).items()},
    }
    if accelerator_type:
        out[ACCELERATOR + accelerator_type] = ACCELERATOR_SHARE
    return {k: v for k, v in out.items() if v > 0}


def _engine(where: str, e: EngineConfig) -> Request:
    gpus = e.num_gpus
    if e.kind == "vllm":  # one engine per actor over tensor x pipeline parallel GPUs
        gpus = max(gpus, e.vllm.get("tensor_parallel_size", 1) * e.vllm.get("pipeline_parallel_size", 1))
    return Request(where, bundle(e.num_cpus, gpus, e.accelerator_type), e.num_actors)


def _deployment(where: str, d: DeploymentConfig) -> Request:
    count = int(d.autoscaling.get("min_replicas", 1)) if d.autoscaling else d.replicas
    return Request(where, bundle(d.num_cpus, d.num_gpus, d.accelerator_type), max(count, 1))


def requests(cfg: Config) -> list[Request]:
    """The resource requests of the run's stages (``run.stages``)."""
    stages, out = set(cfg.run.stages), []
    if "embed" in stages:
        for e in cfg.embed.encoders:
            b = bundle(e.num_cpus, e.num_gpus, e.accelerator_type, e.resources)
            out.append(Request(f"embed.encoders[{e.name}]", b, e.num_actors))
    if "annotate" in stages:
        out += [
            _engine("annotate.describe", cfg.annotate.describe),
            _engine("annotate.instruct", cfg.annotate.instruct),
        ]
    if "merit" in stages:
        out += [
            _engine(f"merit.{k}", getattr(cfg.merit, k))
            for k in ("label", "rewrite", "judge")
            if getattr(cfg.merit, k)
        ]
    if "train" in stages:
        t = cfg.train
        b = bundle(t.cpus_per_worker, 1.0 if t.use_gpu else 0.0, t.accelerator_type, t.resources)
        out.append(Request("train", b, t.num_workers, gang=True))
    if "index" in stages:
        i = cfg.index
        out.append(Request("index", bundle(i.num_cpus, i.num_gpus, i.accelerator_type), i.num_actors))
    if "serve" in stages:
        # "auto" decides on the index's size once it exists: plan for the deployment it may start
        inside = cfg.serve.index_in_encoder is True
        parts = ("encoder", "ingress") if inside else ("encoder", "index", "ingress")
        out += [_deployment(f"serve.{k}", getattr(cfg.serve, k)) for k in parts]
    return out


def fits(b: dict[str, float], resources: dict[str, float]) -> bool:
    return all(resources.get(k, 0.0) >= v for k, v in b.items())


def per_node(b: dict[str, float], resources: dict[str, float]) -> int:
    """How many bundles one node of these resources holds."""
    return min((math.floor(resources.get(k, 0.0) / v + 1e-9) for k, v in b.items()), default=0)


def plan(cfg: Config, types: list[NodeType]) -> list[tuple[Request, list[str], str]]:
    """Per request: the node types it can run on and a problem ("" when none)."""
    rows = []
    for r in requests(cfg):
        where = [t for t in types if fits(r.bundle, t.resources)]
        problem = ""
        if not where:
            problem = f"{r.where}: no node type has {_show(r.bundle)}"
        elif r.gang:
            room = sum(per_node(r.bundle, t.resources) * t.max_workers for t in where)
            if room < r.count:
                problem = f"{r.where}: {r.count} workers of {_show(r.bundle)} start together, the cluster holds {room}"
        rows.append((r, [t.name for t in where], problem))
    return rows


def problems(cfg: Config, cluster: dict, source: str = "cluster.yaml") -> list[str]:
    return [p for _, _, p in plan(cfg, node_types(cluster, source)) if p]


def _show(b: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in b.items()) + "}"
