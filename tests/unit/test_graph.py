"""The driver's ordering, skip, rerun and failure logic, with in-process fake stages (no Ray)."""

import json
from pathlib import Path

import pyarrow as pa
import pytest

from coral import graph, ray_runtime, storage
from coral.config import Resources, load_config
from coral.errors import ConfigError, StorageError, UserInputError
from coral.manifest import StageResult
from coral.stages.registry import STAGES

REPO = Path(__file__).resolve().parents[2]


class Fake:
    def __init__(self, name, inputs=(), fail=False):
        self.name, self.needs, self.fail, self.calls = name, inputs, fail, 0

    def inputs(self, config):
        return self.needs

    def section(self, config):
        return {"seed": config.catalog.seed} if self.name == "a" else {"n": config.catalog.num_groups}

    def output(self, config):
        return None

    def resources(self, config):
        return {}

    def validate(self, config):
        if config.run.name == "invalid":
            raise ConfigError(f"{self.name}: invalid")

    def run(self, ctx):
        self.calls += 1
        if self.fail:
            raise ValueError("bad row 7")
        out = ctx.data(self.name)
        out.fs.create_dir(out.path, recursive=True)
        return StageResult(rows_in=3, rows_out=3 - self.calls % 2, rejected={"why": self.calls % 2})


@pytest.fixture
def stages(monkeypatch):
    fakes = {"a": Fake("a"), "b": Fake("b", ("a",)), "c": Fake("c", ("b",))}
    monkeypatch.setattr(graph, "STAGES", fakes)
    monkeypatch.setattr(ray_runtime, "connect", lambda cfg: "none")
    return fakes


def cfg(tmp_path, *extra):
    return load_config(None, [f"run.run_root={tmp_path / 'run'}", "run.stages=[a, b, c]", *extra])


def test_runs_in_order_then_skips_everything(tmp_path, stages):
    rows = graph.run_graph(cfg(tmp_path))
    assert [(r.stage, r.status) for r in rows] == [("a", "ran"), ("b", "ran"), ("c", "ran")]
    assert (rows[0].rows_in, rows[0].rows_out, rows[0].rows_rejected) == (3, 2, 1)
    rows = graph.run_graph(cfg(tmp_path))
    assert [r.status for r in rows] == ["skipped"] * 3
    assert [s.calls for s in stages.values()] == [1, 1, 1]
    assert rows[1].rows_out == 2  # counts come from the manifest
    for name in "abc":
        d = tmp_path / "run" / name
        assert (d / "_SUCCESS").exists() and json.loads((d / "manifest.json").read_text())[
            "status"
        ] == "complete"


def test_config_change_reruns_that_stage_and_downstream(tmp_path, stages):
    graph.run_graph(cfg(tmp_path))
    rows = graph.run_graph(cfg(tmp_path, "catalog.num_groups=5"))  # only b and c hash num_groups
    assert [r.status for r in rows] == ["skipped", "ran", "ran"]
    rows = graph.run_graph(cfg(tmp_path, "catalog.seed=9", "catalog.num_groups=5"))  # a changes -> all
    assert [r.status for r in rows] == ["ran", "ran", "ran"]


def test_from_and_until(tmp_path, stages):
    assert [r.stage for r in graph.run_graph(cfg(tmp_path), until="b")] == ["a", "b"]
    rows = graph.run_graph(cfg(tmp_path), start="b")
    assert [(r.stage, r.status) for r in rows] == [("b", "ran"), ("c", "ran")]
    assert stages["a"].calls == 1 and stages["b"].calls == 2


def test_from_needs_completed_inputs_and_writes_nothing(tmp_path, stages):
    with pytest.raises(UserInputError, match="stage 'a' is not complete"):
        graph.run_graph(cfg(tmp_path), start="b")
    assert not (tmp_path / "run").exists()


def test_validation_runs_before_anything_is_written(tmp_path, stages):
    with pytest.raises(ConfigError, match="a: invalid"):
        graph.run_graph(cfg(tmp_path, "run.name=invalid"))
    assert not (tmp_path / "run").exists() and stages["a"].calls == 0


