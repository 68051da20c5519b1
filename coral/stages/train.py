"""train: a retriever trained with Ray Train (``TorchTrainer``) and DeepSpeed on the stages' triplets.

Training rows: the ``train`` split of every stage in ``train.data``, less those that touch a value
``merit.ood`` holds out (``coral.stages.heldout``); written to ``train/data/`` (the rows trained on) and
counted per stage and source in the manifest (``rows_by_source``). Validation: up to
``validation_queries`` held-out (``test`` split) MERIT queries against every test product, scored at the
start, at every checkpoint and at the end with the evaluation's metric code (the training curves' points). Checkpoints go to ``{run_root}/_checkpoints/train``
(outside the stage folder, so a rerun after an interruption resumes from the last one); the exported
Hugging Face dir of the final model goes to ``train/model/``, with its model card ``README.md`` and
``coral_retriever.json`` (``coral.stages.artifacts``). Units: ``rows_in`` counts training rows,
``rows_out`` training steps.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import ray

from coral import schemas as S
from coral import shipped, storage
from coral.catalog import lookup
from coral.config import Config, Resources, TrainConfig, section_hash_dict
from coral.errors import ConfigError
from coral.manifest import StageResult, stable_hash
from coral.models import loader
from coral.models.retrievers import BASES
from coral.stages import artifacts, heldout
from coral.stages.base import StageContext
from coral.train import curves, data
from coral.train.loop import STATE, train_loop


def deepspeed_config(cfg: TrainConfig) -> dict:
    path = shipped.deepspeed(cfg.deepspeed)  # a file, else the shipped one it names (zero2.json)
    try:
        ds = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"train.deepspeed: cannot read {cfg.deepspeed}: {type(e).__name__}: {e}") from None
    # the batch settings come from the train section; a JSON may say "auto" or repeat them, not differ
    for key, ours in (
        ("train_micro_batch_size_per_gpu", cfg.batch_size),
        ("gradient_accumulation_steps", cfg.gradient_accumulation),
    ):
        if ds.get(key, "auto") not in ("auto", ours):
            raise ConfigError(
                f"train.deepspeed: {cfg.deepspeed} sets {key}={ds[key]} but the train section gives {ours}; "
                'set it to "auto" in the JSON'
            )
    return ds


def resume_key(cfg: TrainConfig, inputs: dict[str, str]) -> str:
    """What a checkpoint must share with the run to be resumed from: the train section but the step budget
    and the resources, and the lineage hashes of its inputs (``inputs``: stage -> manifest hash). A longer
    run on the same data continues a shorter one; another model, setting or data starts over."""
    section = {k: v for k, v in section_hash_dict(cfg).items() if k != "steps"}
    return stable_hash({"train": section, "inputs": dict(sorted(inputs.items()))})


def latest_checkpoint(root, key: str) -> ray.train.Checkpoint | None:
    """The newest checkpoint under ``root`` whose state file carries ``key``, or None."""
    info = root.fs.get_file_info(pafs.FileSelector(root.path, allow_not_found=True, recursive=True))
    for state in sorted(
        (i for i in info if i.base_name == STATE), key=lambda i: i.mtime_ns or 0, reverse=True
    ):
        with root.fs.open_input_stream(state.path) as f:
            if json.loads(f.read()).get("resume_key") == key:
                return ray.train.Checkpoint(path=posixpath.dirname(state.path), filesystem=root.fs)
    return None


class TrainStage:
    name = "train"

    def inputs(self, config: Config) -> tuple[str, ...]:
        return (*config.train.data, "catalog")

    def section(self, config: Config) -> TrainConfig:
        return config.train

    def output(self, config: Config) -> pa.Schema:
        return S.TRIPLETS  # the training table it read (the model is under model/)

    def resources(self, config: Config) -> dict[str, Resources]:
        cfg = config.train
        workers = Resources(
            num_actors=cfg.num_workers,
            num_cpus=cfg.cpus_per_worker,
            num_gpus=1.0 if cfg.use_gpu else 0.0,
            accelerator_type=cfg.accelerator_type,
        )
        return {"workers": workers, **({"data": data.resources(cfg)} if cfg.data_workers else {})}

    def validate(self, config: Config) -> None:
        deepspeed_config(config.train)
        for cfg in runs(config.train):
            check_base(cfg)
        if (
            config.train.lora_rank
            and deepspeed_config(config.train).get("zero_optimization", {}).get("stage") == 3
        ):
            raise ConfigError("train: LoRA (lora_rank > 0) with ZeRO-3 is not supported; use a ZeRO-2 config")

    def run(self, ctx: StageContext) -> StageResult:
        tables = {
            s: storage.read_table(ctx.data(s)).select(list(S.TRIPLETS.names)) for s in ctx.config.train.data
        }
        rows = pa.concat_tables(tables.values())
        train, sources = training_table(ctx, tables)
        storage.write_parquet(ctx.data(self.name).child("part-00000.parquet"), train)
        cfg0 = ctx.config.train
        if train.num_rows < cfg0.batch_size * cfg0.num_workers * cfg0.gradient_accumulation:
            raise ConfigError(f"train: {train.num_rows} training rows, fewer than one step needs")
        held = [
            r
            for r in rows.filter(pc.equal(rows[S.SPLIT], "test")).to_pylist()
            if r[S.SOURCE] in ("merit", "import")
        ]
        held = held[: cfg0.validation_queries]
        catalog = lookup.read(ctx.root, [*lookup.PRODUCT, S.SPLIT])
        pool = [
            i
            for i, s in zip(catalog[S.ID].to_pylist(), catalog[S.SPLIT].to_pylist(), strict=True)
            if s == "test"
        ]
        needed = set(pool) | {i for r in held for i in r[S.QUERY_IMAGE_IDS]}
        held_catalog = catalog.filter(pa.array([i in needed for i in catalog[S.ID].to_pylist()]))
        shared = {
            "catalog": lookup.columns(catalog),
            "held_catalog": lookup.columns(held_catalog),
            "held": held,
            "pool": pool,
        }
        results, facts = [], artifacts.training_facts(ctx, tables, train.num_rows, sources)
        for i, cfg in enumerate(runs(cfg0)):
            out = ctx.stage_dir(self.name).child(*(("model",) if i == 0 else ("compare", cfg.model)))
            results.append(fit(ctx, cfg, train, shared, out))
            artifacts.write_model_card(cfg, results[-1], out, facts, compare=i > 0)  # the card, its JSON
        # the loss history and the export check's probe go to metrics.json only, not the manifest
        extra = [{k: r.pop(k) for k in ("history", "probe")} for r in results]
        for i, (r, e) in enumerate(zip(results, extra, strict=True)):
            title = f"{r['model']} on {posixpath.basename(r['base'].rstrip('/'))}"
            name = f"curves_{r['model']}.png" if i else "curves.png"  # a compare entry's apart
            storage.write_bytes(
                ctx.stage_dir(self.name).child(name), curves.png(e["history"], r["validation"], title)
            )
        first = results[0]
        details = dict(first) | sources
        if len(results) > 1:
            details["compare"] = results[1:]
            details["side_by_side"] = {
                r["model"]: {w: r["validation"].get(w) for w in ("start", "end")} for r in results
            }
        metrics = {**extra[0], **details}
        if len(results) > 1:
            metrics["compare"] = [{**r, **e} for r, e in zip(results[1:], extra[1:], strict=True)]
        storage.write_json(ctx.stage_dir(self.name).child("metrics.json"), metrics)
        return StageResult(train.num_rows, first["steps"], {}, details=details, work_s=work_s(cfg0, results))


def work_s(cfg: TrainConfig, results: list[dict]) -> float | None:
    """The seconds that grow with the steps (``coral.cost``): each model's steps after its first (which
    holds the pipeline's start-up) at the samples/s it measured, checkpoints between them included."""
    total = 0.0
    for r in results:
        steps = r["steps"] - (r.get("resumed_from_step") or 0) - 1
        if steps > 0 and not r.get("samples_per_s"):
            return None
        if steps > 0:
            samples = steps * cfg.batch_size * cfg.gradient_accumulation * cfg.num_workers
            total += samples / r["samples_per_s"]
    return total


