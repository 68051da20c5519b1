"""The train stage: Ray Train + DeepSpeed (ZeRO-2, 2 workers) on the catalog's MERIT queries; named loss
terms, validation at start and end, an exported model the loader reads, and a longer rerun that resumes
from the last checkpoint."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

from coral import checkpoint, graph, manifest, storage
from coral import schemas as S
from coral.catalog import lookup
from coral.config import load_config
from coral.models import loader, retrievers
from coral.train import curves, step
from tests.conftest import REPO

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]


def config(root, tiny_models, steps, *extra):
    return load_config(
        REPO / "workflows" / "ci_small.yaml",
        [
            f"run.run_root={root}",
            "run.stages=[catalog, merit, train]",
            "catalog.num_groups=400",
            "merit.queries={train: 300, test: 300}",
            "merit.cold_start=false",
            f"train.base={tiny_models['qwen2_vl']}",
            f"train.steps={steps}",
            "train.checkpoint_every=10",
            "train.batch_size=4",
            "train.validation_queries=40",
            *extra,
        ],
    )


def assert_export_embeds_like_the_trained_model(root, metrics: dict, kind: str, export: str = "model"):
    """The exported dir, reloaded through the one loader, embeds the probe inputs as the in-memory model
    did at the end of training (the workers kept those embeddings with the final checkpoint)."""
    probe = metrics["probe"]
    assert probe and len(probe["queries"]) and len(probe["candidates"])
    ref = str(root / "train" / export)
    model, retriever = loader.load_model(ref).eval(), retrievers.make(kind, loader.load_processor(ref))
    catalog = pq.read_table(root / "catalog" / "data", columns=[S.ID, S.TITLE, S.IMAGE]).to_pydict()
    products = lookup.products_from(catalog)
    rows = {r[S.QUERY_ID]: r for r in pq.read_table(root / "merit" / "data").to_pylist()}
    q = [retrievers.query_features(retriever, rows[i], products) for i in probe["query_ids"]]
    c = [retrievers.candidate_features(retriever, i, products) for i in probe["candidate_ids"]]
    with torch.no_grad():
        got_q, got_c = step.embed_all(model, retriever, q), step.embed_all(model, retriever, c)
    torch.testing.assert_close(got_q, torch.tensor(probe["queries"]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_c, torch.tensor(probe["candidates"]), atol=1e-4, rtol=1e-4)


def curve_dirs() -> set[Path]:
    """The workers' local curve folders (``coral-curves-*``: the workers run on this machine)."""
    return set(Path(tempfile.gettempdir()).glob("coral-curves-*"))


