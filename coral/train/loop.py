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

import json
import os
import resource
import shutil
import tempfile
import time

import torch
from torch import nn

from coral import schemas as S
from coral.catalog import lookup
from coral.config import TrainConfig
from coral.models import loader, retrievers
from coral.models.coral import CoralHeads
from coral.train import curves, data, step

STATE = "state.json"
TIMED = ("data_wait", "forward", "backward", "optimizer")


def peak_memory_gib() -> dict:
    """This worker's peak resident memory, and its GPU's peak allocation when it has one."""
    out = {"rss": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}  # KiB on Linux
    if torch.cuda.is_available():
        out["gpu"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return out


TAG = "ckpt"


class Retriever(nn.Module):
    """The embedding model and, for Coral, its training-only heads (never exported)."""

    def __init__(self, model: nn.Module, heads: CoralHeads | None):
        super().__init__()
        self.model, self.heads = model, heads


def export(engine, processor, out: str, zero_stage: int, rank: int, lora=None) -> None:
    """A Hugging Face dir of the embedding model alone (the heads left out; LoRA merged into the weights)."""
    if zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # every rank takes part; rank 0 gets it
        if rank == 0:
            model = engine.module.model
            weights = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
            model.save_pretrained(out, state_dict=weights)
    elif rank == 0:
        (lora.merge_and_unload() if lora is not None else engine.module.model).save_pretrained(out)
    if rank == 0:
        processor.save_pretrained(out)


@torch.no_grad()
def probe(model, retriever, rows: list[dict], pool: list[str], products, n: int = 4) -> dict:
    """Embeddings of a few held-out queries and candidates by the in-memory model, kept with the final
    checkpoint so the export can be checked against them (the reloaded model must embed alike)."""
    was_training = model.training
    model.eval()
    q = [retrievers.query_features(retriever, r, products) for r in rows[:n]]
    c = [retrievers.candidate_features(retriever, i, products) for i in pool[:n]]
    out = {
        "query_ids": [r[S.QUERY_ID] for r in rows[:n]],
        "candidate_ids": list(pool[:n]),
        "queries": step.embed_all(model, retriever, q).float().tolist(),
        "candidates": step.embed_all(model, retriever, c).float().tolist(),
    }
    model.train(was_training)
    return out


def scalars_to_buffers(model: nn.Module) -> list[str]:
    """0-dim parameters (CLIP's logit_scale, SigLIP's logit_bias) become buffers of the same name: the
    retrievers' loss has its own temperature, and DeepSpeed cannot broadcast a 0-dim tensor on CPU. The
    state dict, so the export, keeps them unchanged."""
    moved = []
    for mod_name, module in model.named_modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.dim() == 0:
                del module._parameters[name]
                module.register_buffer(name, p.detach().clone())
                moved.append(f"{mod_name}.{name}".lstrip("."))
    return moved


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """The learning rate at optimizer step ``step`` over ``cfg.lr``: a linear warm-up over ``warmup_ratio``
    of the steps, then ``lr_schedule`` (linear to 0 at the last step, half a cosine, or constant)."""
    import math

    warmup = int(cfg.warmup_ratio * cfg.steps)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if cfg.lr_schedule == "constant":
        return 1.0
    done = (step - warmup) / max(1, cfg.steps - warmup)
    return max(0.0, 1.0 - done) if cfg.lr_schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * done))


def schedule(optimizer, cfg: TrainConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))


def with_lora(model, cfg: TrainConfig):
    """(the model to train, the peft wrapper or None): LoRA adapters on ``lora_target_modules`` when
    ``lora_rank`` > 0, everything else frozen; the model keeps its own class, so encoding is unchanged."""
    if cfg.lora_rank == 0:
        return model, None
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(
        model,
        LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.lora_target_modules)),
    )
    return wrapped.get_base_model(), wrapped


