"""The root ``Config`` of one graph run and how it is loaded: YAML, overlays merged over it, then
``a.b.c=value`` overrides; errors name the file and the dotted key path."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from coral import shipped
from coral.config.annotate import AnnotateConfig
from coral.config.catalog import CatalogConfig, ImportConfig
from coral.config.embed import EmbedConfig
from coral.config.evaluate import EvaluateConfig
from coral.config.index import IndexStageConfig
from coral.config.merit import MeritConfig
from coral.config.mine import MineConfig
from coral.config.run import RayConfig, RunConfig, StorageConfig
from coral.config.serve import ServeConfig
from coral.config.train import TrainConfig
from coral.errors import ConfigError
from coral.typed import from_dict, is_secret, to_dict


@dataclass(frozen=True)
class Config:
    """Every section of a graph run; each stage receives only its own."""

    run: RunConfig = field(default_factory=RunConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    catalog: CatalogConfig = field(default_factory=CatalogConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    mine: MineConfig = field(default_factory=MineConfig)
    annotate: AnnotateConfig = field(default_factory=AnnotateConfig)
    merit: MeritConfig = field(default_factory=MeritConfig)
    imports: ImportConfig = field(default_factory=ImportConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    index: IndexStageConfig = field(default_factory=IndexStageConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as YAML, so 3 is an int and [1, 2] a list).

    Secret fields keep the raw string (YAML would turn 0123 into an int or drop text after #), and no
    error message repeats a value."""
    key, sep, raw = text.partition("=")
    keys = key.split(".")
    if not sep or not key or any(not part for part in keys):
        raise ConfigError(f"override '{key[:60]}': expected key.path=value")
    if is_secret(Config, keys):
        return keys, raw
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        raise ConfigError(f"override '{key}': the value is not valid YAML") from None
    return keys, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    data = copy.deepcopy(raw)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{k}' is not a section")
            node = child
        node[keys[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping from a file, or from the shipped workflow or overlay that a path which does not exist
    names (``demo.yaml``, ``workflows/demo.yaml``: ``coral.shipped``); errors name the path as given."""
    source = str(path)
    try:
        raw = yaml.safe_load(shipped.workflow(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(
            f"{source}: config file not found (shipped: {', '.join(shipped.names())})"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{source}: cannot read the config file: {type(e).__name__}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(raw).__name__}")
    return raw


def merge(base: dict, overlay: dict) -> dict:
    """``overlay`` over ``base``: mappings merge key by key, any other value (a list too) replaces, and
    ``null`` removes the key (its default applies)."""
    out = copy.deepcopy(base)
    for k, v in overlay.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict):
            out[k] = merge(out[k] if isinstance(out.get(k), dict) else {}, v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    overlays: list[str | Path] | tuple[str | Path, ...] = (),
) -> Config:
    """Load a YAML file (or only defaults when path is None), merge each overlay file over it (``merge``),
    then apply the overrides; ``{name}`` in ``run.run_root`` becomes ``run.name``. Errors name the file."""
    source = str(path) if path is not None else "<defaults>"
    raw: Any = read_yaml(path) if path is not None else {}
    for overlay in overlays:
        raw = merge(raw, read_yaml(overlay))
    if overlays:
        source += " with " + ", ".join(map(str, overlays))
    try:
        raw = apply_overrides(raw, list(overrides))
        run = raw.get("run")
        if isinstance(run, dict) and "{name}" in str(run.get("run_root", "")):
            run["run_root"] = str(run["run_root"]).replace("{name}", str(run.get("name", RunConfig.name)))
        return from_dict(Config, raw)
    except ConfigError as e:
        where = source + (" (with command-line overrides)" if overrides else "")
        raise ConfigError(f"{where}: {e}") from None


def section_dict(section: Any) -> dict:
    """A config section as plain data with secrets redacted: what manifests record."""
    return to_dict(section, redact=True)


def section_hash_dict(section: Any) -> dict:
    """The part of a section that decides whether a stage reruns (resource settings left out)."""
    return to_dict(section, redact=True, for_hash=True)
