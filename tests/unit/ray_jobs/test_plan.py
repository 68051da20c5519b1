"""ray_jobs.plan: a run's manifests (or a stage-cost file) in, a priced plan on cluster.yaml out."""

from __future__ import annotations

import json
from pathlib import Path

from coral import manifest, storage
from ray_jobs import plan

REPO = Path(__file__).resolve().parents[3]
STAGES = {
    "catalog": ("products", 1200, 1.0, 3.0),
    "embed": ("images", 1200, 10.0, 20.0),
    "import_triplets": ("queries", 2000, 0.2, 1.0),
    "mine": ("images", 1200, 0.0, 0.6),
    "annotate": ("instances", 96, 5.0, 4.0),
    "train": ("steps", 300, 30.0, 90.0),
    "index": ("candidates", 300, 5.0, 4.0),
    "evaluate": ("queries", 600, 8.0, 12.0),
    "serve": (None, 0, 13.0, 0.0),
}


def cost(unit, units, fixed, work) -> dict:
    return {
        "unit": unit,
        "units": units,
        "fixed_s": fixed,
        "work_s": work,
        "parallelism": 1.0,
        "peak_gpus": 0,
    }


def run_root(tmp_path: Path) -> Path:
    root = tmp_path / "run"
    for stage, figure in STAGES.items():
        m = {"stage": stage, "status": "complete", "cost": cost(*figure)}
        manifest.write_complete(storage.resolve(str(root / stage)), m)
    return root


def main(*argv: str) -> int:
    return plan.main(
        ["--cluster", str(REPO / "cluster.yaml"), "--prices", str(REPO / "cluster/prices.yaml"), *argv]
    )


def test_a_plan_from_a_runs_manifests(tmp_path, capsys):
    root = run_root(tmp_path)
    config = str(REPO / "workflows" / "merit.yaml")
    assert (
        main("--config", config, "--from-run", str(root), "--products", "135000", "--queries", "320000") == 0
    )
    out = capsys.readouterr().out
    assert "size=135,000, queries=320,000" in out and f"figures: the manifests under {root}" in out
    assert "a projection from CPU figures" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line and line.split()[0] in STAGES}
    assert "135,000 products" in lines["catalog"] and "320,000 queries" in lines["import_triplets"]
    assert out.splitlines()[-1].startswith("dominant stage: ")


def test_a_stage_cost_file_and_markdown(tmp_path, capsys):
    figures = tmp_path / "stage_costs.json"
    stages = {s: cost(*f) for s, f in STAGES.items()}
    figures.write_text(json.dumps({"workflow": "demo", "size": "1x", "date": "today", "stages": stages}))
    config = str(REPO / "workflows" / "megapairs.yaml")
    assert main("--config", config, "--figures", str(figures), "--images", "2e7", "--markdown") == 0
    out = capsys.readouterr().out
    assert f"figures: {figures} (demo at 1x, today)" in out
    assert "| stage | units | wall |" in out and "| 20,000,000 images |" in out


def test_no_figures_is_an_error_that_says_how_to_get_them(tmp_path, capsys):
    config = str(REPO / "workflows" / "demo.yaml")
    assert main("--config", config, "--figures", str(tmp_path / "none.json")) == 2
    assert "--from-run RUN_ROOT" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main("--config", config, "--from-run", str(tmp_path / "empty")) == 2
    assert "no completed stage with a cost" in capsys.readouterr().err
