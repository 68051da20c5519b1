"""docs/benchmarks.md's table is generated from benchmarks/results/*.json and must match them."""

import json

from benchmarks import table


def test_the_published_table_is_the_results():
    assert table.page_table() == table.table(), "stale: python -m benchmarks.table --write"


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
