"""Check a workflow against a cluster launcher config before ``ray up`` / ``ray job submit``: Ray's own
validation of the cluster file, then every actor pool, train worker group and Serve deployment of the
workflow's stages placed on a node type.

python -m ray_jobs.check_cluster --cluster cluster.yaml --config workflows/megapairs.yaml [key=value ...]
"""

from __future__ import annotations

import argparse
import sys

from coral import cluster
from coral.config import load_config
from coral.errors import ConfigError


def main(argv: list[str] | None = None, prog: str = "python -m ray_jobs.check_cluster") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument("--cluster", default="cluster.yaml")
    p.add_argument("--config", required=True, help="the workflow YAML")
    p.add_argument("overrides", nargs="*", help="key.path=value, as for ray_jobs.run")
    args = p.parse_args(argv)
    try:
        spec = cluster.load(args.cluster)
        cfg = load_config(args.config, args.overrides)
        rows = cluster.plan(cfg, cluster.node_types(spec, args.cluster))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r, where, problem in rows:
        shape = ", ".join(f"{k}: {v:g}" for k, v in r.bundle.items())
        print(f"{r.where:28s} {r.count:3d} x {{{shape}}}  ->  {problem or ', '.join(where)}")
    bad = [p for _, _, p in rows if p]
    print(f"{args.config}: {'fits' if not bad else f'{len(bad)} request(s) do not fit'} {args.cluster}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
