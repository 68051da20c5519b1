"""The project's Dockerfile read as (INSTRUCTION, arguments) steps, for the tests of the cluster files."""

from __future__ import annotations

from pathlib import Path

DOCKERFILE = Path(__file__).resolve().parents[1] / "cluster" / "Dockerfile"


def steps(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comment lines dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            instruction, _, rest = pending.strip().partition(" ")
            out.append((instruction.upper(), rest.strip()))
        pending = ""
    return out


def base_images(path: Path = DOCKERFILE) -> list[str]:
    """The images of the FROM lines."""
    return [args.split()[0] for instruction, args in steps(path) if instruction == "FROM"]
