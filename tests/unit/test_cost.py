"""coral.cost without Ray: span arithmetic, start-up per pool from the actors' reports, a metered class that
behaves like its base, and a meter's cost block (the fixed/work split, the sampled memory)."""

from __future__ import annotations

import time

import pytest

from coral import cost
from coral.config import Resources


def test_union_counts_overlapping_spans_once():
    assert cost.union_s([]) == 0
    assert cost.union_s([(0, 2), (1, 3), (5, 6)]) == pytest.approx(4.0)
    assert cost.union_s([(0, 10), (2, 3)]) == pytest.approx(10.0)


def test_a_pool_starts_when_its_first_process_does_and_ends_at_its_first_batch():
    started = 100.0
    events = [
        {"pool": "A#0", "created": 101.0, "init": 103.0, "ready": 105.0},
        {"pool": "A#0", "created": 102.0, "init": 104.0, "ready": 106.0},
        {"pool": "A#0", "first_batch": 107.0},
        {"pool": "A#0", "first_batch": 106.5},
        # a process Ray started before the stage: its start-up counts from its __init__
        {"pool": "B#1", "created": 50.0, "init": 120.0, "ready": 121.0},
        {"pool": "B#1", "first_batch": 122.0},
        # a pool that never got a batch: up to its last actor ready
        {"pool": "C#2", "created": 130.0, "init": 131.0, "ready": 133.0},
    ]
    spans = cost.pool_spans(events, started)
    assert spans == {"A#0": (101.0, 106.5), "B#1": (120.0, 122.0), "C#2": (130.0, 133.0)}


class Double:
    def __init__(self, k: int = 2):
        self.k = k

    def __call__(self, batch):
        return [x * self.k for x in batch]


class Gen:
    def __call__(self, batch):
        yield from batch


class Recorder:
    def __init__(self):
        self.events = []

    def report(self, **event):
        self.events.append(event)


def test_a_metered_class_keeps_its_name_and_results_and_reports_once_per_first_batch():
    clock = Recorder()
    cls = cost.metered(Double, clock)
    assert cls.__name__ == "Double" and issubclass(cls, Double)
    actor = cls(k=3)
    assert actor(range(3)) == [0, 3, 6] and actor([1]) == [3]
    ready, first, busy, busy2 = clock.events
    assert ready["created"] <= ready["init"] <= ready["ready"] and "first_batch" in first
    assert first["first_batch"] == busy["busy"][0] <= busy["busy"][1] <= busy2["busy"][0]  # each batch's span
    gen_clock = Recorder()
    gen = cost.metered(Gen, gen_clock)()
    assert list(gen([1, 2])) == [1, 2]
    assert [sorted(e) for e in gen_clock.events] == [["created", "init", "ready"], ["first_batch"], ["busy"]]


def test_what_pools_held_is_their_spans_times_their_resources_with_the_peak_at_once():
    res = {"A#0": (2.0, 0.0), "B#1": (1.0, 0.5)}
    events = [
        {"pool": "A#0", "created": 0.0, "init": 1.0, "ready": 2.0},  # __init__ holds the actor's CPUs
        {"pool": "A#0", "busy": (2.0, 3.0)},
        {"pool": "A#0", "busy": (2.5, 3.5)},  # a second task of the pool, side by side
        {"pool": "B#1", "busy": (3.0, 5.0)},  # starts as the first A task ends
        {"pool": "A#0", "first_batch": 2.0},
        {"pool": "C#2", "busy": (0.0, 9.0)},  # a pool with no resources recorded counts nothing
        {"pool": "B#1", "busy": (9.0, 11.0)},  # clipped to the window: 1 s of it
    ]
    cpu_s, gpu_s, peak_cpus, peak_gpus = cost.held_spans(events, res, (0.0, 10.0))
    assert cpu_s == pytest.approx(2 * 1 + 2 * 1 + 2 * 1 + 1 * 2 + 1 * 1)
    assert gpu_s == pytest.approx(0.5 * 3)
    assert (peak_cpus, peak_gpus) == (pytest.approx(4.0), pytest.approx(0.5))  # two A tasks at 2.5-3


