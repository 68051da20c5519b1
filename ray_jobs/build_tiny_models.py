"""Build the tiny offline models (seeded, random init, local tokenizers) as Hugging Face dirs.

python -m ray_jobs.build_tiny_models [--out models/tiny] [--force]
"""

from __future__ import annotations

import argparse
import logging

from coral.testing import corpus
from coral.testing.tiny import TINY_MODELS, build_all


def main(argv: list[str] | None = None, prog: str = "python -m ray_jobs.build_tiny_models") -> int:
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("--out", default="models/tiny")
    p.add_argument("--force", action="store_true", help="rebuild even if complete")
    p.add_argument("--only", nargs="*", choices=TINY_MODELS, default=list(TINY_MODELS))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name, path in build_all(args.out, tuple(args.only), args.force, corpus=corpus.project()).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
