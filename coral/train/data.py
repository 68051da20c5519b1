"""The training data pipeline: triplet rows -> model features in Ray Data, before the training loop.

``Featurize`` is a Ray Data actor class: it loads the retriever's processor once, decodes the images the
rows name (from the catalog, shared through the object store) and runs the processor on each query and on
its positive and K hard negatives (``step.featurize``). A row leaves as one ``example`` cell, the pickled
features (numpy arrays, unpadded); the workers' ``get_dataset_shard`` streams them and the loop only pads
and stacks (``retriever.collate``).

The pipeline holds exactly the rows the run consumes (``schedule``: seeded epochs of the training rows, cut
at steps x global batch), so Ray Data, which runs ahead of the workers as far as the object store allows,
never featurises rows that no step will see: on a small machine that work took the workers' cores.
"""

from __future__ import annotations

import pickle

import pyarrow as pa
import ray

from coral.config import TrainConfig
from coral.train import retrievers, step

EXAMPLE = "example"


class Featurize:
    def __init__(self, kind: str, base: str, catalog: list, k: int):
        from coral.models import loader

        self.retriever = retrievers.make(kind, loader.load_processor(base))
        self.products = step.products_from(ray.get(catalog[0]))  # [ref]: a bare ref would be resolved early
        self.k = k

    def __call__(self, batch: pa.Table) -> pa.Table:
        examples = step.featurize(self.retriever, batch.to_pylist(), self.products, self.k)
        return pa.table(
            {EXAMPLE: pa.array([pickle.dumps(e, protocol=5) for e in examples], pa.large_binary())}
        )


def examples(batch: pa.Table) -> list[dict]:
    return [pickle.loads(b) for b in batch.column(EXAMPLE).to_pylist()]


def schedule(rows: pa.Table, n: int, seed: int) -> pa.Table:
    """The first ``n`` rows of an endless sequence of epochs, each a permutation of ``rows`` seeded by
    (seed, epoch): a longer run's rows start with a shorter run's."""
    import numpy as np

    epochs = -(-n // rows.num_rows)
    order = [np.random.default_rng([seed, e]).permutation(rows.num_rows) for e in range(epochs)]
    return rows.take(pa.array(np.concatenate(order)[:n]))


def rows_per_run(cfg: TrainConfig) -> int:
    return cfg.steps * cfg.batch_size * cfg.num_workers * cfg.gradient_accumulation


def pipeline(rows: pa.Table, catalog: dict, cfg: TrainConfig) -> ray.data.Dataset:
    """The lazy featurised dataset of the training ``rows`` the run consumes, in order; ``catalog`` holds
    id, title and image columns."""
    rows = schedule(rows, rows_per_run(cfg), cfg.seed)
    # one map batch per input block: a block leaves the actor whole, so small blocks keep the workers fed
    # from the first seconds (one big block would arrive only once all of it is featurised)
    per_block = max(1, 4 * cfg.batch_size)
    blocks = [rows.slice(i, per_block) for i in range(0, rows.num_rows, per_block)] or [rows]
    return ray.data.from_arrow(blocks).map_batches(
        Featurize,
        fn_constructor_kwargs={
            "kind": cfg.model,
            "base": cfg.base,
            "catalog": [ray.put(catalog)],
            "k": cfg.hard_negatives,
        },
        batch_format="pyarrow",
        batch_size=per_block,
        concurrency=cfg.data_workers,
        num_cpus=1,
    )
