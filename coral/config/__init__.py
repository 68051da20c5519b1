"""The typed config of one graph run: frozen dataclasses loaded from YAML plus ``a.b.c=value`` overrides.

One module per section (``coral.config.embed`` holds ``EmbedConfig`` and its ``EncoderConfig``); the
sections whose work runs in a pool of Ray actors inherit ``Resources`` (``coral.config.resources``);
``coral.config.load`` holds the root ``Config`` and the loading. Each stage receives only its own section.
Adding a stage means adding its section module, a field of ``Config`` and registering the stage in
``coral.stages``; the driver needs no change. Everything is importable from ``coral.config``.
"""

from coral.config.annotate import AnnotateConfig, EngineConfig
from coral.config.catalog import LANGUAGES, CatalogConfig, ImportConfig, check_image_roots
from coral.config.embed import EmbedConfig, EncoderConfig, ImagesSourceConfig
from coral.config.evaluate import EvaluateConfig
from coral.config.index import IndexStageConfig
from coral.config.load import (
    Config,
    apply_overrides,
    load_config,
    merge,
    parse_override,
    read_yaml,
    section_dict,
    section_hash_dict,
)
from coral.config.merit import MeritConfig
from coral.config.mine import IndexConfig, MineConfig
from coral.config.resources import Resources
from coral.config.run import RayConfig, RunConfig, StorageConfig
from coral.config.serve import DeploymentConfig, ServeConfig
from coral.config.train import RECIPES, TrainConfig

__all__ = [
    "LANGUAGES",
    "RECIPES",
    "AnnotateConfig",
    "CatalogConfig",
    "Config",
    "DeploymentConfig",
    "EmbedConfig",
    "EncoderConfig",
    "EngineConfig",
    "EvaluateConfig",
    "ImagesSourceConfig",
    "ImportConfig",
    "IndexConfig",
    "IndexStageConfig",
    "MeritConfig",
    "MineConfig",
    "RayConfig",
    "Resources",
    "RunConfig",
    "ServeConfig",
    "StorageConfig",
    "TrainConfig",
    "apply_overrides",
    "check_image_roots",
    "load_config",
    "merge",
    "parse_override",
    "read_yaml",
    "section_dict",
    "section_hash_dict",
]
