"""The training rows a run consumes: seeded epochs, cut at the steps' need."""

from __future__ import annotations

import pickle
import threading

import pyarrow as pa
import pytest

from coral.config import TrainConfig
from coral.train import data


def test_schedule_is_seeded_epochs_cut_at_the_need():
    rows = pa.table({"query_id": [f"q{i}" for i in range(10)], "source": ["merit"] * 10})
    ids = data.schedule(rows, 25, seed=3).column("query_id").to_pylist()
    assert len(ids) == 25
    assert sorted(ids[:10]) == sorted(ids[10:20]) == sorted(rows["query_id"].to_pylist())  # whole epochs
    assert ids[:10] != ids[10:20]  # each epoch its own order
    assert len(set(ids[20:])) == 5  # the last one cut, without repeats
    assert data.schedule(rows, 40, seed=3).column("query_id").to_pylist()[:25] == ids  # a longer run extends
    assert data.schedule(rows, 25, seed=4).column("query_id").to_pylist() != ids


def test_rows_per_run_is_steps_times_the_global_batch():
    cfg = TrainConfig(steps=7, batch_size=3, num_workers=2, gradient_accumulation=2)
    assert data.rows_per_run(cfg) == 7 * 3 * 2 * 2


def test_an_epoch_draws_one_instruction_of_each_megapairs_pair():
    """MegaPairs: a pair's instructions are one training example, one drawn per epoch; MERIT rows stay apart."""
    qids = [f"pair{p}#{i}" for p in range(4) for i in range(3)] + ["m0", "m1"]
    rows = pa.table({"query_id": qids, "source": ["megapairs"] * 12 + ["merit"] * 2})
    assert sorted(map(sorted, data.groups(rows)))[:2] == [[0, 1, 2], [3, 4, 5]]
    ids = data.schedule(rows, 6 * 8, seed=0).column("query_id").to_pylist()
    epochs = [ids[i : i + 6] for i in range(0, len(ids), 6)]
    for epoch in epochs:  # every pair once, every MERIT row once
        assert sorted(q.split("#")[0] for q in epoch) == ["m0", "m1", "pair0", "pair1", "pair2", "pair3"]
    drawn = {q for q in ids if q.startswith("pair0")}
    assert len(drawn) > 1  # over the epochs, other instructions of the same pair


def test_a_worker_featurises_streamed_rows_itself_or_unpickles_the_actors_examples(monkeypatch):
    def featurize(retriever, rows, products, k):
        return [{"query": r["query_id"], "by": retriever, "k": k, "products": products} for r in rows]

    monkeypatch.setattr(data.step, "featurize", featurize)
    rows = pa.table({"query_id": ["q1", "q2"]})
    inline = data.Featurizer("retriever", {"p1": "a product"}, 3)(rows)  # data_workers: 0
    assert inline == featurize("retriever", rows.to_pylist(), {"p1": "a product"}, 3)
    from_actors = pa.table({data.EXAMPLE: pa.array([pickle.dumps(e) for e in inline], pa.large_binary())})
    assert data.Featurizer("retriever", None, 3)(from_actors) == inline


class Shard:
    """A stand-in for a worker's dataset shard: ``epoch_rows`` rows per epoch, batches as asked."""

    def __init__(self, epoch_rows: int, fail_at: int | None = None):
        self.epoch_rows, self.fail_at, self.epochs, self.pulled = epoch_rows, fail_at, 0, 0

    def iter_batches(self, batch_size, batch_format, drop_last):
        assert (batch_format, drop_last) == ("pyarrow", True)
        self.epochs += 1
        for i in range(0, self.epoch_rows - batch_size + 1, batch_size):
            if self.fail_at is not None and self.pulled == self.fail_at:
                raise RuntimeError("the object store lost a block")
            self.pulled += 1
            yield pa.table({"i": list(range(i, i + batch_size))})


def test_prefetch_hands_over_the_count_in_order_and_asks_for_nothing_beyond_it():
    shard = Shard(epoch_rows=12)
    batches = list(data.Prefetch(shard, 4, count=3))  # exactly one epoch
    assert [b["i"].to_pylist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    threading.Event().wait(0.2)  # time for a thread that went on to start another epoch
    assert (shard.pulled, shard.epochs) == (3, 1)


def test_prefetch_pulls_before_it_is_asked_and_runs_epochs_as_the_count_needs():
    shard = Shard(epoch_rows=9)  # two full batches of 4 an epoch (drop_last)
    rows = data.Prefetch(shard, 4, count=5, depth=5)
    for _ in range(200):  # the thread fills the queue on its own
        if shard.pulled == 5:
            break
        threading.Event().wait(0.01)
    assert shard.pulled == 5 and shard.epochs == 3
    assert [b["i"].to_pylist()[0] for b in rows] == [0, 4, 0, 4, 0]


def test_prefetch_raises_the_pipelines_error_and_an_empty_shard():
    rows = data.Prefetch(Shard(epoch_rows=12, fail_at=1), 4, count=3)
    assert next(rows).num_rows == 4
    with pytest.raises(RuntimeError, match="lost a block"):
        next(rows)
    with pytest.raises(ValueError, match="no full batch of 4 rows"):
        next(data.Prefetch(Shard(epoch_rows=3), 4, count=1))
