"""train: a retriever trained with Ray Train (``TorchTrainer``) and DeepSpeed on the stages' triplets.

Training rows: the ``train`` split of every stage in ``train.data``. Validation: up to
``validation_queries`` held-out (``test`` split) MERIT queries against every test product, scored at the
start and the end with the evaluation's metric code. Checkpoints go to ``{run_root}/_checkpoints/train``
(outside the stage folder, so a rerun after an interruption resumes from the last one); the exported
Hugging Face dir of the final model goes to ``train/model/``. Units: ``rows_in`` counts training rows,
``rows_out`` training steps.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from coral import schemas as S
from coral import storage
from coral.config import Config, TrainConfig
from coral.errors import ConfigError
from coral.manifest import StageResult, stable_hash
from coral.stages.base import StageContext

REPO = Path(__file__).resolve().parents[2]


def deepspeed_config(cfg: TrainConfig) -> dict:
    path = Path(cfg.deepspeed)
    path = path if path.is_absolute() or path.exists() else REPO / path
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"train.deepspeed: cannot read {cfg.deepspeed}: {type(e).__name__}: {e}") from None


def resume_key(cfg: TrainConfig) -> str:
    """What a checkpoint must share with the run to be resumed from: everything but the step budget and
    the resources (a longer run continues a shorter one; a different model or data starts over)."""
    from coral.config import section_hash_dict

    return stable_hash({k: v for k, v in section_hash_dict(cfg).items() if k != "steps"})


def latest_checkpoint(root, key: str) -> ray.train.Checkpoint | None:
    """The newest checkpoint under ``root`` whose state file carries ``key``, or None."""
    from coral.train.loop import STATE

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

    def validate(self, config: Config) -> None:
        from coral.models import loader

        deepspeed_config(config.train)
        kind = loader.model_type(config.train.base)
        if kind not in ("qwen2_vl", "qwen2_5_vl"):
            raise ConfigError(
                f"train.base: '{config.train.base}' is '{kind}'; {config.train.model} needs Qwen2-VL or Qwen2.5-VL"
            )

    def run(self, ctx: StageContext) -> StageResult:
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        from coral.models import loader
        from coral.train.loop import train_loop

        cfg = dataclasses.replace(
            ctx.config.train, base=loader.resolve(ctx.config.train.base)
        )  # workers' cwd differs
        tables = [pq.read_table(ctx.data(s).path, filesystem=ctx.data(s).fs) for s in cfg.data]
        rows = pa.concat_tables(tables)
        train = rows.filter(pc.equal(rows[S.SPLIT], "train"))
        if train.num_rows < cfg.batch_size * cfg.num_workers:
            raise ConfigError(f"train: {train.num_rows} training rows, fewer than one step needs")
        held = [r for r in rows.filter(pc.equal(rows[S.SPLIT], "test")).to_pylist() if r[S.SOURCE] == "merit"]
        src = ctx.data("catalog")
        catalog = pq.read_table(src.path, filesystem=src.fs, columns=[S.ID, S.TITLE, S.IMAGE, S.SPLIT])
        pool = [
            i
            for i, s in zip(catalog[S.ID].to_pylist(), catalog[S.SPLIT].to_pylist(), strict=True)
            if s == "test"
        ]
        checkpoints = ctx.root.child("_checkpoints", "train")
        if not checkpoints.is_s3:
            checkpoints.fs.create_dir(checkpoints.path, recursive=True)
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={
                "train": cfg,
                "deepspeed": deepspeed_config(cfg),
                "catalog": {k: catalog[k].to_pylist() for k in (S.ID, S.TITLE, S.IMAGE)},
                "validation_rows": held[: cfg.validation_queries],
                "validation_pool": pool,
                "resume_key": resume_key(cfg),
                # Ray Train V2 hands a checkpoint to restarted workers only; a rerun passes its own
                "resume_from": latest_checkpoint(checkpoints, resume_key(cfg)),
            },
            scaling_config=ScalingConfig(
                num_workers=cfg.num_workers,
                use_gpu=cfg.use_gpu,
                resources_per_worker={"CPU": cfg.cpus_per_worker},
            ),
            run_config=RunConfig(
                name="train",
                storage_path=checkpoints.path,
                storage_filesystem=checkpoints.fs,
                failure_config=FailureConfig(max_failures=cfg.max_failures),
            ),
            datasets={"train": ray.data.from_arrow(train.select(list(S.TRIPLETS.names)))},
        )
        result = trainer.fit()
        with result.checkpoint.as_directory() as d:
            state = json.loads((Path(d) / "state.json").read_text())
            out = ctx.stage_dir(self.name).child("model")
            if not out.is_s3:
                out.fs.create_dir(out.path, recursive=True)
            pafs.copy_files(str(Path(d) / "export"), out.path, destination_filesystem=out.fs)
        history = state["history"]
        first, last = history[: min(10, len(history))], history[-min(10, len(history)) :]
        details = {
            "model": cfg.model,
            "resumed_from_step": state.get("resumed_from_step", 0),
            "validation": state["validation"],
            "samples_per_s": state.get("samples_per_s"),
            "losses_first_10": {k: round(sum(h[k] for h in first) / len(first), 4) for k in first[0]},
            "losses_last_10": {k: round(sum(h[k] for h in last) / len(last), 4) for k in last[0]},
            "export": out.uri,
        }
        storage.write_json(ctx.stage_dir(self.name).child("metrics.json"), {"history": history, **details})
        return StageResult(train.num_rows, state["step"], {}, details=details)
