"""Run one annotation step over a Ray Data dataset: ``hf`` and ``openai`` engines in an actor pool (one
engine loaded per actor), ``vllm`` through ``ray.data.llm`` (``coral.annotate.vllm``)."""

from __future__ import annotations

import pyarrow as pa
import ray
import torch

from coral import ray_runtime
from coral.annotate import vllm
from coral.annotate.engines import make_engine
from coral.annotate.steps import finish
from coral.config import EngineConfig
from coral.storage import Location


class StepActor:
    """Ray Data callable class: one step on an ``hf`` or ``openai`` engine, loaded once per actor."""

    def __init__(self, step, engine: EngineConfig, rejected: Location, stats: Location):
        if engine.kind == "hf":
            torch.set_num_threads(max(1, int(engine.num_cpus)))  # the actor's share, not every core
        self.step, self.engine, self.rejected, self.stats = step, make_engine(engine), rejected, stats

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        cache = getattr(self.engine, "prefixes", None)
        before = cache.hits + cache.misses if cache else 0
        gens = self.engine.generate([self.step.prompt(r) for r in rows])
        heads = cache.hits + cache.misses - before if cache else None
        return finish(self.step, rows, gens, self.rejected, self.stats, heads)


def run_step(ds: ray.data.Dataset, step, engine: EngineConfig, rejected: Location, stats: Location):
    if engine.kind == "vllm":
        return vllm.run_step(ds, step, engine, rejected, stats)
    kwargs = {"step": step, "engine": engine, "rejected": rejected, "stats": stats}
    return ray_runtime.actor_pool(ds, StepActor, engine, engine.batch_size, kwargs)