def test_summary_collects_rows_before_a_failure(tmp_path, stages):
    stages["c"].fail = True
    rows = []
    with pytest.raises(graph.StageFailed):
        graph.run_graph(cfg(tmp_path), summary=rows)
    assert [(r.stage, r.status) for r in rows] == [("a", "ran"), ("b", "ran")]


def test_failure_names_stage_and_leaves_no_marker(tmp_path, stages):
    stages["b"].fail = True
    with pytest.raises(graph.StageFailed, match="stage 'b' failed: ValueError: bad row 7"):
        graph.run_graph(cfg(tmp_path))
    d = tmp_path / "run" / "b"
    assert not (d / "_SUCCESS").exists()
    m = json.loads((d / "manifest.json").read_text())
    assert m["status"] == "failed" and "bad row 7" in m["error"]
    stages["b"].fail = False
    rows = graph.run_graph(cfg(tmp_path))
    assert [r.status for r in rows] == ["skipped", "ran", "ran"]


def test_a_failed_stage_leaves_its_traceback_in_error_log(tmp_path, stages):
    stages["b"].fail = True
    with pytest.raises(graph.StageFailed) as e:
        graph.run_graph(cfg(tmp_path))
    log = tmp_path / "run" / "b" / "error.log"
    assert e.value.log == str(log) and str(e.value) == "stage 'b' failed: ValueError: bad row 7"
    text = log.read_text()
    assert text.startswith("stage 'b' failed at ") and "Traceback (most recent call last)" in text
    assert 'raise ValueError("bad row 7")' in text and text.rstrip().endswith("ValueError: bad row 7")
    assert json.loads((tmp_path / "run" / "b" / "manifest.json").read_text())["error_log"] == str(log)
    stages["b"].fail = False
    graph.run_graph(cfg(tmp_path))
    assert not log.exists()  # the rerun that completes starts from an empty folder


def test_a_failure_to_write_the_log_still_raises_the_stage_failure(tmp_path, stages, monkeypatch):
    stages["a"].fail = True
    real = storage.write_bytes

    def refuse(loc, data):
        if loc.path.endswith("error.log"):
            raise OSError("disk full")
        real(loc, data)

    monkeypatch.setattr(storage, "write_bytes", refuse)
    with pytest.raises(graph.StageFailed, match="bad row 7") as e:
        graph.run_graph(cfg(tmp_path))
    assert e.value.log is None
    assert json.loads((tmp_path / "run" / "a" / "manifest.json").read_text())["status"] == "failed"


def test_bad_selection_is_a_config_error(tmp_path, stages):
    with pytest.raises(ConfigError, match="unknown stage 'z'"):
        graph.select(cfg(tmp_path, "run.stages=[a, z]"))
    with pytest.raises(ConfigError, match="--from q"):
        graph.select(cfg(tmp_path), start="q")
    with pytest.raises(ConfigError, match="needs 'a' before it"):
        graph.select(cfg(tmp_path, "run.stages=[b, c]"))
    with pytest.raises(ConfigError, match="needs 'a' before it"):
        graph.select(cfg(tmp_path, "run.stages=[b, a, c]"))
    with pytest.raises(ConfigError, match="listed twice"):
        graph.select(cfg(tmp_path, "run.stages=[a, a, b]"))
    with pytest.raises(ConfigError, match="after"):
        graph.select(cfg(tmp_path), start="c", until="a")


def test_summary_table_lists_every_stage_with_its_cost_and_a_total():
    spent = {
        "cpu_s": 10.5,
        "gpu_s": 0.0,
        "peak_memory_bytes": 3 * 2**30,
        "rows_per_s": 106.7,
        "unit": "products",
    }
    rows = [
        graph.SummaryRow("catalog", "ran", 0, 240, 1, 2.25, spent),
        graph.SummaryRow("embed", "skipped", 240, 240, 0, 0.0),
    ]
    header, rule, catalog, embed, total = graph.format_summary(rows).splitlines()
    assert header.split() == [
        "stage",
        "status",
        "rows_in",
        "rows_out",
        "rejected",
        "seconds",
        "cpu_s",
        "gpu_s",
        "peak_mem",
        "rate",
    ]
    assert catalog.split() == [
        "catalog",
        "ran",
        "0",
        "240",
        "1",
        "2.2",
        "10.5",
        "0.0",
        "3.00",
        "GiB",
        "106.7",
        "products/s",
    ]
    assert embed.split()[-4:] == ["-"] * 4  # skipped: it cost nothing this run
    assert total.split() == ["total", "1", "2.2", "10.5", "0.0", "3.00", "GiB"]


