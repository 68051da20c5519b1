"""``pip install .`` as a user gets it: a wheel built from the source, installed (not editable) into a fresh
venv and run from a folder that is not the checkout: ``coral --help``, ``coral --version``, the shipped
files, and the shipped demo workflow up to its first stage.

The venv borrows this one's dependencies (a .pth file naming its site-packages, so nothing is downloaded)
and holds the wheel's coral alone: the checkout is neither on its path nor the current folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# what the build reads: pyproject.toml names README.md and picks up LICENSE; the packages hold the rest
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "coral", "ray_jobs")

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(300)]


def run(args: list, cwd: Path, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert r.returncode == 0, f"{args}: exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path, dict]:
    """(the venv, a folder to run in, the environment): the wheel of a copy of the source, installed."""
    tmp = tmp_path_factory.mktemp("package")
    src, dist, venv, work = tmp / "src", tmp / "dist", tmp / "venv", tmp / "work"
    src.mkdir()
    for name in SOURCES:  # a copy, so the build's build/ and egg-info stay out of the checkout
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip"]
    run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", dist, "."], cwd=src)
    (wheel,) = dist.glob("*.whl")
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
    python = venv / "bin" / "python"
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp)
    deps = Path(sysconfig.get_paths()["purelib"])  # this venv's site-packages: the dependencies
    (Path(site.stdout.strip()) / "coral_test_dependencies.pth").write_text(f"{deps}\n")
    run([*pip, "--python", python, "install", "--no-deps", "--no-index", "-q", wheel], cwd=tmp)
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS", "VIRTUAL_ENV")}
    env.update(
        PATH=f"{venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}",
        HF_HUB_OFFLINE="1",
        RAY_USAGE_STATS_ENABLED="0",
        TOKENIZERS_PARALLELISM="false",
    )
    return venv, work, env


def test_help_and_version(installed):
    venv, work, env = installed
    out = run([venv / "bin" / "coral", "--help"], cwd=work, env=env).stdout
    for command in ("run", "serve", "check-cluster", "build-tiny-models"):
        assert command in out
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert run([venv / "bin" / "coral", "--version"], cwd=work, env=env).stdout == f"coral {version}\n"


def test_the_installed_package_carries_its_files(installed):
    venv, work, env = installed
    probe = (
        "import json, coral, ray_jobs.cli; from coral import shipped; from coral.annotate import prompts; "
        "from coral.config import load_config; cfg = load_config('demo.yaml'); "
        "print(json.dumps({'coral': coral.__file__, 'cli': ray_jobs.cli.__file__, "
        "'deepspeed': str(shipped.deepspeed(cfg.train.deepspeed)), 'workflows': shipped.names(), "
        "'demonstrations': len(prompts.demonstrations())}))"
    )
    found = json.loads(run([venv / "bin" / "python", "-c", probe], cwd=work, env=env).stdout)
    for key in ("coral", "cli", "deepspeed"):
        path = Path(found[key]).resolve()
        assert path.is_relative_to(venv.resolve()) and not path.is_relative_to(REPO), (key, path)
    assert found["deepspeed"].endswith("coral/data/deepspeed/zero2.json")
    assert {"demo.yaml", "megapairs.yaml", "merit.yaml", "overlays/local.yaml"} <= set(found["workflows"])
    assert found["demonstrations"] > 0


def test_the_shipped_demo_runs_its_first_stage_from_another_folder(installed):
    venv, work, env = installed
    root = work / "run"
    r = run(
        [
            venv / "bin" / "coral",
            "run",
            "--config",
            "demo.yaml",
            "--until",
            "catalog",
            f"run.run_root={root}",
            "catalog.num_groups=20",
            "ray.include_dashboard=false",
        ],
        cwd=work,
        env=env,
        timeout=180,
    )
    assert (root / "catalog" / "_SUCCESS").exists(), r.stdout[-2000:] + r.stderr[-2000:]
    manifest = json.loads((root / "catalog" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["stage"] == "catalog", manifest
    assert not (root / "embed").exists()
