"""Project what a workflow would take at a target size on a cluster: per stage the wall time, nodes,
GPU-hours and cost, from the per-stage costs of a measured run (``coral.plan``).

python -m ray_jobs.plan --config workflows/megapairs.yaml --images 20000000 --instances 26000000 \\
    [--from-run runs/demo | --figures benchmarks/results/plan_projection.json] \\
    [--cluster cluster.yaml] [--prices cluster/prices.yaml] [--markdown] [key.path=value ...]

Target sizes: --images (or --products: the catalog, its embeddings, mining and the index), --queries
(MERIT's or imported queries; evaluate keeps its share), --instances (annotate's training instances),
--steps (train; default the workflow's own train.steps); any stage without one grows by --scale
(default 1: as measured).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from coral import cluster as clusters
from coral import plan, report, storage
from coral.config import Config, load_config
from coral.errors import ConfigError

FIGURES = Path("benchmarks/results/plan_projection.json")  # `make bench` (benchmarks/bench_plan.py)


def figures(args, cfg: Config) -> tuple[dict[str, dict], str]:
    """The measured per-stage costs and where they came from."""
    if args.from_run:
        root = storage.resolve(args.from_run, cfg.storage)
        return plan.measured_run(root), f"the manifests under {root.uri}"
    path = Path(args.figures)
    if not path.is_file():
        raise ConfigError(f"{path}: no figures; run a workflow and pass --from-run RUN_ROOT, or `make bench`")
    data = json.loads(path.read_text())
    if not isinstance(data.get("stages"), dict):
        raise ConfigError(f"{path}: not a stage-cost file (no 'stages')")
    where = f"{path} ({data.get('workflow', '?')} at {data.get('size', '?')}, {data.get('date', 'undated')})"
    return data["stages"], where


def parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="the workflow YAML to plan")
    p.add_argument("--cluster", default="cluster.yaml")
    p.add_argument("--prices", default="cluster/prices.yaml", help="instance type -> price per hour")
    p.add_argument("--from-run", help="a run root whose manifests hold the measured costs")
    p.add_argument("--figures", default=str(FIGURES), help="or a stage-cost file (make bench)")
    p.add_argument("--images", "--products", dest="size", type=float)
    p.add_argument("--queries", type=float)
    p.add_argument("--instances", type=float)
    p.add_argument("--steps", type=float, help="default: the workflow's train.steps")
    p.add_argument("--scale", type=float, default=1.0, help="growth of the stages without a target")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("overrides", nargs="*", help="key.path=value, as for ray_jobs.run")
    return p


def build(args) -> tuple[str, list[plan.Row]]:
    """The plan's text (a heading, where the figures came from, the table, the dominant stage) and rows;
    ConfigError for a bad workflow, cluster, price table or figure source."""
    cfg = load_config(args.config, args.overrides)
    targets = {a: getattr(args, a) for a in plan.AXES if getattr(args, a) is not None}
    if "train" in cfg.run.stages:
        targets.setdefault("steps", cfg.train.steps)  # the workflow's own recipe
    spec = clusters.load(args.cluster)
    measured, source = figures(args, cfg)
    rows = plan.plan(
        cfg, measured, plan.ratios(measured, targets, args.scale), spec, plan.prices(args.prices)
    )
    sizes = ", ".join(f"{a}={v:,.0f}" for a, v in targets.items())
    lines = [
        f"{args.config} at {sizes} (others x{args.scale:g}) on {args.cluster}, prices {args.prices}",
        f"figures: {source}",
    ]
    if all(not c.get("peak_gpus") for c in measured.values()):
        lines.append(
            "a projection from CPU figures (no GPU held in the measured run): GPU stages will differ"
        )
    header, body = plan.table(rows)
    lines.append(report.markdown_table(header, body) if args.markdown else report.text_table(header, body))
    top, total = plan.dominant(rows), sum(r.cost for r in rows)
    share = f"{top.cost / total:.0%} of the cost" if total else "no priced nodes"
    lines.append(f"dominant stage: {top.stage} ({share}, {plan.duration(top.wall_s)})")
    return "\n".join(lines), rows


def main(argv: list[str] | None = None, prog: str = "python -m ray_jobs.plan") -> int:
    args = parser(prog).parse_args(argv)
    try:
        text, _ = build(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
