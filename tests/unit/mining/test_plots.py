"""The mine stage's figures: each encoder's similarity histogram with its band, and the pairs per
encoder; labelled axes, legends, PNGs that decode."""

import io

import numpy as np
from PIL import Image

from coral.mining import plots


def decoded(data: bytes) -> Image.Image:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(data)).convert("RGB")
    assert img.width > 0 and img.height > 0 and len(img.getcolors(maxcolors=1 << 24)) > 1
    return img


def test_histogram_counts_the_values_between_the_bounds():
    counts, edges = plots.histogram(np.array([0.1, 0.5, 0.55, 0.9]), bins=4, lo=0.0, hi=1.0)
    assert counts == [1, 0, 2, 1] and edges == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_similarity_histogram_marks_the_band_and_names_it_in_the_legend():
    counts, edges = plots.histogram(np.random.default_rng(0).normal(0.75, 0.1, 500), lo=0.3, hi=1.0)
    fig = plots.histogram_figure(counts, edges, (0.8, 0.96), "clip_image (train)", in_band=42)
    (ax,) = fig.axes
    assert ax.get_xlabel().startswith("cosine similarity") and ax.get_ylabel() == "neighbours"
    assert ax.get_title() == "clip_image (train)"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == [f"neighbours ({sum(counts)})", "band 0.8–0.96, 42 pairs"]
    assert sorted(line.get_xdata()[0] for line in ax.get_lines()) == [0.8, 0.96]  # the bounds
    assert ax.get_xlim() == (0.3, 1.0)
    img = decoded(plots.histogram_png(counts, edges, (0.8, 0.96), "clip_image (train)"))
    assert img.size == (640, 400)


def test_pairs_figure_shows_pairs_per_encoder_and_split_and_the_overlap():
    splits = {
        "train": {
            "rows": 9,
            "encoders": {"clip_image": {"pairs_in_band": 7}, "dinov2": {"pairs_in_band": 3}},
        },
        "test": {"rows": 4, "encoders": {"clip_image": {"pairs_in_band": 2}, "dinov2": {"pairs_in_band": 1}}},
        "val": {"rows": 1, "pairs": 0},  # too small to mine: left out
    }
    fig = plots.pairs_figure(splits, {"clip_image": 5, "clip_image+dinov2": 2})
    left, right = fig.axes
    assert left.get_xlabel() == "encoder" and left.get_ylabel() == "pairs inside the band"
    assert [t.get_text() for t in left.get_legend().get_texts()] == ["train", "test"]
    assert [t.get_text() for t in left.get_xticklabels()] == ["clip_image", "dinov2"]
    assert [b.get_height() for b in left.containers[0]] == [7, 3]
    assert right.get_xlabel() == "kept pairs" and right.get_ylabel() == "found by"
    assert [t.get_text() for t in right.get_yticklabels()] == ["clip_image + dinov2", "clip_image"]
    decoded(plots.pairs_png(splits, {"clip_image": 5}))
    decoded(plots.pairs_png(splits, {}))  # nothing kept still draws


def test_a_few_neighbours_in_the_band_beside_thousands_above_it_get_a_log_axis():
    fig = plots.histogram_figure([2, 0, 5000], [0.9, 0.95, 0.97, 1.0], (0.8, 0.96), "clip_image (test)")
    (ax,) = fig.axes
    assert ax.get_yscale() == "log" and ax.get_ylim()[0] == 0.5  # a bin of one neighbour still shows
    assert ax.get_ylabel() == "neighbours (log scale)"