def test_a_stage_that_writes_nothing_fails_with_its_top_rejection_reasons(tmp_path, stages):
    def nothing(ctx):
        return StageResult(rows_in=9, rows_out=0, rejected={"judge said no": 6, "no positive": 2, "odd": 1})

    stages["b"].run = nothing
    with pytest.raises(graph.StageFailed) as e:
        graph.run_graph(cfg(tmp_path))
    assert "stage 'b' failed: EmptyOutput: b wrote 0 rows (9 in)" in str(e.value)
    assert "6 x judge said no; 2 x no positive; 1 x odd" in str(e.value)
    d = tmp_path / "run" / "b"
    assert (
        not (d / "_SUCCESS").exists() and json.loads((d / "manifest.json").read_text())["status"] == "failed"
    )
    assert not (tmp_path / "run" / "c").exists()  # the next stage never saw an empty table


def test_an_unreadable_manifest_stops_the_run_and_deletes_nothing(tmp_path, stages):
    graph.run_graph(cfg(tmp_path))
    (tmp_path / "run" / "a" / "manifest.json").write_text("{cut off")
    with pytest.raises(StorageError, match="a/manifest.json: cannot read the manifest"):
        graph.run_graph(cfg(tmp_path))
    assert (tmp_path / "run" / "a" / "_SUCCESS").exists() and (tmp_path / "run" / "a" / "data").exists()
    assert [s.calls for s in stages.values()] == [1, 1, 1]  # nothing redone
    assert not (tmp_path / "run" / "_lease.json").exists()  # released on the way out


class Writes(Fake):
    """A stage that writes a table whose columns may not be the ones it declares."""

    def __init__(self, name, table, declared):
        super().__init__(name)
        self.table, self.declared = table, declared

    def output(self, config):
        return self.declared

    def run(self, ctx):
        storage.write_parquet(ctx.data(self.name).child("part-0.parquet"), self.table)
        return StageResult(rows_in=1, rows_out=1, rejected={})


def test_a_stage_that_writes_other_columns_than_it_declares_fails_naming_the_column(tmp_path, monkeypatch):
    vectors = pa.array([[0.5, 0.5]], pa.list_(pa.float32(), 2))  # fixed size: a list of float32 all the same
    table = pa.table({"id": ["p1"], "embedding": vectors})
    good = pa.schema([("id", pa.string()), ("embedding", pa.list_(pa.float32()))])
    monkeypatch.setattr(ray_runtime, "connect", lambda cfg: "none")
    monkeypatch.setattr(graph, "STAGES", {"a": Writes("a", table, good)})
    assert graph.run_graph(cfg(tmp_path, "run.stages=[a]"))[0].status == "ran"
    for bad, column in [
        (pa.schema([("id", pa.string()), ("split", pa.string())]), "split"),
        (pa.schema([("id", pa.int64())]), "id"),
        (pa.schema([("embedding", pa.list_(pa.float64()))]), "embedding"),
    ]:
        monkeypatch.setattr(graph, "STAGES", {"a": Writes("a", table, bad)})
        with pytest.raises(graph.StageFailed, match=f"column '{column}'"):
            graph.run_graph(cfg(tmp_path, "run.stages=[a]"), start="a")


def test_every_stage_declares_its_output_and_resources():
    config = load_config(REPO / "workflows" / "demo.yaml")
    for name, stage in STAGES.items():
        out = stage.output(config)
        assert out is None or isinstance(out, pa.Schema), name
        pools = stage.resources(config)
        assert all(isinstance(r, Resources) for r in pools.values()), name
    assert set(STAGES["embed"].resources(config)) == {e.name for e in config.embed.encoders}
    assert "2 x 1 CPU" in graph.describe_resources({"p": Resources(num_actors=2, num_cpus=1)})
