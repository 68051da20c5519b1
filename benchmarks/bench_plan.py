"""The scale plan against a measured run: the demo workflow at a quarter of its size, a projection of the
full demo from those manifests (``coral.plan``), then the full demo. Figure: the largest per-stage error
of the projection (|projected - took| / took), against the baseline of scaling each stage's whole wall
time by 4 (no start-up kept apart), both on the same two runs. The full run's per-stage costs are kept
in the result as ``stages``: the figures ``python -m ray_jobs.plan`` uses by default."""

from __future__ import annotations

import tempfile

from benchmarks.common import PeakRSS, free_port, write_result
from coral import graph, manifest, plan, storage
from coral.config import load_config

SCALE = 4
QUARTER = [
    "catalog.num_groups=100",
    "merit.queries={train: 750, test: 150}",
    "annotate.max_pairs=12",
    "train.steps=75",
    "train.checkpoint_every=25",  # the demo checkpoints every 100 of 300 steps: 3 checkpoints at each size
]


def costs(root: str, stages) -> dict[str, dict]:
    return {s: manifest.read_complete(storage.resolve(f"{root}/{s}"))["cost"] for s in stages}


def main() -> dict:
    with tempfile.TemporaryDirectory() as tmp, PeakRSS() as mem:
        small = load_config(
            "workflows/demo.yaml", [f"run.run_root={tmp}/quarter", f"serve.port={free_port()}", *QUARTER]
        )
        graph.run_graph(small)
        measured = costs(f"{tmp}/quarter", small.run.stages)
        full = load_config("workflows/demo.yaml", [f"run.run_root={tmp}/full", f"serve.port={free_port()}"])
        graph.run_graph(full)
        took = costs(f"{tmp}/full", full.run.stages)
    ratio = plan.ratios(measured, {}, scale=SCALE)
    stages = {}
    for s, c in measured.items():
        projected, naive = plan.project_s(c, ratio[s]), c["wall_s"] * (SCALE if c["unit"] else 1)
        stages[s] = {
            "quarter_s": c["wall_s"],
            "quarter_fixed_s": c["fixed_s"],
            "projected_s": round(projected, 2),
            "naive_s": round(naive, 2),
            "took_s": took[s]["wall_s"],
            "error": round(abs(projected - took[s]["wall_s"]) / took[s]["wall_s"], 3),
            "naive_error": round(abs(naive - took[s]["wall_s"]) / took[s]["wall_s"], 3),
        }
    worst = max(v["error"] for v in stages.values())
    return write_result(
        "plan_projection",
        value=worst,
        unit="largest per-stage error of the projected wall time (demo at 4x from a quarter-size demo)",
        baseline={
            "what": "each stage's whole wall time x4 (no fixed start-up kept apart), same runs",
            "value": max(v["naive_error"] for v in stages.values()),
        },
        goal={"bar": 0.3, "direction": "lower", "meaning": "every stage within 30% of what it took"},
        goal_on="value",
        workflow="demo",
        size="demo.yaml as shipped (1,200 products, 3,600 MERIT queries, 48 pairs per split, 300 steps)",
        projection=stages,
        stages=took,
        peak_rss_gib=mem.peak_gib,
    )


if __name__ == "__main__":
    main()
