"""The code's shape, checked: the layering itself is import-linter's (``lint-imports`` in ``make test``,
contracts in pyproject.toml); here, what it cannot see."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("coral", "ray_jobs", "benchmarks")
MAX_LINES = 400
SOURCES = sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def local_imports(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every import of a project module inside a function body."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if in_function and isinstance(child, ast.Import | ast.ImportFrom):
                names = (
                    [child.module or ""]
                    if isinstance(child, ast.ImportFrom)
                    else [a.name for a in child.names]
                )
                if getattr(child, "level", 0) or any(n.split(".")[0] in PACKAGES for n in names):
                    found.extend((child.lineno, n) for n in names)
            visit(child, in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef))

    visit(tree, False)
    return found


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_function_local_import_of_a_project_module(path):
    """Coupling shows at the top of a module: a project module is never imported inside a function
    (only third-party heavy or optional dependencies are: torch in a worker, vllm, faiss-gpu)."""
    assert local_imports(ast.parse(path.read_text())) == []


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_module_over_400_lines(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


def test_the_check_sees_a_local_import():
    tree = ast.parse("import os\n\ndef f():\n    from coral import storage\n    import json\n")
    assert local_imports(tree) == [(4, "coral")]
