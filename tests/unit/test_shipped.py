"""The shipped workflows and DeepSpeed JSONs: found by name where a path does not exist, linked from the
checkout's old places, and all of them in the wheel (pyproject's package-data)."""

import json
import tomllib
from pathlib import Path

import pytest

from coral import shipped
from coral.config import load_config
from coral.errors import ConfigError
from coral.stages.train import deepspeed_config

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "given, found",
    [
        ("demo", "demo.yaml"),
        ("demo.yaml", "demo.yaml"),
        ("workflows/demo.yaml", "demo.yaml"),
        ("./workflows/merit.yaml", "merit.yaml"),
        ("local", "overlays/local.yaml"),
        ("overlays/local.yaml", "overlays/local.yaml"),
        ("workflows/overlays/local.yaml", "overlays/local.yaml"),
    ],
)
def test_a_workflow_by_name_from_any_folder(given, found, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert shipped.workflow(given) == shipped.WORKFLOWS / found


def test_a_file_that_exists_wins_and_other_paths_stay_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo.yaml").write_text("run: {name: mine}\n")
    (tmp_path / "merit").mkdir()  # a folder is not a workflow: the shipped one is meant
    assert shipped.workflow("demo.yaml") == Path("demo.yaml")
    assert shipped.workflow("merit") == shipped.WORKFLOWS / "merit.yaml"
    for given in ("nope.yaml", "../workflows/demo.yaml", str(tmp_path / "demo2.yaml")):
        assert shipped.workflow(given) == Path(given)
    assert load_config("demo.yaml").run.name == "mine"


def test_load_config_reads_a_shipped_workflow_and_overlay_and_names_them_when_missing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("demo.yaml", ["catalog.num_groups=4"], ["local"])
    assert cfg.run.name == "demo" and cfg.run.run_root == "runs/demo-local" and cfg.catalog.num_groups == 4
    with pytest.raises(ConfigError, match=r"dmeo.yaml: config file not found \(shipped: .*demo.yaml"):
        load_config("dmeo.yaml")


@pytest.mark.parametrize("given", ["zero3.json", "zero3", "cluster/deepspeed/zero3.json"])
def test_a_deepspeed_json_by_name(given, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert shipped.deepspeed(given) == shipped.DEEPSPEED / "zero3.json"
    cfg = load_config(None, [f"train.deepspeed={given}"]).train
    assert deepspeed_config(cfg)["zero_optimization"]["stage"] == 3


def test_every_deepspeed_name_a_workflow_gives_is_shipped():
    for path in shipped.WORKFLOWS.glob("*.yaml"):
        cfg = load_config(path).train
        assert shipped.deepspeed(cfg.deepspeed).parent == shipped.DEEPSPEED, path
    for path in shipped.DEEPSPEED.glob("*.json"):
        assert isinstance(json.loads(path.read_text()), dict)


def test_the_checkout_links_its_old_folders_to_the_shipped_ones():
    assert (REPO / "workflows").resolve() == shipped.WORKFLOWS
    assert (REPO / "cluster" / "deepspeed").resolve() == shipped.DEEPSPEED
    assert shipped.names() == sorted(
        p.relative_to(REPO / "workflows").as_posix() for p in (REPO / "workflows").rglob("*.yaml")
    )


def test_every_data_file_of_the_package_is_in_its_package_data():
    """A file under coral/ that is not Python reaches an installed package only through a pattern of
    [tool.setuptools.package-data]: a new workflow or JSON needs no more, a new kind of file a pattern."""
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "coral"
    ]
    package = REPO / "coral"
    files = {
        p.relative_to(package).as_posix()
        for p in package.rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts
    }
    matched = {p.relative_to(package).as_posix() for pattern in patterns for p in package.glob(pattern)}
    assert {"annotate/data/demonstrations.jsonl", "data/workflows/overlays/local.yaml"} <= files
    assert files <= matched, sorted(files - matched)
