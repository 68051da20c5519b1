"""The training curves' PNG: every loss term against the step, the validation metrics below."""

import io

import numpy as np
from PIL import Image

from coral.train import curves

VALIDATION = {
    "start": {"R@1": 0.1, "R@5": 0.3, "R@10": 0.4, "MRR@10": 0.2, "queries": 16, "candidates": 40},
    "end": {"R@1": 0.5, "R@5": 0.7, "R@10": 0.8, "MRR@10": 0.6, "queries": 16, "candidates": 40},
}


def decoded(data: bytes) -> Image.Image:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(data)).convert("RGB")
    assert img.width > 0 and img.height > 0 and len(img.getcolors(maxcolors=1 << 24)) > 1
    return img


def coral_history(n: int) -> list[dict]:
    return [
        {
            "contrastive_loss": 3 - i / n,
            "vision_recon_loss": 1 - i / (2 * n),
            "mlm_loss": 8 - i / n,
            "loss": 5 - i / n,
        }
        for i in range(n)
    ]


def test_every_loss_term_against_the_step_and_validation_below():
    fig = curves.figure(coral_history(20), VALIDATION, "coral on tiny")
    losses, validation = fig.axes
    assert losses.get_ylabel() == "loss" and losses.get_title() == "coral on tiny"
    assert [t.get_text() for t in losses.get_legend().get_texts()] == [
        "total",
        "contrastive (InfoNCE)",
        "vision reconstruction",
        "masked language modelling",
    ]
    line = losses.get_lines()[1]
    assert list(line.get_xdata()) == list(range(1, 21)) and line.get_ydata()[0] == 3
    assert validation.get_xlabel() == "step" and validation.get_ylabel() == "validation"
    assert [t.get_text() for t in validation.get_legend().get_texts()] == ["R@1", "R@5", "R@10", "MRR@10"]
    r1 = validation.get_lines()[0]
    assert list(r1.get_xdata()) == [0, 20] and list(r1.get_ydata()) == [0.1, 0.5]
    assert "16 queries" in validation.get_title()
    img = decoded(curves.png(coral_history(20), VALIDATION, "coral on tiny"))
    assert img.size == (800, 480)


def test_validation_at_every_checkpoint_joins_start_and_end():
    during = [{"step": 10, "R@1": 0.3, "queries": 16}]
    fig = curves.figure(coral_history(20), {**VALIDATION, "during": during}, "coral on tiny")
    r1 = fig.axes[1].get_lines()[0]
    assert list(r1.get_xdata()) == [0, 10, 20] and list(r1.get_ydata()) == [0.1, 0.3, 0.5]
    assert "every checkpoint" in fig.axes[1].get_title()


def test_a_long_run_is_smoothed_and_a_total_equal_to_its_one_term_is_one_line():
    history = [{"contrastive_loss": float(v), "loss": float(v)} for v in np.linspace(3, 1, 300)]
    fig = curves.figure(history, {}, "mmret_clip on tiny")
    (ax,) = fig.axes  # no validation: no empty axes
    assert ax.get_xlabel() == "step" and "running mean of 10 steps" in ax.get_title()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["total = contrastive (InfoNCE)"]
    assert len(ax.get_lines()) == 2  # the raw values, faint, and their running mean
    decoded(curves.png(history, {}, "mmret_clip on tiny"))


def test_terms_of_very_different_sizes_share_a_log_axis():
    history = [{"contrastive_loss": 3.0, "vision_recon_loss": 0.01, "loss": 3.01} for _ in range(5)]
    (ax,) = curves.figure(history, {}, "coral").axes
    assert ax.get_yscale() == "log" and ax.get_ylabel() == "loss (log scale)"


def test_smooth_is_a_running_mean_that_skips_missing_steps():
    assert curves.smooth([1, 2, 3, 4], 2).tolist() == [1.0, 1.5, 2.5, 3.5]
    assert curves.smooth([1, float("nan"), 3], 2).tolist() == [1.0, 1.0, 3.0]
