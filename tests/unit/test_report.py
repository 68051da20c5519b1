"""The one text-table formatter every summary uses (the graph's, the evaluation's)."""

from coral import report


def test_text_table_aligns_labels_left_and_numbers_right_under_a_rule():
    text = report.text_table(["model", "R@1", "queries"], [["trained", 0.5, 12], ["baseline", 0.25, 7]])
    lines = text.splitlines()
    assert lines[0].split() == ["model", "R@1", "queries"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].startswith("trained ") and lines[2].endswith(" 12")
    assert "0.500" in lines[2] and "0.250" in lines[3]
    assert len({len(line) for line in lines}) == 1  # every line as wide as the widest cell in each column
