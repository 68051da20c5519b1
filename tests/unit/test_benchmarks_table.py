"""docs/benchmarks.md's table is generated from benchmarks/results/*.json and must match them."""

import json

from benchmarks import table


def test_the_published_tables_are_the_results():
    assert table.page_table() == table.table(), "stale: python -m benchmarks.table --write"
    readme = table.page_table(table.README, table.HEAD_START, table.HEAD_END)
    assert readme == table.headline(), "stale: python -m benchmarks.table --write"


def test_the_readme_headline_gives_the_worst_run(tmp_path):
    result = {
        "name": "serve_batching_throughput",
        "value": 300.0,
        "unit": "requests/s",
        "baseline": {"what": "batching off", "value": 140.0},
        "ratio": 2.143,
        "run_ratios": [2.2, 1.9, 2.1],
        "goal": {"bar": 2.0, "direction": "higher"},
        "goal_on": "every_run",
        "goal_met": False,
    }
    (tmp_path / "serve_batching_throughput.json").write_text(json.dumps(result))
    lines = table.headline(tmp_path).splitlines()
    assert len(lines) == 3  # the other headline figures have no result here
    assert (
        lines[2]
        == "| Serve batching on vs off, tiny encoder | 2.143 | 1.900 | ratio in every run >= 2, not met |"
    )


def test_every_result_is_a_row_with_its_ratio_and_goal(tmp_path):
    result = {
        "name": "x_stage",
        "value": 1234.5,
        "unit": "rows/s",
        "baseline": {"what": "a plain loop", "value": 1000.0},
        "ratio": 1.2345,
        "goal": {"bar": 0.9, "direction": "higher"},
        "goal_met": True,
        "peak_rss_gib": 1.5,
        "commit": "abc1234",
        "date": "2026-12-01T00:00:00Z",
    }
    (tmp_path / "x_stage.json").write_text(json.dumps(result))
    lines = table.table(tmp_path).splitlines()
    assert len(lines) == 3
    assert lines[2].split(" | ")[:5] == [
        "| `x_stage`",
        "1,234 rows/s",
        "1,000: a plain loop",
        "1.23",
        "ratio >= 0.9, met",
    ]
