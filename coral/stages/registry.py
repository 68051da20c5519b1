"""The stage registry: the one place a stage is added. Order of execution comes from ``run.stages``."""

from coral.stages.annotate import AnnotateStage
from coral.stages.base import Stage, StageContext
from coral.stages.catalog import CatalogStage
from coral.stages.embed import EmbedStage
from coral.stages.evaluate import EvaluateStage
from coral.stages.imports import ImportStage
from coral.stages.index import IndexStage
from coral.stages.merit import MeritStage
from coral.stages.mine import MineStage
from coral.stages.serve import ServeStage
from coral.stages.train import TrainStage

STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        CatalogStage(),
        EmbedStage(),
        MineStage(),
        AnnotateStage(),
        MeritStage(),
        ImportStage(),
        TrainStage(),
        IndexStage(),
        EvaluateStage(),
        ServeStage(),
    )
}

__all__ = ["STAGES", "Stage", "StageContext"]