def test_a_pool_held_between_two_samples_still_counts(monkeypatch):
    monkeypatch.setattr(cost.ray, "is_initialized", lambda: False)  # the sampler sees nothing held
    with cost.Meter("index", interval=10.0) as meter:
        meter.pools, meter.pool_res = {"Double#0": 2}, {"Double#0": (1.0, 0.0)}  # as ``wrap`` records it
    t0, key = meter.started, "Double#0"
    meter.events = [{"pool": key, "busy": (t0, t0 + 0.1)}, {"pool": key, "busy": (t0 + 0.05, t0 + 0.15)}]
    meter.ended = t0 + 1.0
    block = meter.block(10, 10, None, 1.0)
    assert block["cpu_s"] == pytest.approx(0.2, abs=0.006) and block["peak_cpus"] == 2.0


def test_parallelism_is_the_mean_actor_count_of_a_stages_pools():
    assert cost.parallelism({}) == 1.0
    pools = {"a": Resources(num_actors=2), "b": Resources(num_actors=4)}
    assert cost.parallelism(pools) == 3.0


def test_a_meter_splits_wall_time_into_start_up_and_work(monkeypatch):
    monkeypatch.setattr(cost.ray, "is_initialized", lambda: False)  # no Ray: memory is still sampled
    with cost.Meter("embed", interval=0.01) as meter:
        assert cost.current() is meter
        meter.fixed(meter.started, meter.started + 0.05)
        time.sleep(0.12)
    assert cost.current() is None
    block = meter.block(rows_in=40, rows_out=40, work_s=None, parallelism=2.0)
    assert block["unit"] == "images" and block["units"] == 40
    assert block["fixed_s"] == pytest.approx(0.05, abs=0.01)
    assert block["work_s"] == pytest.approx(block["wall_s"] - 0.05, abs=0.01)
    assert block["rows_per_s"] == pytest.approx(40 / block["wall_s"], rel=0.01)
    assert block["samples"] >= 3 and block["peak_memory_bytes"] > 10 * 2**20
    assert block["cpu_s"] == 0 and block["memory_scope"] in ("driver", "driver and local Ray")

    with cost.Meter("train", interval=0.01) as meter:
        time.sleep(0.05)
    block = meter.block(rows_in=100, rows_out=30, work_s=0.02, parallelism=2.0)  # train knows its work
    assert block["units"] == 30 and block["work_s"] == pytest.approx(0.02)
    with cost.Meter("serve", interval=0.01) as meter:
        pass
    assert meter.block(3, 3, None, 1.0)["work_s"] == 0  # serve grows with nothing


def test_each_pool_says_when_its_first_batch_began_after_the_stage_started(monkeypatch):
    monkeypatch.setattr(cost.ray, "is_initialized", lambda: False)
    with cost.Meter("embed", interval=0.01) as meter:
        meter.pools = {"EncodeBatch#0": 2, "EncodeBatch#1": 1, "EncodeBatch#2": 1}
    t0 = meter.started
    meter.events = [
        {"pool": "EncodeBatch#0", "created": t0 + 0.1, "init": t0 + 1.0, "ready": t0 + 3.0},
        {"pool": "EncodeBatch#0", "first_batch": t0 + 3.5},
        {"pool": "EncodeBatch#0", "first_batch": t0 + 3.2},  # its other actor
        {"pool": "EncodeBatch#1", "created": t0 + 0.2, "init": t0 + 1.0, "ready": t0 + 4.0},
        {"pool": "EncodeBatch#1", "first_batch": t0 + 4.5},
    ]
    meter.ended = t0 + 6.0
    pools = meter.block(10, 10, None, 1.0)["pools"]
    assert pools["EncodeBatch#0"]["first_batch_s"] == pytest.approx(3.2)
    assert pools["EncodeBatch#0"]["startup_s"] == pytest.approx(3.1)  # its first process to its first batch
    assert pools["EncodeBatch#1"]["first_batch_s"] == pytest.approx(4.5)
    assert pools["EncodeBatch#2"] == {"actors": 1, "startup_s": None, "first_batch_s": None}  # no batch


def test_held_resources_are_total_less_available(monkeypatch):
    monkeypatch.setattr(cost.ray, "cluster_resources", lambda: {"CPU": 4.0, "GPU": 1.0, "node:1.2.3.4": 1.0})
    monkeypatch.setattr(cost.ray, "available_resources", lambda: {"CPU": 1.5})  # all GPUs held: no key
    assert cost.held() == (2.5, 1.0, 1)
