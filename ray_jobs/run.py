"""Run the job graph.

    python -m ray_jobs.run --config workflows/demo.yaml [--overlay FILE ...] [--from STAGE] [--until STAGE]
        [--serve-forever] [key.path=value ...]
    python -m ray_jobs.run --config workflows/megapairs.yaml --overlay workflows/overlays/local.yaml   # in miniature
    ray job submit --working-dir . -- python -m ray_jobs.run --config workflows/<name>.yaml

Exit codes: 0 done, 1 a stage failed (named, its traceback in {run_root}/{stage}/error.log), 2 bad input
(config, storage), 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from coral import graph
from coral.config import load_config
from coral.errors import ConfigError, UserInputError
from coral.stages.evaluate import summary_table


def main(argv: list[str] | None = None, prog: str = "python -m ray_jobs.run") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument(
        "--config",
        required=True,
        help="workflow YAML, e.g. workflows/demo.yaml; a path that does not exist names a shipped one "
        "(demo, megapairs, merit, ci_small: coral.shipped)",
    )
    p.add_argument(
        "--overlay",
        action="append",
        default=[],
        help="a YAML merged over the config (repeatable), e.g. workflows/overlays/local.yaml (shipped: local): "
        "any workflow on this machine",
    )
    p.add_argument("--from", dest="start", help="rerun from this stage on (earlier stages must be complete)")
    p.add_argument("--until", help="stop after this stage")
    p.add_argument("--serve-forever", action="store_true", help="the serve stage keeps serving until Ctrl-C")
    p.add_argument("overrides", nargs="*", help="key.path=value, e.g. catalog.num_groups=10")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started, rows = time.time(), []
    try:
        config = load_config(
            args.config,
            [*args.overrides, *(["serve.forever=true"] if args.serve_forever else [])],
            args.overlay,
        )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    try:
        graph.run_graph(config, args.start, args.until, summary=rows)
        return 0
    except ConfigError as e:
        print(f"error: {args.config}: {e}", file=sys.stderr)
        return 2
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except graph.StageFailed as e:
        print(f"error: {e}", file=sys.stderr)
        if e.log:
            print(f"full traceback: {e.log}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "interrupted: run the same command again to resume after the last completed stage",
            file=sys.stderr,
        )
        return 130
    finally:
        if rows:
            print(f"\nrun '{config.run.name}' at {config.run.run_root} ({time.time() - started:.1f} s)")
            print(graph.format_summary(rows))
            if any(r.stage == "evaluate" for r in rows):
                table = summary_table(config)
                if table:
                    print(f"\nheld-out retrieval ({config.run.run_root}/evaluate/metrics.json):\n{table}")


if __name__ == "__main__":
    sys.exit(main())
