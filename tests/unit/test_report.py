"""The one text-table formatter every summary uses (the graph's, the evaluation's), and the evaluation
report's figures: labelled axes, a legend where several series share them, a PNG that decodes."""

import io

from PIL import Image

from coral import report


def test_text_table_aligns_labels_left_and_numbers_right_under_a_rule():
    text = report.text_table(["model", "R@1", "queries"], [["trained", 0.5, 12], ["baseline", 0.25, 7]])
    lines = text.splitlines()
    assert lines[0].split() == ["model", "R@1", "queries"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].startswith("trained ") and lines[2].endswith(" 12")
    assert "0.500" in lines[2] and "0.250" in lines[3]
    assert len({len(line) for line in lines}) == 1  # every line as wide as the widest cell in each column


def decoded(data: bytes) -> Image.Image:
    """A PNG that decodes, has pixels, and is not one colour."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(data)).convert("RGB")
    assert img.width > 0 and img.height > 0
    assert len(img.getcolors(maxcolors=1 << 24)) > 1
    return img


def test_bars_draw_labelled_axes_a_legend_per_series_and_value_labels():
    fig = report.bars_figure(
        ["en", "th"],
        {"trained": [0.5, 0.25], "baseline": [0.1, 0.0]},
        "R@1 by language",
        1.0,
        "language",
        "R@1",
        [8, 4],
    )
    (ax,) = fig.axes
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("language", "R@1", "R@1 by language")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["trained", "baseline"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["en (n=8)", "th (n=4)"]
    assert {t.get_text() for t in ax.texts} >= {"0.50", "0.25"}  # each bar's value
    assert ax.get_ylim()[1] >= 1.0
    img = decoded(report.png(fig))
    assert img.size == (640, 400)


def test_one_series_has_no_legend_and_many_categories_lie_down():
    fig = report.bars_figure(
        [f"class {i}" for i in range(30)],
        {"trained": [i / 30 for i in range(30)]},
        "R@1 by class",
        1.0,
        "class",
        "R@1",
    )
    (ax,) = fig.axes
    assert ax.get_legend() is None
    assert ax.get_ylabel() == "class" and ax.get_xlabel() == "R@1"  # horizontal bars: one row per class
    assert len(ax.get_yticklabels()) == 30
    decoded(report.png(fig))


def test_rank_histogram_counts_each_rank_and_the_misses():
    fig = report.ranks_figure({"trained": [1, 1, 2, -1], "baseline": [3, -1, -1, -1]})
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_xticklabels()][-1] == "miss"
    assert ax.get_xlabel().startswith("rank") and ax.get_ylabel() == "queries"
    trained, baseline = ax.containers
    assert [b.get_height() for b in trained][:2] == [2, 1] and trained[-1].get_height() == 1
    assert baseline[-1].get_height() == 3
    assert len(ax.get_legend().get_texts()) == 2
    decoded(report.png(fig))


def test_recall_curve_per_model_rises_to_recall_at_10():
    fig = report.recall_figure({"trained": [1, 2, 10, -1], "baseline": [5, -1, -1, -1]})
    (ax,) = fig.axes
    trained, baseline = ax.get_lines()
    assert list(trained.get_xdata()) == list(range(1, 11))
    assert list(trained.get_ydata())[:2] == [0.25, 0.5] and trained.get_ydata()[-1] == 0.75
    assert baseline.get_ydata()[3] == 0 and baseline.get_ydata()[4] == 0.25
    assert ax.get_xlabel() and ax.get_ylabel().startswith("Recall@k")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "trained (4 queries)",
        "baseline (4 queries)",
    ]
    decoded(report.png(fig))
