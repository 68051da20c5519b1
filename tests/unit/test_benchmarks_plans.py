"""The scale projections in README.md and docs/cost.md are what ray_jobs.plan gives from the committed
figures (benchmarks/results/plan_projection.json), on cluster.yaml and cluster/prices.yaml."""

from benchmarks import plans


def test_the_published_projections_are_the_current_figures():
    made = plans.blocks()
    for page, which in plans.PAGES.items():
        assert plans.page_block(page) == made[which], f"stale {page.name}: python -m benchmarks.plans --write"


def test_both_papers_scales_are_shown_with_every_stage():
    made = plans.blocks()
    assert "| MegaPairs | a corpus of 20M captioned images, 26M training instances |" in made["summary"]
    assert "| MERIT | 135k products, 320k queries |" in made["summary"]
    assert "Projected from CPU figures" in made["summary"]
    for stage in ("embed", "mine", "annotate", "train", "import_triplets", "index", "evaluate", "serve"):
        assert f"| {stage} |" in made["tables"], stage