def test_train_exports_a_model_and_resumes(ray_local, tiny_models, tmp_path):
    root = tmp_path / "run"
    cfg = config(root, tiny_models, 4, "train.checkpoint_every=2", "train.log_every=2")
    left = curve_dirs()
    graph.run_graph(cfg)
    assert curve_dirs() <= left  # the curves went into the checkpoints; the workers' folders are gone
    m = manifest.read_complete(storage.resolve(str(root)).child("train"))
    assert m["rows_out"] == 4 and m["details"]["resumed_from_step"] == 0
    metrics = json.loads((root / "train" / "metrics.json").read_text())
    assert len(metrics["history"]) == 4
    assert set(metrics["history"][0]) == {"loss", "contrastive_loss", "vision_recon_loss", "mlm_loss"}
    for when in ("start", "end"):
        v = metrics["validation"][when]
        assert v["queries"] == 40 and v["candidates"] > 0 and 0 <= v["R@1"] <= v["R@10"] <= 1
    exported = loader.load_model(str(root / "train" / "model"))
    base = loader.load_model(str(tiny_models["qwen2_vl"]))
    trained = dict(exported.named_parameters())
    changed = [n for n, p in base.named_parameters() if not torch.equal(p, trained[n])]
    assert changed  # the export holds the trained weights, every tensor present
    assert set(trained) == {n for n, _ in base.named_parameters()}
    assert_export_embeds_like_the_trained_model(root, metrics, "coral")
    card = (root / "train" / "model" / "README.md").read_text()  # the model card, coral_retriever.json
    assert card.startswith("---\nlibrary_name: transformers\n") and "pipeline_tag: feature-extraction" in card
    assert f"{m['rows_in']} triplets" in card and "4 optimizer steps" in card and "Not evaluated yet" in card
    spec = json.loads((root / "train" / "model" / "coral_retriever.json").read_text())
    assert spec["retriever"] == "coral" and spec["pooling"] == "last_token"
    assert spec["embedding_dim"] == checkpoint.embedding_dim(str(root / "train" / "model"))
    board = curves.read(
        str(root / "train" / "tensorboard" / "coral")
    )  # tensorboard --logdir <run_root>/train
    for tag in (
        "loss",
        "contrastive_loss",
        "vision_recon_loss",
        "mlm_loss",
        "lr",
        "grad_norm",
        "samples_per_s",
    ):
        assert sorted(board[f"train/{tag}"]) == [2, 4], tag
    assert (root / "train" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # losses, validation
    # linear decay after the warm-up: the rate of step 4 is below the one of step 2
    assert 0 < board["train/lr"][4] < board["train/lr"][2] <= cfg.train.lr
    # a longer run continues from step 4 instead of starting over
    longer = config(root, tiny_models, 6, "train.checkpoint_every=2", "train.log_every=2")
    rows = graph.run_graph(longer, start="train")
    assert [r.status for r in rows if r.stage == "train"] == ["ran"]
    m = manifest.read_complete(storage.resolve(str(root)).child("train"))
    assert m["rows_out"] == 6 and m["details"]["resumed_from_step"] == 4
    assert len(json.loads((root / "train" / "metrics.json").read_text())["history"]) == 6
    board = curves.read(str(root / "train" / "tensorboard" / "coral"))
    assert sorted(board["train/loss"]) == [2, 4, 6]  # the first run's curves came back with its checkpoint
    kept = [p for p in (root / "_checkpoints" / "train").rglob("state.json")]
    assert 1 <= len(kept) <= 2, kept  # train.keep_checkpoints: the older ones are deleted
    # new data (another merit seed: other queries) trains from step 0, never from the old data's checkpoint
    before = checkpoint.content_hash(str(root / "train" / "model"))
    graph.run_graph(config(root, tiny_models, 2, "merit.seed=5"))
    m = manifest.read_complete(storage.resolve(str(root)).child("train"))
    assert m["rows_out"] == 2 and m["details"]["resumed_from_step"] == 0
    assert checkpoint.content_hash(str(root / "train" / "model")) != before


def test_zero3_on_s3_exports_every_full_tensor(s3_bucket, ray_local, tiny_models, tmp_path):
    """ZeRO-3 with stage3_param_persistence_threshold 0 really partitions every parameter; the export
    gathers them on all ranks, so no tensor comes back empty (rank-0 save_pretrained would write (0,)).
    run_root on S3 (moto on 127.0.0.1): both ranks' checkpoints and the exported model land in the bucket.
    (One run for both: each alone costs a Ray Train run of about 25 s.)"""
    storage_cfg, bucket = s3_bucket
    cfg = load_config(
        REPO / "workflows" / "ci_small.yaml",
        [
            f"run.run_root=s3://{bucket}/runs/t",
            f"storage.endpoint_url={storage_cfg.endpoint_url}",
            f"storage.access_key_id={storage_cfg.access_key_id}",
            f"storage.secret_access_key={storage_cfg.secret_access_key}",
            "run.stages=[catalog, merit, train]",
            "catalog.num_groups=400",
            "merit.queries={train: 300, test: 100}",
            "merit.cold_start=false",
            f"train.base={tiny_models['qwen2_vl']}",
            "train.deepspeed=cluster/deepspeed/zero3.json",
            "train.data_workers=1",  # the processor in a Ray Data actor, as on a cluster
            "train.steps=6",
            "train.checkpoint_every=3",
            "train.batch_size=4",
            "train.validation_queries=4",  # every rank runs validation: ZeRO-3 gathers weights collectively
        ],
    )
    graph.run_graph(cfg)
    keys = {o["Key"] for o in storage.boto3_client(cfg.storage).list_objects_v2(Bucket=bucket)["Contents"]}
    assert "runs/t/train/_SUCCESS" in keys and "runs/t/train/model/model.safetensors" in keys
    assert any(k.startswith("runs/t/_checkpoints/train/") and k.endswith("state.json") for k in keys)
    root = tmp_path / "run"  # the stages' outputs, copied from the bucket for the checks below
    remote = storage.resolve(cfg.run.run_root, cfg.storage)
    for stage in ("catalog", "merit", "train"):
        (root / stage).mkdir(parents=True)
        pafs.copy_files(remote.child(stage).path, str(root / stage), source_filesystem=remote.fs)
    exported = dict(loader.load_model(str(root / "train" / "model")).named_parameters())
    base = dict(loader.load_model(str(tiny_models["qwen2_vl"])).named_parameters())
    assert exported.keys() == base.keys()
    for name, p in base.items():
        assert exported[name].shape == p.shape, name
    assert any(not torch.equal(exported[n], base[n]) for n in base)  # trained, not the initial weights
    metrics = json.loads((root / "train" / "metrics.json").read_text())
    assert metrics["validation"]["end"]["queries"] == 4
    assert_export_embeds_like_the_trained_model(root, metrics, "coral")


def test_clip_with_lora_and_accumulation_beside_an_mllm(ray_local, tiny_models, tmp_path):
    """mmret_clip with LoRA adapters (exported merged) and 2 micro-batches per optimizer step, and
    mmret_mllm trained on the same data, steps and seed, reported side by side."""
    root = tmp_path / "run"
    cfg = load_config(
        REPO / "workflows" / "ci_small.yaml",
        [
            f"run.run_root={root}",
            "run.stages=[catalog, merit, train]",
            "catalog.num_groups=400",
            "merit.queries={train: 300, test: 100}",
            "merit.cold_start=false",
            "train.model=mmret_clip",
            f"train.base={tiny_models['clip']}",
            "train.lora_rank=4",
            "train.lora_target_modules=[q_proj, v_proj]",
            "train.gradient_accumulation=2",
            "train.steps=4",
            "train.checkpoint_every=4",
            "train.batch_size=4",
            "train.validation_queries=8",
            f"train.compare=[{{model: mmret_mllm, base: {tiny_models['qwen2_vl']}}}]",
        ],
    )
    graph.run_graph(cfg)
    m = manifest.read_complete(storage.resolve(str(root)).child("train"))
    d = m["details"]
    assert d["model"] == "mmret_clip" and d["steps"] == 4 and d["optimizer_steps"] == 4
    assert set(d["losses_first_10"]) == {"loss", "contrastive_loss"}
    assert 0.2 < d["worker_peak_memory_gib"]["rss"] < 20  # a worker holds torch, the model, DeepSpeed
    assert set(d["side_by_side"]) == {"mmret_clip", "mmret_mllm"}
    for v in d["side_by_side"].values():
        assert v["start"]["queries"] == v["end"]["queries"] == 8
    metrics = json.loads((root / "train" / "metrics.json").read_text())
    exported = dict(loader.load_model(str(root / "train" / "model")).named_parameters())
    base = dict(loader.load_model(str(tiny_models["clip"])).named_parameters())
    assert exported.keys() == base.keys()  # merged: no adapter weights left
    changed = {n for n in base if not torch.equal(exported[n], base[n])}
    assert changed and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in changed), changed
    assert_export_embeds_like_the_trained_model(root, metrics, "mmret_clip")
    assert_export_embeds_like_the_trained_model(
        root, metrics["compare"][0], "mmret_mllm", "compare/mmret_mllm"
    )
