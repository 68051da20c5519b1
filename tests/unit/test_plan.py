"""coral.plan: sizes from targets, the projection arithmetic, pools placed on cluster.yaml's cheapest
fitting node types at cluster/prices.yaml's prices, and the table; without Ray."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from coral import cluster, plan
from coral.config import load_config
from coral.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def figure(unit, units, fixed, work, actors=1.0, gpus=0.0):
    return {
        "unit": unit,
        "units": units,
        "fixed_s": fixed,
        "work_s": work,
        "parallelism": actors,
        "peak_gpus": gpus,
    }


MEASURED = {
    "catalog": figure("products", 1200, 1.0, 3.0, 4),
    "embed": figure("images", 1200, 10.0, 20.0, 1),
    "merit": figure("queries", 3000, 0.5, 2.0),
    "mine": figure("images", 1200, 0.0, 0.6),
    "annotate": figure("instances", 96, 5.0, 4.0),
    "train": figure("steps", 300, 30.0, 90.0, 2),
    "index": figure("candidates", 300, 5.0, 4.0),
    "evaluate": figure("queries", 600, 8.0, 12.0),
    "serve": figure(None, 0, 13.0, 0.0),
}


@pytest.fixture(scope="module")
def spec():
    return cluster.load(REPO / "cluster.yaml")


@pytest.fixture(scope="module")
def prices():
    return plan.prices(REPO / "cluster" / "prices.yaml")


def test_each_axis_sizes_its_stages_and_scale_the_rest():
    r = plan.ratios(MEASURED, {"size": 12_000, "steps": 600}, scale=2.0)
    assert r["catalog"] == r["embed"] == r["mine"] == r["index"] == 10
    assert r["train"] == 2 and r["merit"] == r["annotate"] == r["evaluate"] == 2
    r = plan.ratios(MEASURED, {"queries": 30_000})
    assert r["merit"] == r["evaluate"] == 10 and r["embed"] == 1  # evaluate keeps its share of the queries
    with pytest.raises(ConfigError, match="--instances"):
        plan.ratios({"embed": MEASURED["embed"]}, {"instances": 10})


def test_the_projection_keeps_start_up_and_grows_the_work():
    c = MEASURED["embed"]
    assert plan.project_s(c, 4) == 10 + 80
    assert plan.project_s(c, 4, speedup=8) == 10 + 10
    assert plan.speedup("embed", c, 8) == 8
    assert (
        plan.speedup("train", MEASURED["train"], 16) == 1
    )  # more workers: a larger batch, not a faster step
    assert plan.speedup("serve", MEASURED["serve"], 4) == 1


def test_every_node_type_of_cluster_yaml_has_a_price(spec, prices):
    hourly = plan.hourly(spec, prices, "cluster.yaml")
    assert set(hourly) == set(spec["available_node_types"]) and all(v > 0 for v in hourly.values())
    bare = {k: v for k, v in prices.items() if k != "g6.12xlarge"}
    with pytest.raises(ConfigError, match="gpu_inference.*g6.12xlarge"):
        plan.hourly(spec, bare, "cluster.yaml")


def test_a_price_table_must_map_types_to_numbers(tmp_path):
    bad = tmp_path / "prices.yaml"
    bad.write_text(yaml.safe_dump({"per_hour": {"m6i.2xlarge": "cheap"}}))
    with pytest.raises(ConfigError, match="prices.yaml: per_hour"):
        plan.prices(bad)
    with pytest.raises(ConfigError, match="not found"):
        plan.prices(tmp_path / "none.yaml")


def test_megapairs_at_scale_on_the_cluster(spec, prices):
    cfg = load_config(REPO / "workflows" / "megapairs.yaml")
    measured = {s: MEASURED[s] for s in cfg.run.stages}
    targets = {"size": 20_000_000, "instances": 26_000_000}
    rows = plan.plan(cfg, measured, plan.ratios(measured, targets), spec, prices)
    by = {r.stage: r for r in rows}
    assert [r.stage for r in rows] == [*cfg.run.stages, "head"]
    assert by["embed"].units == 20_000_000 and by["annotate"].units == 26_000_000
    # the embed pools are GPU actors: they go on the GPU inference nodes, and their GPU-hours follow
    assert set(by["embed"].nodes) == {"gpu_inference"} and by["embed"].gpu_hours > 0
    actors = plan.cost.parallelism(plan.STAGES["embed"].resources(cfg))
    assert by["embed"].wall_s == pytest.approx(10 + 20 * (20_000_000 / 1200) / actors)
    hourly = plan.hourly(spec, prices, "cluster.yaml")
    for r in rows:
        assert r.cost == pytest.approx(sum(n * hourly[t] for t, n in r.nodes.items()) * r.wall_s / 3600)
    assert by["head"].wall_s == pytest.approx(sum(r.wall_s for r in rows if r.stage != "head"))
    assert plan.dominant(rows).stage in cfg.run.stages
    header, body = plan.table(rows)
    assert body[-1][0] == "total" and len(body) == len(rows) + 1 and all(len(b) == len(header) for b in body)


def test_a_stage_missing_from_the_figures_is_said_not_guessed(spec, prices):
    cfg = load_config(REPO / "workflows" / "demo.yaml")
    measured = {k: v for k, v in MEASURED.items() if k != "annotate"}
    rows = plan.plan(cfg, measured, plan.ratios(measured, {}), spec, prices)
    missing = next(r for r in rows if r.stage == "annotate")
    assert missing.wall_s == 0 and "no figure" in missing.note


def test_durations_read_as_a_person_would():
    assert [plan.duration(s) for s in (42, 750, 11_520, 400_000)] == ["42 s", "12.5 min", "3.2 h", "4.6 d"]
