"""What the code imports is what pyproject.toml declares, and the requirements files repeat pyproject's pins:
requirements.txt the run-time set (dependencies and the `cpu` extra), requirements-dev.txt the `dev` tools."""

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
EXTRAS = PROJECT["optional-dependencies"]
# modules of optional dependencies that are not installed here, so their distribution can't be looked up
OPTIONAL = {"vllm": "vllm", "mlflow": "mlflow"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def names(requirements: list[str]) -> set[str]:
    return {norm(Requirement(r).name) for r in requirements}


def imported_modules(*packages: str) -> set[str]:
    """Top-level names of every third-party module imported anywhere in ``packages`` (local imports too)."""
    found = set()
    for path in (p for pkg in packages for p in (REPO / pkg).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"coral", "ray_jobs", "__future__"}


def distribution(module: str) -> str:
    if module in OPTIONAL:
        return OPTIONAL[module]
    dists = importlib.metadata.packages_distributions().get(module)
    assert dists, f"no installed distribution provides the module {module}"
    return norm(dists[0])


def requirement_lines(path: Path) -> list[str]:
    lines = [x.split("#")[0].strip() for x in path.read_text().splitlines()]
    return [x for x in lines if x and not x.startswith("-r")]


def test_every_module_the_code_imports_is_declared():
    runtime = names(PROJECT["dependencies"]) | names([*EXTRAS["cpu"], *EXTRAS["gpu"], *EXTRAS["mlflow"]])
    runtime.add("vllm")  # through the vllm extra, ray[llm]: Ray's own vLLM pin
    assert [Requirement(r).extras for r in EXTRAS["vllm"]] == [{"llm"}]
    missing = {
        m: distribution(m)
        for m in imported_modules("coral", "ray_jobs")
        if distribution(m) not in runtime | {"faiss-cpu", "faiss-gpu"}
    }
    assert not missing, f"imported but not in pyproject.toml's dependencies: {missing}"


def test_the_test_tools_are_not_run_time_dependencies():
    dev = names(EXTRAS["dev"])
    assert not dev & names(PROJECT["dependencies"])
    assert not {distribution(m) for m in imported_modules("coral", "ray_jobs")} & dev


def test_faiss_is_an_extra_one_build_at_a_time():
    assert not {"faiss-cpu", "faiss-gpu"} & names(PROJECT["dependencies"])
    assert names(EXTRAS["cpu"]) == {"faiss-cpu"} and names(EXTRAS["gpu"]) == {"faiss-gpu"}


def test_requirements_files_repeat_the_pyproject_pins():
    runtime = [*PROJECT["dependencies"], *EXTRAS["cpu"]]
    assert {str(Requirement(r)) for r in requirement_lines(REPO / "requirements.txt")} == {
        str(Requirement(r)) for r in runtime
    }
    assert requirement_lines(REPO / "requirements.txt")[0].startswith("torch=="), "torch first"
    assert {str(Requirement(r)) for r in requirement_lines(REPO / "requirements-dev.txt")} == {
        str(Requirement(r)) for r in EXTRAS["dev"]
    }
