"""The README's two commands against their time budgets, on this machine, after install (a venv and the
tiny models present): ``make demo`` (the whole demo graph, 4 minutes) and ``make test`` (15 minutes).

Each runs as the Makefile runs it, in a subprocess: ``coral run --config workflows/demo.yaml`` into a
fresh run root, and ``python -m pytest`` over the whole suite (lint excluded: seconds). Figure: seconds,
ratio = seconds / budget (goal <= 1). ``make test`` takes its full quarter of an hour, so it runs only
with ``--test`` (``make bench`` passes it when ``BENCH_MAKE_TEST=1``).

    python -m benchmarks.bench_commands [--test]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import timed, write_result

REPO = Path(__file__).resolve().parent.parent
BUDGET_S = {"make_demo": 240.0, "make_test": 900.0}


def run(cmd: list[str], limit_s: float) -> None:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.pop("RAY_ADDRESS", None)  # a Ray of its own, as a fresh `make demo` starts
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=limit_s)
    if out.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd[:4])} exited {out.returncode}:\n{out.stdout[-2000:]}{out.stderr[-2000:]}"
        )
    print(out.stdout[-3000:], flush=True)  # the suite's slowest tests and its summary


def measure(name: str, cmd: list[str], what: str) -> dict:
    budget = BUDGET_S[name]
    seconds, _ = timed(run, cmd, 3 * budget)
    return write_result(
        name,
        value=seconds,
        unit=f"seconds: {what}",
        baseline={"what": "its budget in seconds", "value": budget},
        goal={
            "bar": 1.0,
            "direction": "lower",
            "meaning": f"within {budget / 60:.0f} minutes on this machine",
        },
        command=" ".join(cmd[1:] if cmd[0] == sys.executable else cmd),
    )


def main(test: bool | None = None) -> list[dict]:
    if test is None:
        test = os.environ.get("BENCH_MAKE_TEST") == "1"
    out = []
    if test:  # first: the suite checks that the published tables are the results, before the demo's changes
        suite = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=25"]
        out.append(measure("make_test", suite, "the whole test suite (make test less lint)"))
    with tempfile.TemporaryDirectory() as tmp:
        demo = [
            sys.executable,
            "-m",
            "ray_jobs.run",
            "--config",
            "workflows/demo.yaml",
            f"run.run_root={tmp}/demo",
        ]
        out.append(measure("make_demo", demo, "the demo graph after install (make demo less its set-up)"))
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_commands")
    p.add_argument("--test", action="store_true", help="also time the whole test suite (15 minutes)")
    main(p.parse_args().test or None)
