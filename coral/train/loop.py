"""The Ray Train worker function: DeepSpeed inside, triplets from Ray Data, checkpoints every N steps.

Each worker loads the base model through the one loader (same seed, so identical weights), wraps it
(with Coral's reconstruction heads for ``coral``) and calls ``deepspeed.initialize`` with torch AdamW and
the config's DeepSpeed JSON. It reads its shard of the triplets with ``get_dataset_shard``, equal-sized
batches (``drop_last``) so every worker takes part in every gather. Every ``checkpoint_every`` steps all
workers save a DeepSpeed checkpoint and report it; the last one also holds ``export/``, a Hugging Face dir
(model + processor, no reconstruction heads) written for every ZeRO stage (ZeRO-3: the 16-bit weights
gathered on all ranks). A restarted worker resumes from the checkpoint Ray Train hands it.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import time

import torch
from torch import nn

from coral import schemas as S
from coral.config import TrainConfig
from coral.train import step
from coral.train.coral import CoralHeads

STATE = "state.json"
TAG = "ckpt"


class Retriever(nn.Module):
    """The embedding model and, for Coral, its training-only heads (never exported)."""

    def __init__(self, model: nn.Module, heads: CoralHeads | None):
        super().__init__()
        self.model, self.heads = model, heads


def products_from(catalog: dict) -> step.Products:
    """Titles and lazily decoded images of the catalog (a pyarrow table's columns as lists)."""
    from PIL import Image

    cache: dict[str, Image.Image] = {}
    raw = dict(zip(catalog[S.ID], catalog[S.IMAGE], strict=True))

    def image(pid: str):
        if pid not in cache:
            cache[pid] = Image.open(io.BytesIO(raw[pid])).convert("RGB")
        return cache[pid]

    return step.Products(dict(zip(catalog[S.ID], catalog[S.TITLE], strict=True)), image)


def export(engine, processor, out: str, zero_stage: int, rank: int) -> None:
    """A Hugging Face dir of the embedding model alone (the heads left out)."""
    if zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # every rank takes part; rank 0 gets it
        if rank == 0:
            model = engine.module.model
            weights = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
            model.save_pretrained(out, state_dict=weights)
    elif rank == 0:
        engine.module.model.save_pretrained(out)
    if rank == 0:
        processor.save_pretrained(out)


def train_loop(config: dict) -> None:
    import deepspeed
    import ray.train

    from coral.models import loader

    cfg: TrainConfig = config["train"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    model = loader.load_model(cfg.base)
    processor = loader.load_processor(cfg.base)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    heads = CoralHeads(model.config.text_config.hidden_size) if cfg.model == "coral" else None
    module = Retriever(model.train(), heads)
    ds_config = dict(config["deepspeed"], train_micro_batch_size_per_gpu=cfg.batch_size)
    optimizer = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
    zero_stage = engine.zero_optimization_stage()

    state = {"step": 0, "history": [], "validation": {}, "resume_key": config["resume_key"]}
    checkpoint = ray.train.get_checkpoint() or config.get("resume_from")  # a restart, else a rerun's
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            engine.load_checkpoint(d, tag=TAG)
            with open(os.path.join(d, STATE)) as f:
                state = json.load(f)
        state["resumed_from_step"] = state["step"]
    products = products_from(config["catalog"])
    special = set(processor.tokenizer.all_special_ids)
    held_out, pool = config["validation_rows"], config["validation_pool"]
    if state["step"] == 0 and rank == 0 and held_out:
        state["validation"]["start"] = step.validate(engine.module.model, processor, held_out, pool, products)

    shard = ray.train.get_dataset_shard("train")

    def batches():
        while True:  # epochs until the step budget is spent; every worker takes the same number of steps
            for b in shard.iter_batches(batch_size=cfg.batch_size, batch_format="pyarrow", drop_last=True):
                yield b.to_pylist()

    rows = batches()
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    started, samples, first = time.perf_counter(), 0, state["step"]

    def save(last: bool) -> None:
        elapsed = time.perf_counter() - started
        state["samples_per_s"] = round(samples * ctx.get_world_size() / elapsed, 3) if samples else None
        if last and rank == 0 and held_out:
            state["validation"]["end"] = step.validate(
                engine.module.model, processor, held_out, pool, products
            )
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(tmp, tag=TAG)
            if last:
                export(engine, processor, os.path.join(tmp, "export"), zero_stage, rank)
            if rank == 0:
                with open(os.path.join(tmp, STATE), "w") as f:
                    json.dump(state, f)
            metrics = {"step": state["step"], **(state["history"][-1] if state["history"] else {})}
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    for n in range(first, cfg.steps):
        out = step.losses(
            engine.module.model,
            processor,
            next(rows),
            products,
            cfg.hard_negatives,
            cfg,
            engine.module.heads,
            special,
            generator,
        )
        engine.backward(out["loss"])
        engine.step()
        samples += cfg.batch_size
        state["step"] = n + 1
        state["history"].append({k: round(v.item(), 5) for k, v in out.items()})
        if state["step"] % cfg.checkpoint_every == 0 or state["step"] == cfg.steps:
            save(last=state["step"] == cfg.steps)
    if first >= cfg.steps:  # resumed from a finished run: export again
        save(last=True)
