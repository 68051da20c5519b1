"""``ray_jobs.run.main`` when a stage fails: exit 1, the stage's error, and where its traceback is."""

from coral import graph, ray_runtime
from ray_jobs import run
from tests.unit.test_graph import Fake


def test_a_failed_stage_prints_its_error_and_the_path_of_its_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(graph, "STAGES", {"a": Fake("a"), "b": Fake("b", ("a",), fail=True)})
    monkeypatch.setattr(ray_runtime, "connect", lambda cfg: "none")
    config = tmp_path / "workflow.yaml"
    config.write_text("run:\n  stages: [a, b]\n")
    root = tmp_path / "run"
    assert run.main(["--config", str(config), f"run.run_root={root}"]) == 1
    err = capsys.readouterr().err.splitlines()
    log = root / "b" / "error.log"
    assert err[0] == "error: stage 'b' failed: ValueError: bad row 7"
    assert err[1] == f"full traceback: {log}"
    assert "Traceback (most recent call last)" in log.read_text()