def training_table(ctx: StageContext, tables: dict[str, pa.Table]) -> tuple[pa.Table, dict]:
    """The rows trained on, of every ``train.data`` stage: its ``train`` split, less the rows that touch
    a value ``merit.ood`` holds out; and their counts per stage and source (and per OOD axis dropped)."""
    axes = heldout.ood_axes(ctx.config)
    products = heldout.product_info(ctx) if axes else {}
    kept, by_source, dropped = [], {}, Counter()
    for stage, table in tables.items():
        train = table.filter(pc.equal(table[S.SPLIT], "train"))
        if axes:
            rows, out = heldout.training_rows(train.to_pylist(), axes, products)
            train = pa.Table.from_pylist(rows, schema=S.TRIPLETS)
            dropped.update(out)
        kept.append(train)
        by_source[stage] = dict(sorted(Counter(train[S.SOURCE].to_pylist()).items()))
    details = {"rows_by_source": by_source}
    if axes:
        details["ood_held_out"] = {
            "axes": {a: list(v) for a, v in axes.items()},
            "rows_dropped": dict(dropped),
        }
    return pa.concat_tables(kept), details


def runs(cfg: TrainConfig) -> list[TrainConfig]:
    """The configured model, then each ``compare`` entry: same data, steps and seed."""
    others = [
        dataclasses.replace(cfg, model=c["model"], base=c.get("base", cfg.base), compare=())
        for c in cfg.compare
    ]
    return [dataclasses.replace(cfg, compare=()), *others]


