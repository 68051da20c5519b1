"""The training data pipeline: triplet rows -> model features in Ray Data, before the training loop.

``Featurize`` is a Ray Data actor class: it loads the retriever's processor once, decodes the images the
rows name (from the catalog, shared through the object store) and runs the processor on each query and on
its positive and K hard negatives (``step.featurize``). A row leaves as one ``example`` cell, the pickled
features (numpy arrays, unpadded); the workers' ``get_dataset_shard`` streams them and the loop only pads
and stacks (``retriever.collate``). With ``train.data_workers: 0`` the pipeline streams the rows as they
are and each training worker runs ``step.featurize`` itself (``Featurizer``): no actor to start.

The pipeline holds exactly the rows the run consumes (``schedule``: seeded epochs of the training rows, cut
at steps x global batch), so Ray Data, which runs ahead of the workers as far as the object store allows,
never featurises rows that no step will see: on a small machine that work took the workers' cores.
"""

from __future__ import annotations

import pickle
import queue
import threading
from collections.abc import Iterable

import pyarrow as pa
import ray

from coral import ray_runtime
from coral import schemas as S
from coral.catalog import lookup
from coral.config import Resources, TrainConfig
from coral.models import loader, retrievers
from coral.train import step

EXAMPLE = "example"


class Featurize:
    def __init__(self, kind: str, base: str, catalog: list, k: int, max_image_tokens: int = 0):
        self.retriever = retrievers.make(kind, loader.load_processor(base), max_image_tokens)
        self.products = lookup.products_from(ray.get(catalog[0]))  # [ref]: a bare ref would be resolved early
        self.k = k

    def __call__(self, batch: pa.Table) -> pa.Table:
        examples = step.featurize(self.retriever, batch.to_pylist(), self.products, self.k)
        return pa.table(
            {EXAMPLE: pa.array([pickle.dumps(e, protocol=5) for e in examples], pa.large_binary())}
        )


class Featurizer:
    """What a training worker turns a streamed batch into examples with: unpickles the actors' features,
    or, given the products (``data_workers: 0``), featurises the rows itself."""

    def __init__(self, retriever, products: lookup.Products | None, k: int):
        self.retriever, self.products, self.k = retriever, products, k

    def __call__(self, batch: pa.Table) -> list[dict]:
        if self.products is None:
            return [pickle.loads(b) for b in batch.column(EXAMPLE).to_pylist()]
        return step.featurize(self.retriever, batch.to_pylist(), self.products, self.k)


class Prefetch:
    """The next ``count`` batches of ``shard`` (a worker's ``get_dataset_shard``: epochs over it as many as
    the count needs), pulled by a thread into a queue of ``depth`` from the moment this is made. Made before
    the model loads, the pipeline's first block (its executor starting, about a second) arrives while the
    worker loads the model and DeepSpeed starts, not after; and no batch beyond the count is asked for."""

    def __init__(self, shard, batch_size: int, count: int, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._left = count
        args = (shard, batch_size, count)
        threading.Thread(target=self._pull, args=args, name="coral-train-data", daemon=True).start()

    def _pull(self, shard, batch_size: int, count: int) -> None:
        try:
            while count > 0:
                epoch = 0
                for batch in self._epoch(shard, batch_size):
                    self._queue.put(batch)
                    count, epoch = count - 1, epoch + 1
                    if count == 0:
                        break
                if epoch == 0:
                    raise ValueError(f"train: this worker's shard holds no full batch of {batch_size} rows")
        except BaseException as e:  # handed to the training loop, raised there
            self._queue.put(_Failed(e))

    @staticmethod
    def _epoch(shard, batch_size: int) -> Iterable[pa.Table]:
        return shard.iter_batches(batch_size=batch_size, batch_format="pyarrow", drop_last=True)

    def __iter__(self):
        return self

    def __next__(self) -> pa.Table:
        if self._left == 0:
            raise StopIteration
        item = self._queue.get()
        if isinstance(item, _Failed):
            raise item.error
        self._left -= 1
        return item


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


def groups(rows: pa.Table) -> list[list[int]]:
    """Row indices by training example: a MegaPairs pair's instructions (query ids ``{pair}#{i}``) form one
    group, any other row is its own."""
    out: dict[str, list[int]] = {}
    ids, sources = rows.column(S.QUERY_ID).to_pylist(), rows.column(S.SOURCE).to_pylist()
    for i, (qid, source) in enumerate(zip(ids, sources, strict=True)):
        out.setdefault(qid.rsplit("#", 1)[0] if source == "megapairs" else qid, []).append(i)
    return list(out.values())


def schedule(rows: pa.Table, n: int, seed: int) -> pa.Table:
    """The first ``n`` rows of an endless sequence of epochs seeded by (seed, epoch): an epoch holds each
    group (``groups``) once, in a random order, as one of its rows drawn at random (MegaPairs: one of a
    pair's instructions per epoch, as its dataset card says to train). A longer run's rows start with a
    shorter run's."""
    import numpy as np

    members = groups(rows)
    order: list[int] = []
    epoch = 0
    while len(order) < n:
        rng = np.random.default_rng([seed, epoch])
        order += [members[g][rng.integers(len(members[g]))] for g in rng.permutation(len(members))]
        epoch += 1
    return rows.take(pa.array(order[:n], pa.int64()))


def rows_per_run(cfg: TrainConfig) -> int:
    return cfg.steps * cfg.batch_size * cfg.num_workers * cfg.gradient_accumulation


def pipeline(rows: pa.Table, catalog: list, cfg: TrainConfig) -> ray.data.Dataset:
    """The lazy featurised dataset of the training ``rows`` the run consumes, in order (``data_workers: 0``:
    the rows themselves); ``catalog``: [a ref to the id, title and image columns]."""
    rows = schedule(rows, rows_per_run(cfg), cfg.seed)
    # one map batch per input block: a block leaves the actor whole, so small blocks keep the workers fed
    # from the first seconds (one big block would arrive only once all of it is featurised)
    per_block = max(1, 4 * cfg.batch_size)
    blocks = [rows.slice(i, per_block) for i in range(0, rows.num_rows, per_block)] or [rows]
    # from_blocks keeps these blocks and reads their metadata here; from_arrow ran a Ray task per block for
    # it (150 tasks, 1.3 s of the demo's train stage on 2 cores)
    ds = ray.data.from_blocks(blocks)
    if cfg.data_workers == 0:
        return ds
    kwargs = {
        "kind": cfg.model,
        "base": cfg.base,
        "catalog": catalog,
        "k": cfg.hard_negatives,
        "max_image_tokens": cfg.max_image_tokens,
    }
    return ray_runtime.actor_pool(ds, Featurize, resources(cfg), per_block, kwargs)


def resources(cfg: TrainConfig) -> Resources:
    """The featurising actors: ``data_workers`` of one CPU each."""
    return Resources(num_actors=cfg.data_workers, num_cpus=1.0)
