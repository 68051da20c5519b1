"""The training rows a run consumes: seeded epochs, cut at the steps' need."""

from __future__ import annotations

import pickle

import pyarrow as pa

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