def check_base(cfg: TrainConfig) -> None:
    kind = loader.model_type(cfg.base)
    if kind not in BASES[cfg.model]:
        raise ConfigError(
            f"train.base: '{cfg.base}' is '{kind}'; {cfg.model} needs one of {', '.join(BASES[cfg.model])}"
        )


def fit(ctx: StageContext, cfg: TrainConfig, train: pa.Table, shared: dict, out) -> dict:
    """Train one model with Ray Train; export it to ``out``; its figures."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = dataclasses.replace(cfg, base=loader.resolve(cfg.base))  # workers' cwd differs
    key = resume_key(cfg, {i: ctx.manifest(i)["hash"] for i in TrainStage().inputs(ctx.config)})
    checkpoints = ctx.root.child("_checkpoints", "train")
    if not checkpoints.is_s3:
        checkpoints.fs.create_dir(checkpoints.path, recursive=True)
    catalog = [ray.put(shared["catalog"])]  # in a list: a bare ref would be resolved when passed
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "train": cfg,
            "deepspeed": deepspeed_config(cfg),
            "catalog": shared["held_catalog"],
            "validation_rows": shared["held"],
            "validation_pool": shared["pool"],
            "resume_key": key,
            # Ray Train V2 hands a checkpoint to restarted workers only; a rerun passes its own
            "resume_from": latest_checkpoint(checkpoints, key),
            "train_catalog": catalog,  # [ref]: the products the rows name, for data_workers: 0
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **cfg.resources},
            accelerator_type=cfg.accelerator_type or None,
        ),
        run_config=RunConfig(
            name=f"{cfg.model}-{key[:12]}",  # one folder per resumable run
            storage_path=checkpoints.path,
            storage_filesystem=checkpoints.fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        ),
        datasets={"train": data.pipeline(train, catalog, cfg)},
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        state = json.loads((Path(d) / "state.json").read_text())
        if not out.is_s3:
            out.fs.create_dir(out.path, recursive=True)
        pafs.copy_files(str(Path(d) / "export"), out.path, destination_filesystem=out.fs)
        board = ctx.stage_dir("train").child(
            curves.FOLDER, cfg.model
        )  # tensorboard --logdir <run_root>/train
        if (Path(d) / curves.FOLDER).is_dir():
            if not board.is_s3:
                board.fs.create_dir(board.path, recursive=True)
            pafs.copy_files(str(Path(d) / curves.FOLDER), board.path, destination_filesystem=board.fs)
    history = state["history"]
    first, last = history[: min(10, len(history))], history[-min(10, len(history)) :]
    return {
        "model": cfg.model,
        "base": cfg.base,
        "steps": state["step"],
        "optimizer_steps": state.get("optimizer_steps"),
        "resumed_from_step": state.get("resumed_from_step", 0),
        "validation": state["validation"],
        "samples_per_s": state.get("samples_per_s"),
        "worker_seconds": state.get(
            "worker_seconds"
        ),  # rank 0, after its first step: data wait, forward, ...
        "worker_peak_memory_gib": state.get("worker_peak_memory_gib"),
        "losses_first_10": {k: round(sum(h[k] for h in first) / len(first), 4) for k in first[0]},
        "losses_last_10": {k: round(sum(h[k] for h in last) / len(last), 4) for k in last[0]},
        "export": out.uri,
        "curves": board.uri,
        "history": history,
        "probe": state.get("probe"),
    }
