import ast
import dataclasses
from pathlib import Path

import pytest
import yaml

import coral.config
from coral.catalog import vocab
from coral.config import (
    Config,
    EncoderConfig,
    EngineConfig,
    IndexStageConfig,
    Resources,
    StorageConfig,
    load_config,
    section_dict,
    section_hash_dict,
)
from coral.config.catalog import LANGUAGES
from coral.errors import ConfigError

REPO = Path(__file__).resolve().parents[3]


def write(tmp_path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_and_yaml_values(tmp_path):
    cfg = load_config(write(tmp_path, "catalog:\n  num_groups: 7\n  languages: [en, th]\n"))
    assert isinstance(cfg, Config)
    assert cfg.catalog.num_groups == 7
    assert cfg.catalog.languages == ("en", "th")
    assert [e.kind for e in cfg.embed.encoders] == ["clip_image", "dinov2", "clip_text"]  # untouched default


def test_overrides_parse_values_as_yaml(tmp_path):
    cfg = load_config(
        write(tmp_path, "catalog:\n  num_groups: 7\n"),
        [
            "catalog.num_groups=11",
            "mine.band=[0.5, 0.9]",
            "embed.encoders=[{name: a, model: m, num_cpus: 0.5}]",
            "run.stages=[catalog]",
            "storage.region=eu-west-1",
        ],
    )
    assert cfg.catalog.num_groups == 11
    assert cfg.mine.band == (0.5, 0.9)
    assert len(cfg.embed.encoders) == 1 and cfg.embed.encoders[0].num_cpus == 0.5
    assert cfg.run.stages == ("catalog",)
    assert cfg.storage.region == "eu-west-1"


def test_int_is_accepted_for_float():
    assert load_config(None, ["catalog.test_fraction=0"]).catalog.test_fraction == 0.0


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, "mine:\n  index:\n    nprobes: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "mine.index.nprobes" in str(e.value) and str(p) in str(e.value)


def test_unknown_key_in_override(tmp_path):
    with pytest.raises(ConfigError, match=r"catalog\.nope"):
        load_config(write(tmp_path, "{}"), ["catalog.nope=1"])


def test_wrong_type_names_key_and_value(tmp_path):
    p = write(tmp_path, "catalog:\n  num_groups: many\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "catalog.num_groups" in msg and "expected int" in msg and "'many'" in msg and str(p) in msg


def test_bool_is_not_an_int():
    with pytest.raises(ConfigError, match="expected int"):
        load_config(None, ["catalog.num_groups=true"])


def test_literal_and_validation_errors():
    with pytest.raises(ConfigError, match="expected one of"):
        load_config(None, ["embed.encoders=[{name: a, kind: resnet}]"])
    with pytest.raises(ConfigError, match="unique"):
        load_config(None, ["embed.encoders=[{name: a}, {name: a}]"])
    with pytest.raises(ConfigError, match="band"):
        load_config(None, ["mine.bands={x: [0.9, 0.8]}"])
    with pytest.raises(ConfigError, match="num_groups must be >= 1"):
        load_config(None, ["catalog.num_groups=0"])
    with pytest.raises(ConfigError, match="languages"):
        load_config(None, ["catalog.languages=[en, fr]"])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(None, ["catalog.num_groups"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)  # a directory
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_configs_are_frozen():
    cfg = load_config(None)
    with pytest.raises(AttributeError):
        cfg.catalog.seed = 3  # type: ignore[misc]


def test_secrets_are_redacted_in_recorded_sections():
    s = StorageConfig(access_key_id="AKIAEXAMPLE", secret_access_key="s3cr3t", region="r")
    d = section_dict(s)
    assert d["access_key_id"] == "***" and d["secret_access_key"] == "***" and d["region"] == "r"
    assert "s3cr3t" not in yaml.safe_dump(d)


def test_secret_overrides_stay_raw_and_never_appear_in_errors(tmp_path):
    cfg = load_config(None, ["storage.access_key_id=0123", "storage.secret_access_key=ab#cd"])
    assert cfg.storage.access_key_id == "0123" and cfg.storage.secret_access_key == "ab#cd"
    with pytest.raises(ConfigError) as e:
        load_config(None, ["storage.secret_access_key=[hidden-secret-value"])  # half a credential pair
    assert "hidden-secret-value" not in str(e.value) and "set together" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "storage:\n  access_key_id: {a: hidden-secret-value}\n"))
    assert "hidden-secret-value" not in str(e.value) and "storage.access_key_id" in str(e.value)


def test_resource_settings_do_not_enter_the_rerun_hash():
    one = "{name: a, model: m, num_actors: %d, dtype: %s}"
    enc = lambda n, dtype="float32": f"embed.encoders=[{one % (n, dtype)}]"  # noqa: E731
    a, b = load_config(None, [enc(1)]), load_config(None, ["catalog.num_tasks=9", enc(5)])
    assert section_hash_dict(a.catalog) == section_hash_dict(b.catalog)
    assert section_hash_dict(a.embed) == section_hash_dict(b.embed)
    assert section_dict(a.catalog) != section_dict(b.catalog)  # the manifest still records them
    c = load_config(None, [enc(1, "bfloat16")])
    assert section_hash_dict(a.embed) != section_hash_dict(c.embed)


@pytest.mark.parametrize("path", sorted((REPO / "workflows").glob("*.yaml")), ids=lambda p: p.name)
def test_every_workflow_yaml_loads(path):
    cfg = load_config(path)
    assert cfg.run.stages and cfg.run.run_root


def test_every_yaml_in_repo_parses():
    files = [
        *REPO.glob("*.y*ml"),
        *(p for d in ("workflows", "cluster", ".ci") for p in (REPO / d).rglob("*.y*ml")),
    ]
    assert any(p.name == "cluster.yaml" for p in files)
    for p in files:  # a KubeRay manifest carries its NetworkPolicies as further documents
        docs = list(yaml.safe_load_all(p.read_text()))
        assert docs and all(d is not None for d in docs), p


def test_train_section_errors_name_the_setting(tmp_path, tiny_models):
    from coral.stages.train import TrainStage

    with pytest.raises(ConfigError, match="compare entries look like"):
        load_config(None, ["train.compare=[{kind: clip}]"])
    with pytest.raises(ConfigError, match="unknown model 'bert'"):
        load_config(None, ["train.compare=[{model: bert}]"])
    ds = tmp_path / "ds.json"
    ds.write_text('{"gradient_accumulation_steps": 4, "zero_optimization": {"stage": 2}}')
    with pytest.raises(ConfigError, match="sets gradient_accumulation_steps=4 but the train section gives 1"):
        TrainStage().validate(load_config(None, [f"train.deepspeed={ds}"]))
    qwen, clip = tiny_models["qwen2_vl"], tiny_models["clip"]
    with pytest.raises(ConfigError, match="LoRA .* with ZeRO-3 is not supported"):
        TrainStage().validate(
            load_config(
                None,
                [f"train.base={qwen}", "train.lora_rank=4", "train.deepspeed=cluster/deepspeed/zero3.json"],
            )
        )
    with pytest.raises(ConfigError, match="mmret_clip needs one of clip, siglip"):
        TrainStage().validate(load_config(None, ["train.model=mmret_clip", f"train.base={qwen}"]))
    with pytest.raises(ConfigError, match="mmret_mllm needs one of qwen2_vl"):
        TrainStage().validate(
            load_config(None, [f"train.base={qwen}", f"train.compare=[{{model: mmret_mllm, base: {clip}}}]"])
        )


def test_an_overlay_merges_over_the_workflow_then_overrides_apply(tmp_path):
    from coral.config import merge

    assert merge(
        {"a": {"b": 1, "c": [1, 2]}, "d": 1}, {"a": {"c": [3]}, "d": None, "e": {"f": None, "g": 2}}
    ) == {
        "a": {"b": 1, "c": [3]},  # a list replaces
        "e": {"g": 2},  # null restores the default, also in a new mapping
    }
    overlay = tmp_path / "local.yaml"
    overlay.write_text("run: {run_root: 'runs/{name}-local'}\ntrain: {steps: 20, use_gpu: false}\n")
    cfg = load_config(REPO / "workflows" / "merit.yaml", ["train.steps=5"], [overlay])
    assert cfg.run.run_root == "runs/merit-local" and cfg.train.steps == 5 and cfg.train.use_gpu is False
    assert cfg.train.base == "Qwen/Qwen2.5-VL-3B-Instruct"  # the rest is the workflow's
    with pytest.raises(ConfigError, match=r"merit.yaml with .*local.yaml.*train\.nope"):
        overlay.write_text("train: {nope: 1}\n")
        load_config(REPO / "workflows" / "merit.yaml", [], [overlay])


@pytest.mark.parametrize("workflow", ["megapairs.yaml", "merit.yaml"])
def test_the_local_overlay_leaves_no_gpu_no_hub_id_and_no_bucket(workflow):
    from coral import graph

    cluster = load_config(REPO / "workflows" / workflow)
    cfg = load_config(REPO / "workflows" / workflow, [], [REPO / "workflows" / "overlays" / "local.yaml"])
    assert graph.select(cfg) == list(cluster.run.stages)  # the same stages
    assert cfg.evaluate.metrics == cluster.evaluate.metrics and cfg.evaluate.splits == cluster.evaluate.splits
    assert not cfg.run.run_root.startswith("s3://") and not cfg.train.use_gpu
    for section in (*cfg.embed.encoders, cfg.annotate.describe, cfg.annotate.instruct, cfg.index):
        assert section.num_gpus == 0 and section.accelerator_type == ""
        assert getattr(section, "kind", "hf") != "vllm"
    for dep in (cfg.serve.encoder, cfg.serve.index, cfg.serve.ingress):
        assert dep.num_gpus == 0 and not dep.autoscaling
    assert cfg.serve.host == "127.0.0.1"
    models = [e.model for e in cfg.embed.encoders] + [cfg.annotate.describe.model, cfg.train.base]
    assert all(m.startswith("models/tiny/") for m in models)


def test_evaluate_metrics_and_gate_are_checked():
    cfg = load_config(None, ["evaluate.metrics=[circo, merit]", "evaluate.gate={mAP@5: 0.1}"])
    assert cfg.evaluate.metrics == ("circo", "merit")
    with pytest.raises(ConfigError, match="evaluate.metrics"):
        load_config(None, ["evaluate.metrics=[cirr]"])
    with pytest.raises(ConfigError, match="evaluate.gate"):
        load_config(None, ["evaluate.gate={mAP@5: 0.1}"])  # merit only by default
    with pytest.raises(ConfigError, match=r"merit: ood: axes must be among"):
        load_config(None, ["merit.ood=[colour]"])


PLACEMENT = {"num_actors", "num_cpus", "num_gpus", "accelerator_type", "device"}


def test_every_section_with_ray_actors_is_a_resources():
    sections = [getattr(coral.config, n) for n in coral.config.__all__ if n != "Resources"]
    with_actors = {
        c for c in sections if dataclasses.is_dataclass(c) and "num_actors" in c.__dataclass_fields__
    }
    assert with_actors == {EncoderConfig, EngineConfig, IndexStageConfig}
    assert all(issubclass(c, Resources) for c in with_actors)
    for cls in with_actors:  # declared once, in Resources, and only dtype decides a rerun
        assert not PLACEMENT & set(vars(cls).get("__annotations__", {})), cls
        hashed = section_hash_dict(cls())
        assert "dtype" in hashed and not PLACEMENT & set(hashed), cls
    cfg = load_config(None, ["merit.label={model: m}"])
    for section in (
        *cfg.embed.encoders,
        cfg.annotate.describe,
        cfg.annotate.instruct,
        cfg.merit.label,
        cfg.index,
    ):
        assert isinstance(section, Resources)


@pytest.mark.parametrize(
    "text, where",
    [
        ("embed:\n  encoders:\n    - {name: a}\n    - {name: b, num_actors: 0}\n", "embed.encoders[1]"),
        ("annotate:\n  instruct: {num_actors: 0}\n", "annotate.instruct"),
        ("merit:\n  judge: {model: m, num_actors: 0}\n", "merit.judge"),
        ("index:\n  num_actors: 0\n", "index"),
    ],
)
def test_a_bad_resource_value_names_the_file_and_the_section(tmp_path, text, where):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == f"{p}: {where}: num_actors must be >= 1, got 0"


def test_a_bad_resource_override_names_the_file_and_the_section(tmp_path):
    p = write(tmp_path, "{}")
    with pytest.raises(ConfigError) as e:
        load_config(p, ["index.num_gpus=-1"])
    assert str(e.value) == f"{p} (with command-line overrides): index: num_gpus must be >= 0, got -1.0"


def test_resource_keys_stay_flat_and_errors_in_them_name_the_path(tmp_path):
    p = write(tmp_path, "index:\n  num_actor: 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)  # the known keys listed include the ones inherited from Resources
    assert str(p) in msg and "unknown key 'index.num_actor'" in msg and "num_actors" in msg
    p = write(tmp_path, "embed:\n  encoders:\n    - {name: a}\n    - {name: b, batch_size: x}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == f"{p}: embed.encoders[1].batch_size: expected int, got str 'x'"
    p = write(tmp_path, "annotate:\n  describe: {device: tpu}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert (
        str(e.value) == f"{p}: annotate.describe.device: expected one of ['auto', 'cpu', 'cuda'], got 'tpu'"
    )


def test_vocab_languages_come_from_the_config_layer():
    assert vocab.LANGUAGES is LANGUAGES


def test_the_config_package_imports_only_downward_and_at_module_level():
    allowed = {"coral.typed", "coral.errors", "coral.metrics"}
    for path in sorted((REPO / "coral" / "config").glob("*.py")):
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = (
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                )
                for name in (n for n in names if n.split(".")[0] == "coral"):
                    assert id(node) in top, f"{path.name}: function-local import of {name}"
                    if path.name in ("__init__.py", "load.py", "reference.py"):  # the root and its readers
                        continue
                    assert name in allowed or (
                        name.startswith("coral.config.") and name != "coral.config.load"
                    ), f"{path.name} imports {name}"
