"""The ``coral`` command (pyproject's console script): one subcommand per entry point of ``ray_jobs``.

    coral run --config demo.yaml [--overlay local] [--from STAGE] [--until STAGE] [key.path=value ...]
    coral serve --run-root runs/demo [--config demo.yaml] [key.path=value ...]
    coral check-cluster --cluster cluster.yaml --config megapairs.yaml [key.path=value ...]
    coral plan --config megapairs.yaml --images 20000000 [--from-run runs/demo] [key.path=value ...]
    coral build-tiny-models [--out models/tiny] [--force]
    coral --version

Each subcommand hands its arguments unchanged to that module's ``main`` (``coral run ...`` is
``python -m ray_jobs.run ...``; ``coral run --help`` lists them), and exits with its exit code. A
``--config`` or ``--overlay`` path that does not exist names a workflow shipped with the package (``demo``,
``workflows/demo.yaml``, ``local``: ``coral.shipped``), so an installed ``coral`` runs them from any
folder. A subcommand's module is imported only when it runs (importlib), so ``coral --help`` and
``coral --version`` load neither torch nor Ray.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys

DISTRIBUTION = "coral-retrieval"
# subcommand -> (the module whose main it runs, the one-line help)
COMMANDS = {
    "run": ("ray_jobs.run", "run the job graph of a workflow (resumable; --until STAGE stops early)"),
    "serve": ("ray_jobs.serve", "serve a finished run's retriever over HTTP"),
    "check-cluster": ("ray_jobs.check_cluster", "check a workflow against a cluster launcher config"),
    "plan": ("ray_jobs.plan", "project a workflow's time and cost at a target size on a cluster"),
    "build-tiny-models": ("ray_jobs.build_tiny_models", "build the tiny offline models the demo uses"),
}


def version() -> str:
    """The installed distribution's version (pyproject.toml's, once installed)."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed: pip install .)"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="coral",
        description="Multimodal retrieval data synthesis, training and serving on Ray.",
        epilog="`coral COMMAND --help` lists a command's options.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, text) in COMMANDS.items():
        command = sub.add_parser(name, help=text, description=text, add_help=False)
        command.add_argument("args", nargs=argparse.REMAINDER)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:  # everything after the command is the command's, --help too
        name, rest = argv[0], argv[1:]
    else:
        args = parser().parse_args(argv)  # --help and --version exit here, and so does a usage error
        name, rest = args.command, args.args
    module, _ = COMMANDS[name]
    try:
        command = importlib.import_module(module).main
    except ModuleNotFoundError as e:
        if e.name != "faiss":
            raise
        print(
            f"error: coral {name} needs FAISS: pip install 'coral-retrieval[cpu]' (or [gpu])",
            file=sys.stderr,
        )
        return 2
    return command(rest, prog=f"coral {name}") or 0


if __name__ == "__main__":
    sys.exit(main())