def train_loop(config: dict) -> None:
    # nothing here compiles; DeepSpeed's ZeRO optimizer check imports its Muon optimizer, whose module-level
    # torch.compile loads the inductor (0.8-1.2 s a worker on 2 cores). A runtime env may still set it to 0
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    import deepspeed
    import ray.train

    cfg: TrainConfig = config["train"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    # the rows start arriving while the model loads: as many batches as the run's steps take at most (the
    # pipeline holds that many per worker; a resumed run takes fewer)
    streamed_rows = data.Prefetch(
        ray.train.get_dataset_shard("train"), cfg.batch_size, cfg.steps * cfg.gradient_accumulation
    )
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    model = loader.load_model(cfg.base)
    processor = loader.load_processor(cfg.base)
    retriever = retrievers.make(cfg.model, processor, cfg.max_image_tokens)
    scalars_to_buffers(model)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable()
    model, lora = with_lora(model, cfg)
    heads = CoralHeads(model.config.text_config.hidden_size) if cfg.model == "coral" else None
    module = Retriever(model.train(), heads)
    ds_config = dict(
        config["deepspeed"],
        train_micro_batch_size_per_gpu=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation,
    )
    ds_config.pop("train_batch_size", None)  # DeepSpeed derives it: micro batch x accumulation x workers
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = schedule(optimizer, cfg)  # stepped by DeepSpeed with the optimizer, saved in its checkpoints
    engine, *_ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    zero_stage = engine.zero_optimization_stage()

    state = {"step": 0, "history": [], "validation": {}, "resume_key": config["resume_key"]}
    log_dir = tempfile.mkdtemp(prefix="coral-curves-")
    checkpoint = ray.train.get_checkpoint() or config.get("resume_from")  # a restart, else a rerun's
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            engine.load_checkpoint(d, tag=TAG)
            with open(os.path.join(d, STATE)) as f:
                state = json.load(f)
            curves.restore(d, log_dir)
        state["resumed_from_step"] = state["step"]
    board = (
        curves.Curves(
            log_dir,
            cfg.mlflow_tracking_uri,
            cfg.mlflow_experiment,
            f"{cfg.model}-{config['resume_key'][:12]}",
        )
        if rank == 0
        else None
    )
    products = lookup.products_from(config["catalog"])  # the held-out queries' and pool's products
    special = set(processor.tokenizer.all_special_ids)
    held_out, pool = config["validation_rows"], config["validation_pool"]
    # under ZeRO-3 a forward gathers partitioned weights collectively: every rank runs it, rank 0 records
    evaluates = bool(held_out) and (rank == 0 or zero_stage == 3)

    def validate() -> dict:
        return step.validate(engine.module.model, retriever, held_out, pool, products)

    if state["step"] == 0 and evaluates:
        state["validation"]["start"] = validate()

    inline = cfg.data_workers == 0  # the rows arrive as they are: this worker runs the processor
    streamed = lookup.products_from(ray.get(config["train_catalog"][0])) if inline else None
    featurize = data.Featurizer(retriever, streamed, cfg.hard_negatives)
    rows = map(featurize, streamed_rows)  # every worker takes the same number of steps
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    started, samples, first = time.perf_counter(), 0, state["step"]
    seconds = dict.fromkeys(TIMED, 0.0)

    def save(last: bool) -> None:
        elapsed = time.perf_counter() - started
        state["samples_per_s"] = round(samples * ctx.get_world_size() / elapsed, 3) if samples else None
        state["worker_seconds"] = {k: round(v, 3) for k, v in seconds.items()}  # rank 0's
        state["worker_peak_memory_gib"] = peak_memory_gib()  # rank 0's; every rank holds the same
        if last and evaluates:
            state["validation"]["end"] = validate()
            state["probe"] = probe(engine.module.model, retriever, held_out, pool, products)
        elif evaluates:  # every checkpoint: the training curves' validation points between start and end
            state["validation"].setdefault("during", []).append({"step": state["step"], **validate()})
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(tmp, tag=TAG)
            if last:
                export(engine, processor, os.path.join(tmp, "export"), zero_stage, rank, lora)
            if rank == 0:
                with open(os.path.join(tmp, STATE), "w") as f:
                    json.dump(state, f)
                board.save(tmp)
            metrics = {"step": state["step"], **(state["history"][-1] if state["history"] else {})}
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    window = {"started": time.perf_counter(), "samples": 0}

    def log(n: int) -> None:
        """Every ``log_every`` steps: the window's mean loss terms, the learning rate, the gradient norm
        and samples/s (all workers), to Ray Train and the curves."""
        recent = state["history"][-cfg.log_every :]
        values = {k: sum(h[k] for h in recent) / len(recent) for k in recent[0]}
        norm = engine.get_global_grad_norm()
        values |= {
            "lr": window["lr"],
            "grad_norm": float(norm) if norm is not None else None,
            "samples_per_s": window["samples"]
            * ctx.get_world_size()
            / (time.perf_counter() - window["started"]),
        }
        window.update(started=time.perf_counter(), samples=0)
        if board is not None:
            board.log(n, values)
        ray.train.report({"step": n, **{k: v for k, v in values.items() if v is not None}})

    bar = None
    if rank == 0:  # Ray's tqdm draws workers' bars on the driver's console
        from ray.experimental.tqdm_ray import tqdm

        bar = tqdm(total=cfg.steps, desc="train", unit="step")
        bar.update(first)
    for n in range(first, cfg.steps):
        terms: list[dict] = []
        for _ in range(cfg.gradient_accumulation):  # DeepSpeed steps the optimizer on the last one
            t0 = time.perf_counter()
            examples = next(rows)
            t1 = time.perf_counter()
            out = step.losses(
                engine.module.model,
                retriever,
                examples,
                cfg.hard_negatives,
                cfg,
                engine.module.heads,
                special,
                generator,
            )
            t2 = time.perf_counter()
            engine.backward(out["loss"])
            t3 = time.perf_counter()
            window["lr"] = float(engine.get_lr()[0])  # the rate this step uses (the scheduler moves on)
            engine.step()
            terms.append({k: v.item() for k, v in out.items()})
            if n > first:  # where a worker's time goes, the first step (start-up) apart
                for part, dt in zip(
                    TIMED, (t1 - t0, t2 - t1, t3 - t2, time.perf_counter() - t3), strict=True
                ):
                    seconds[part] += dt
        if n == first:  # the rate counts from the end of the first step: the pipeline's start-up is apart
            started = time.perf_counter()
            window["started"] = started
        else:
            samples += cfg.batch_size * cfg.gradient_accumulation
            window["samples"] += cfg.batch_size * cfg.gradient_accumulation
        state["step"] = n + 1
        state["optimizer_steps"] = engine.global_steps
        state["history"].append({k: round(sum(t[k] for t in terms) / len(terms), 5) for k in terms[0]})
        if bar is not None:
            bar.set_description(f"train (loss {state['history'][-1]['loss']:.3f})")
            bar.update(1)
        if state["step"] % cfg.log_every == 0 and n > first:
            log(state["step"])
        if state["step"] % cfg.checkpoint_every == 0 or state["step"] == cfg.steps:
            save(last=state["step"] == cfg.steps)
    if bar is not None:
        bar.close()
    if first >= cfg.steps:  # resumed from a finished run: export again
        save(last=True)
    if board is not None:
        board.close()
    shutil.rmtree(log_dir, ignore_errors=True)  # the curves live on in the checkpoints (``board.save``)
