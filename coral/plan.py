"""A scale plan: what a workflow would take, stage by stage, at a target size on the node types of a
cluster launcher config, projected from the per-stage costs a measured run wrote (``coral.cost``).

A stage's measured wall time is a fixed part (start-up) and a part that grows with its units (images,
queries, instances, steps). At the target: ``fixed + work x (target units / measured units) x (measured
actors / target actors)``, where actors is the mean actor count of the stage's pools (``cost.parallelism``).
Train grows with its steps at the step time it measured (more workers make a larger global batch, not a
faster step); serve is fixed (it starts an endpoint). Each pool of the target workflow goes on the
cheapest node type that holds its actor's resources, as many nodes as its actors need; a stage costs
those nodes for its projected time, and the head node costs the whole run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from coral import cluster, cost, manifest, storage
from coral.config import Config
from coral.errors import ConfigError
from coral.stages.registry import STAGES

# the target sizes a user gives, and the stages that grow with each
AXES = {
    "size": ("catalog", "embed", "mine", "index"),  # images (MegaPairs) or products (MERIT)
    "queries": ("merit", "import_triplets", "evaluate"),
    "instances": ("annotate",),
    "steps": ("train",),
}
AXIS = {stage: axis for axis, stages in AXES.items() for stage in stages}
# whose measured units a target of that axis is divided by, first present
DEFINES = {
    "size": ("catalog", "embed"),
    "queries": ("merit", "import_triplets"),
    "instances": ("annotate",),
    "steps": ("train",),
}


@dataclass
class Row:
    stage: str
    units: float = 0.0
    unit: str | None = None
    wall_s: float = 0.0
    nodes: dict[str, int] = field(default_factory=dict)
    gpu_hours: float = 0.0
    cost: float = 0.0
    per_hour: float = 0.0  # what its nodes cost per hour (serve: while it serves)
    figure: str = ""  # the measured figure it came from
    note: str = ""


def measured_run(root: storage.Location) -> dict[str, dict]:
    """The ``cost`` of every completed stage under a run root, by stage."""
    out = {}
    for name in STAGES:
        m = manifest.read_complete(root.child(name))
        if m is not None and "cost" in m:
            out[name] = m["cost"]
    if not out:
        raise ConfigError(f"{root.uri}: no completed stage with a cost (a run of this version writes them)")
    return out


def ratios(measured: dict[str, dict], targets: dict[str, float], scale: float = 1.0) -> dict[str, float]:
    """Per measured stage: target units / measured units. A stage whose axis has a target is sized by it
    (against the units of the stage that defines that axis); any other by ``scale``."""
    base = {}
    for axis in targets:
        base[axis] = next(
            (measured[d]["units"] for d in DEFINES[axis] if measured.get(d, {}).get("units")), 0
        )
        if not base[axis]:
            flag = "--images/--products" if axis == "size" else f"--{axis}"
            raise ConfigError(f"{flag}: the figures have none of {', '.join(DEFINES[axis])} to size it from")
    # a stage of an axis that does not define it keeps its measured share (evaluate: the held-out
    # queries of all the queries)
    return {s: targets[AXIS[s]] / base[AXIS[s]] if AXIS.get(s) in targets else scale for s in measured}


def project_s(c: dict, ratio: float, speedup: float = 1.0) -> float:
    """A stage's wall time with ``ratio`` times its units and ``speedup`` times its actors."""
    return c["fixed_s"] + c["work_s"] * ratio / speedup


def speedup(stage: str, c: dict, target_actors: float) -> float:
    if stage == "train" or not c.get("unit") or not c.get("parallelism"):
        return 1.0
    return target_actors / c["parallelism"]


