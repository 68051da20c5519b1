"""What the train and evaluate stages hand to tools outside the project, beside their own outputs.

- train: in each exported model dir, the model card ``README.md`` and ``coral_retriever.json``
  (``coral.models.card``), from the training table, the train section and the exported ``config.json``;
  the card's evaluation section says "not evaluated yet".
- evaluate: TREC files under ``evaluate/trec/`` (``coral.search.trec``): per ``evaluate.splits`` entry a
  qrels file of its queries' positives and one run file per model (trained, baseline); and, when it
  evaluated the train stage's export (``index.model: train``), that export's card gets the figures.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

import pyarrow as pa

from coral import checkpoint, storage
from coral import schemas as S
from coral.config import TrainConfig
from coral.models import card
from coral.search import trec
from coral.stages import heldout
from coral.stages.base import StageContext

COMPARE_NOTE = (
    "A comparison run (`train.compare`): the same data, steps and seed as the run's `train/model`; the "
    "evaluate stage scores `train/model` only."
)


def training_facts(ctx: StageContext, tables: dict[str, pa.Table], train_rows: int, sources: dict) -> dict:
    """The card's account of the data: per ``train.data`` stage the rows trained on (by source) and its
    held-out (``test``) rows; the training table's size; what ``merit.ood`` held out."""
    data = {}
    for stage, table in tables.items():
        by_source = sources["rows_by_source"][stage]
        data[stage] = {
            "train_rows": sum(by_source.values()),
            "held_out_rows": Counter(table[S.SPLIT].to_pylist()).get("test", 0),
            "by_source": by_source,
        }
    return {
        "run": ctx.config.run.name,
        "data": data,
        "training_rows": train_rows,
        "ood_held_out": sources.get("ood_held_out"),
    }


def model_spec(cfg: TrainConfig, out: storage.Location) -> dict:
    """``coral_retriever.json`` of the export at ``out`` (its ``config.json`` read, not its weights)."""
    model_config = storage.read_json(out.child("config.json"))
    with tempfile.TemporaryDirectory() as d:
        Path(d, "config.json").write_text(json.dumps(model_config))
        dim = checkpoint.embedding_dim(d)
    return card.describe(cfg.model, cfg.base, model_config, dim, cfg.max_image_tokens)


def write_model_card(
    cfg: TrainConfig, result: dict, out: storage.Location, facts: dict, compare: bool = False
) -> None:
    """The card and ``coral_retriever.json`` in the export at ``out``; ``result``: ``train.fit``'s."""
    settings = {
        "steps": result["steps"],
        "batch_size": cfg.batch_size,
        "num_workers": cfg.num_workers,
        "gradient_accumulation": cfg.gradient_accumulation,
        "effective_batch": cfg.batch_size * cfg.num_workers * cfg.gradient_accumulation,
        "hard_negatives": cfg.hard_negatives,
        "lr": cfg.lr,
        "lr_schedule": cfg.lr_schedule,
        "warmup_ratio": cfg.warmup_ratio,
        "temperature": cfg.temperature,
        "lora_rank": cfg.lora_rank,
        "deepspeed": cfg.deepspeed,
        "seed": cfg.seed,
    }
    facts = {**facts, "train": settings, "validation": result.get("validation")}
    card.write(out, model_spec(cfg, out), facts | ({"note": COMPARE_NOTE} if compare else {}))


def split_members(rows: list[dict], splits, ood: dict) -> dict[str, list[int]]:
    """Per ``evaluate.splits`` entry, the positions of its queries in ``rows`` (a query may be in several:
    ``test`` and an OOD label)."""
    of = [heldout.query_splits(r[S.QUERY_ID], r[S.SPLIT], ood) for r in rows]
    return {s: [i for i, names in enumerate(of) if s in names] for s in splits}


def after_evaluate(
    ctx: StageContext, rows: list[dict], ranked: dict, scores: dict, ood: dict, result: dict
) -> list[str]:
    """The TREC files of the evaluation (``ranked``/``scores``: per model, each query's hits, best first)
    and the train export's card updated with ``result`` (``metrics.json``); returns the TREC files."""
    out = ctx.stage_dir("evaluate").child("trec")
    storage.delete_tree(out)  # no file of an earlier evaluation's splits is left beside these
    names = trec.write(
        out,
        [r[S.QUERY_ID] for r in rows],
        [r[S.POSITIVE_IDS] for r in rows],
        split_members(rows, ctx.config.evaluate.splits, ood),
        ranked,
        scores,
    )
    if ctx.config.index.model == "train":
        card.update_evaluation(ctx.stage_dir("train").child("model"), result)
    return names
