"""Fixtures shared by integration modules: one short training run that index, evaluate and serve read."""

from __future__ import annotations

import pytest

from coral import graph
from coral.config import load_config
from tests.conftest import REPO


def overrides(root, tiny_models) -> list[str]:
    return [
        f"run.run_root={root}",
        "run.stages=[catalog, merit, train, index, evaluate]",
        "catalog.num_groups=400",  # a test split large enough that queries keep < 5% positives
        "merit.queries={train: 600, test: 700}",  # about 120 kept: 100 go over HTTP
        "merit.cold_start=false",
        "merit.export=false",
        "merit.ood=[language, attribute, class]",  # every axis held out of training, scored apart
        "merit.ood_languages=[th]",  # one value each: enough rows are left to train on
        "merit.ood_attributes=[brand]",
        "merit.ood_classes=[phone]",
        f"train.base={tiny_models['qwen2_vl']}",
        "train.steps=10",  # a trained checkpoint to bind, serve and compare: no test here asks it to learn
        "train.checkpoint_every=10",
        "train.batch_size=4",
        "train.validation_queries=0",
        "evaluate.bootstrap=200",
    ]


@pytest.fixture(scope="session")
def trained_run(ray_local, tiny_models, tmp_path_factory):
    """catalog -> merit -> train (10 steps) -> index -> evaluate, once per session: (run root, config)."""
    root = tmp_path_factory.mktemp("eval") / "run"
    cfg = load_config(REPO / "workflows" / "ci_small.yaml", overrides(root, tiny_models))
    graph.run_graph(cfg)
    return root, cfg