def prices(path: str | Path) -> dict[str, float]:
    """The price table: instance type (or node type) -> price per hour."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: price table not found") from None
    table = (raw or {}).get("per_hour")
    if not isinstance(table, dict) or not all(isinstance(v, int | float) for v in table.values()):
        raise ConfigError(f"{path}: per_hour must map each instance type to a price per hour")
    return {str(k): float(v) for k, v in table.items()}


def hourly(spec: dict, table: dict[str, float], source: str) -> dict[str, float]:
    """Per node type of the cluster config: its price per hour, looked up by its instance type (AWS's
    ``InstanceType``, GCP's ``machineType``, Azure's ``azure_arm_parameters.vmSize``) or its own name."""
    out = {}
    for name, t in spec["available_node_types"].items():
        nc = t.get("node_config") or {}
        kind = (
            nc.get("InstanceType")
            or nc.get("machineType")
            or nc.get("azure_arm_parameters", {}).get("vmSize")
        )
        for key in (kind, name):
            if key in table:
                out[name] = table[key]
                break
        else:
            raise ConfigError(f"{source}: no price for node type {name!r} ({kind or 'no instance type'})")
    return out


def asks(cfg: Config, stage: str) -> list[tuple[str, dict[str, float], int]]:
    """(key, one actor's bundle, actors) per pool of a stage: what ``check-cluster`` places (a vLLM
    engine's GPUs from its parallelism), else the stage's declared resources (evaluate: the index's)."""
    found = [(r.where, r.bundle, r.count) for r in cluster.requests(cfg) if r.where.split(".")[0] == stage]
    if found:
        return found
    return [
        (
            k,
            cluster.bundle(r.num_cpus, r.num_gpus, r.accelerator_type, getattr(r, "resources", None)),
            r.num_actors,
        )
        for k, r in STAGES[stage].resources(cfg).items()
    ]


def place(pools: list, types: list[cluster.NodeType], price: dict[str, float], head: str):
    """Nodes per node type for a stage's pools (each on its cheapest fitting type), GPUs, and problems."""
    nodes: dict[str, int] = {}
    gpus, problems = 0.0, []
    for key, b, count in pools:
        fit = [t for t in types if t.name != head and cluster.per_node(b, t.resources) > 0]
        if not fit:
            problems.append(f"{key}: no node type holds {b}")
            continue
        best = min(fit, key=lambda t: price[t.name] / cluster.per_node(b, t.resources))
        nodes[best.name] = nodes.get(best.name, 0) + math.ceil(count / cluster.per_node(b, best.resources))
        if nodes[best.name] > best.max_workers:
            problems.append(
                f"{key}: needs {nodes[best.name]} {best.name}, cluster.yaml allows {best.max_workers}"
            )
        gpus += count * b.get("GPU", 0.0)
    return nodes, gpus, problems


def describe(c: dict) -> str:
    """``8.1 s + 3.2 s per 24 products, 2 actors``: the measured figure a row stands on."""
    if not c.get("unit"):
        return f"{c['fixed_s']:.1f} s, fixed"
    n = c["parallelism"]
    actors = f"{n:g} actor{'s' if n != 1 else ''}"
    return f"{c['fixed_s']:.1f} s + {c['work_s']:.1f} s per {c['units']:,} {c['unit']}, {actors}"


def plan(
    cfg: Config,
    measured: dict[str, dict],
    ratio: dict[str, float],
    spec: dict,
    price_table: dict[str, float],
    source: str = "cluster.yaml",
) -> list[Row]:
    """Per stage of ``cfg.run.stages``: its projected time, nodes, GPU-hours and cost; then the head."""
    types = cluster.node_types(spec, source)
    price = hourly(spec, price_table, source)
    head = spec["head_node_type"]
    rows = []
    for stage in cfg.run.stages:
        c = measured.get(stage)
        if c is None:
            rows.append(Row(stage, note="no figure: the measured run has no such stage"))
            continue
        pools = STAGES[stage].resources(cfg)
        wall = project_s(c, ratio[stage], speedup(stage, c, cost.parallelism(pools)))
        nodes, gpus, problems = place(asks(cfg, stage), types, price, head)
        per_hour = sum(n * price[t] for t, n in nodes.items())
        note = "; ".join(problems) or ("in the driver, on the head node" if not pools else "")
        if stage == "serve":
            note = f"start-up; then {per_hour:.2f}/h while it serves"
        rows.append(
            Row(
                stage,
                c["units"] * ratio[stage] if c.get("unit") else 0,
                c.get("unit"),
                wall,
                nodes,
                gpus * wall / 3600,
                per_hour * wall / 3600,
                per_hour,
                describe(c),
                note,
            )
        )
    total = sum(r.wall_s for r in rows)
    rows.append(
        Row("head", wall_s=total, nodes={head: 1}, cost=price[head] * total / 3600, per_hour=price[head])
    )
    return rows


def duration(s: float) -> str:
    """``42 s``, ``12.5 min``, ``3.2 h``, ``4.1 d``."""
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h" if s < 172800 else f"{s / 86400:.1f} d"


def table(rows: list[Row]) -> tuple[list[str], list[list]]:
    header = ["stage", "units", "wall", "nodes", "GPU-h", "cost", "measured figure", "note"]
    body = [
        [
            r.stage,
            f"{r.units:,.0f} {r.unit}" if r.unit else "",
            duration(r.wall_s) if r.wall_s or not r.note else "-",
            ", ".join(f"{n} x {t}" for t, n in r.nodes.items()),
            f"{r.gpu_hours:,.1f}",
            f"{r.cost:,.2f}",
            r.figure,
            r.note,
        ]
        for r in rows
    ]
    stages = [r for r in rows if r.stage != "head"]
    body.append(
        [
            "total",
            "",
            duration(sum(r.wall_s for r in stages)),
            "",
            f"{sum(r.gpu_hours for r in rows):,.1f}",
            f"{sum(r.cost for r in rows):,.2f}",
            "",
            "",
        ]
    )
    return header, body


def dominant(rows: list[Row]) -> Row:
    """The stage that costs most (then takes longest)."""
    return max((r for r in rows if r.stage != "head"), key=lambda r: (r.cost, r.wall_s))
