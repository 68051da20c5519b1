"""Serve a finished run's retriever over HTTP, outside the graph.

    python -m ray_jobs.serve --run-root runs/demo [--config workflows/demo.yaml] [key.path=value ...]
    python -m ray_jobs.serve --run-root runs/demo --write-config serve.yaml   # for serve run / serve deploy

Binds serve.host (127.0.0.1 unless configured) on serve.port; with the environment variable named by
serve.token_env set (CORAL_SERVE_TOKEN), every route but /healthz needs that bearer token, and any host
but a loopback address refuses to start without it (unless serve.allow_unauthenticated: true). Serves
until interrupted. Exit codes: 0 stopped, 2 bad input (config, a missing index, a mismatched checkpoint).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import yaml

from coral import ray_runtime
from coral.config import load_config
from coral.errors import UserInputError
from coral.serve import deploy
from coral.serve.http import token_of


def main(argv: list[str] | None = None, prog: str = "python -m ray_jobs.serve") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[1])
    p.add_argument("--run-root", required=True, help="the run whose index (and checkpoint) to serve")
    p.add_argument("--config", help="the workflow YAML the run used (defaults otherwise)")
    p.add_argument("--write-config", metavar="FILE", help="write a Serve config YAML and exit")
    p.add_argument("overrides", nargs="*", help="key.path=value, e.g. serve.port=8080")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = [*args.overrides, f"run.run_root={args.run_root}"]
    try:
        config = load_config(args.config, overrides)
        token_of(config.serve)  # a public host without a token: exit 2 before Ray starts

        if args.write_config:
            body = deploy.serve_config(config.serve, args.config, overrides)
            with open(args.write_config, "w") as f:
                yaml.safe_dump(body, f, sort_keys=False)
            print(f"wrote {args.write_config}: serve run {args.write_config}")
            return 0
        ray_runtime.connect(config.ray)
        url = deploy.start(config)
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    direct = deploy.direct_url(config.serve)
    print(f"serving {args.run_root} at {url} (OpenAPI docs: {url}/docs); Ctrl-C stops")
    if direct:
        print(f"  and straight into the ingress replica at {direct} (one hop fewer)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        deploy.stop(config)
        return 0


if __name__ == "__main__":
    sys.exit(main())
