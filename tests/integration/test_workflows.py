"""Every shipped cluster workflow, run here in miniature through ``workflows/overlays/local.yaml`` (tiny models, CPU
resources, local storage, small sizes), through every stage including ``serve``, on files written the way
a user would bring them; asserts on what each stage wrote, and that held-out data never reached training."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from coral import graph, manifest, storage
from coral import schemas as S
from coral.config import load_config
from ray_jobs import run as command
from tests.conftest import REPO, annotate_override, encoders_override, free_port

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]

OVERLAY = REPO / "workflows" / "overlays" / "local.yaml"
COLOURS = {"red": (200, 30, 30), "green": (30, 160, 60), "blue": (30, 60, 200), "yellow": (220, 200, 40)}
SHAPES = ("circle", "square", "triangle")


def tiny(tiny_models) -> list[str]:
    """Where this session's tiny models are (the overlay names ``models/tiny/...``)."""
    return [
        encoders_override(tiny_models, ("clip_image", "dinov2", "caption")),
        *annotate_override(tiny_models),
        f"train.base={tiny_models['qwen2_vl']}",
        "train.steps=5",  # the overlay's 20 show nothing more here: the evaluation is asserted on structure
        "train.checkpoint_every=5",
    ]


def run(capsys, workflow: str, overrides: list[str]) -> tuple[int, str]:
    """``python -m ray_jobs.run --config workflows/{workflow}.yaml --overlay workflows/overlays/local.yaml
    ...`` as a user types it, its ``main`` in this process: (exit code, what it wrote to stderr)."""
    argv = ["--config", str(REPO / "workflows" / f"{workflow}.yaml"), "--overlay", str(OVERLAY)]
    capsys.readouterr()
    code = command.main([*argv, *overrides])
    return code, capsys.readouterr().err


def manifests(root: Path, stages) -> dict[str, dict]:
    out = {}
    for stage in stages:
        assert (root / stage / "_SUCCESS").exists(), stage
        out[stage] = manifest.read_complete(storage.resolve(str(root / stage)))
    return out


def rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def draw(shape: str, colour: tuple, seed: int) -> bytes:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (48, 48), tuple(int(x) for x in rng.integers(200, 256, 3)))
    d = ImageDraw.Draw(img)
    x, y = (int(v) for v in rng.integers(4, 14, 2))
    box = (x, y, x + 30, y + 30)
    if shape == "circle":
        d.ellipse(box, fill=colour)
    elif shape == "square":
        d.rectangle(box, fill=colour)
    else:
        d.polygon([(x, y + 30), (x + 15, y), (x + 30, y + 30)], fill=colour)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def image_folder(folder: Path, n: int = 64) -> Path:
    """``n`` PNGs under ``images/`` and ``products.jsonl`` of ``{id, title (the caption), image}``."""
    (folder / "images").mkdir(parents=True)
    lines = []
    for i in range(n):
        colour, shape = list(COLOURS)[i % 4], SHAPES[(i // 4) % 3]
        (folder / "images" / f"img{i:03d}.png").write_bytes(draw(shape, COLOURS[colour], i))
        caption = f"a {colour} {shape} on a pale background, photo {i % 7}"
        lines.append(json.dumps({"id": f"img{i:03d}", "title": caption, "image": f"images/img{i:03d}.png"}))
    (folder / "products.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "products.jsonl"


def test_the_command_line_merges_the_overlay_over_the_workflow(capsys):
    """``--overlay`` reaches the config: a bad key anywhere is reported against the workflow and the
    overlay, exit code 2, before Ray starts."""
    code, err = run(capsys, "megapairs", ["train.no_such_key=1"])
    assert code == 2, err[-2000:]
    assert "workflows/megapairs.yaml with" in err and "overlays/local.yaml" in err
    assert "train.no_such_key" in err


def test_megapairs_yaml_runs_in_miniature_and_evaluates_held_out_images_only(
    ray_local, tiny_models, tmp_path
):
    products = image_folder(tmp_path / "data")
    root = tmp_path / "run"
    overrides = [
        f"run.run_root={root}",
        f"catalog.products={products}",
        "catalog.test_fraction=0.3",  # 64 images: a held-out part large enough to pair among itself
        f"serve.port={free_port()}",
        *tiny(tiny_models),
    ]
    config = load_config(REPO / "workflows" / "megapairs.yaml", overrides, [OVERLAY])
    assert [r.status for r in graph.run_graph(config)] == ["ran"] * len(config.run.stages)
    m = manifests(root, config.run.stages)
    for stage in ("catalog", "embed", "annotate", "index", "evaluate", "serve"):
        assert m[stage]["rows_in"] == m[stage]["rows_out"] + m[stage]["rows_rejected"], stage
    assert m["mine"]["rows_in"] == m["mine"]["details"]["queries_with_pairs"] + m["mine"]["rows_rejected"]
    assert (
        sum(n for s in m["train"]["details"]["rows_by_source"].values() for n in s.values())
        == m["train"]["rows_in"]
    )

    catalog = rows(root / "catalog" / "data")
    held = {p[S.ID] for p in catalog if p[S.SPLIT] == "test"}
    assert 0 < len(held) < len(catalog)
    pairs = rows(root / "mine" / "data")
    for p in pairs:  # a pair and its negatives stay inside one split
        named = {p[S.QUERY_ID], p[S.TARGET_ID], *p[S.HARD_NEGATIVE_IDS]}
        assert (named <= held) if p[S.SPLIT] == "test" else not (named & held), p
    assert {p[S.SPLIT] for p in pairs} == {"train", "test"}
    triplets = rows(root / "annotate" / "data")
    held_queries = {t[S.QUERY_ID] for t in triplets if t[S.SPLIT] == "test"}
    assert held_queries
    trained = rows(root / "train" / "data")
    touched = {
        i for t in trained for i in (*t[S.QUERY_IMAGE_IDS], *t[S.POSITIVE_IDS], *t[S.HARD_NEGATIVE_IDS])
    }
    assert trained and not touched & held  # no held-out image is a training query, positive or negative
    assert {t[S.SPLIT] for t in trained} == {"train"}

    metrics = json.loads((root / "evaluate" / "metrics.json").read_text())
    assert metrics["metrics"][:4] == ["mAP@5", "mAP@10", "mAP@25", "mAP@50"]
    for model in ("trained", "baseline"):
        assert metrics["models"][model]["queries"] == len(held_queries)
        assert 0 <= metrics["models"][model]["mAP@5"] <= metrics["models"][model]["Recall@50"] <= 1
    evaluated = rows(root / "evaluate" / "data")
    assert {e[S.QUERY_ID] for e in evaluated} == held_queries  # exactly the held-out instructions
    pool = {c[S.ID] for c in rows(root / "index" / "data")}
    assert pool == held  # searched against the held-out image pool only
    assert all(set(e["top_ids"]) <= held for e in evaluated)
    assert len(m["serve"]["details"]["examples"]) == m["serve"]["rows_out"] > 0


def merit_release(ray_local, folder: Path) -> Path:
    """MERIT's released layout (queries-{train,test}.json, candidates-{train,test}.json, images/), written
    by the project's own MERIT export of a synthetic catalog."""
    cfg = load_config(
        REPO / "workflows" / "ci_small.yaml",
        [
            f"run.run_root={folder / 'source'}",
            "run.stages=[catalog, merit]",
            "catalog.num_groups=120",
            "merit.queries={train: 200, test: 200}",
            "merit.max_rate=0.15",  # 90 test products over 14 classes: 2 positives need more than 5%
            "merit.export=true",
        ],
    )
    graph.run_graph(cfg)
    return folder / "source" / "merit" / "export"


def test_merit_yaml_runs_in_miniature_on_merits_protocol(ray_local, tiny_models, tmp_path):
    export = merit_release(ray_local, tmp_path)
    names = sorted(p.name for p in export.iterdir())
    assert names == [
        "candidates-test.json",
        "candidates-train.json",
        "images",
        "queries-test.json",
        "queries-train.json",
        "test.jsonl",  # the same queries as {query, pos, neg} JSON lines (FlagEmbedding's keys)
        "train.jsonl",
    ]
    root = tmp_path / "run"
    overrides = [
        f"run.run_root={root}",
        f"catalog.products={export / 'candidates-train.json'}",
        f"catalog.test_products={export / 'candidates-test.json'}",
        f"imports.queries={export / 'queries-train.json'}",
        f"imports.candidates={export / 'candidates-train.json'}",
        f"imports.test_queries={export / 'queries-test.json'}",
        f"imports.test_candidates={export / 'candidates-test.json'}",
        f"serve.port={free_port()}",
        *tiny(tiny_models),
    ]
    config = load_config(REPO / "workflows" / "merit.yaml", overrides, [OVERLAY])  # in this process's Ray
    assert [r.status for r in graph.run_graph(config)] == ["ran"] * len(config.run.stages)
    m = manifests(root, config.run.stages)
    for stage in ("catalog", "import_triplets", "index", "evaluate", "serve"):
        assert m[stage]["rows_in"] == m[stage]["rows_out"] + m[stage]["rows_rejected"], stage

    test_queries = json.loads((export / "queries-test.json").read_text())
    test_products = {str(c["id"]) for c in json.loads((export / "candidates-test.json").read_text())}
    train_queries = json.loads((export / "queries-train.json").read_text())
    assert m["import_triplets"]["rows_in"] == len(test_queries) + len(train_queries)
    assert m["import_triplets"]["rows_rejected"] == 0  # the export names only its own products
    # MERIT's protocol: every test query, against the whole test candidate pool
    metrics = json.loads((root / "evaluate" / "metrics.json").read_text())
    assert metrics["metrics"] == ["R@1", "R@5", "R@10", "MRR@10"]
    assert metrics["models"]["trained"]["queries"] == len(test_queries)
    evaluated = rows(root / "evaluate" / "data")
    assert {e[S.QUERY_ID] for e in evaluated} == {str(q["id"]) for q in test_queries}
    assert {c[S.ID] for c in rows(root / "index" / "data")} == test_products
    trained = rows(root / "train" / "data")
    assert len(trained) == len(train_queries) and {t[S.SPLIT] for t in trained} == {"train"}
    touched = {
        i for t in trained for i in (*t[S.QUERY_IMAGE_IDS], *t[S.POSITIVE_IDS], *t[S.HARD_NEGATIVE_IDS])
    }
    assert not touched & test_products  # no test product reaches training
    assert len(m["serve"]["details"]["examples"]) == m["serve"]["rows_out"] > 0
