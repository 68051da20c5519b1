"""Model pools: tasks in warm processes on a local Ray's CPUs, actor pools otherwise (GPUs, clusters)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import ray

from coral import ray_runtime


class Recorder:
    """A pool class that says which process and which instance mapped each row."""

    built = 0

    def __init__(self, tag: str):
        Recorder.built += 1
        self.tag = tag

    def __call__(self, batch):
        n = len(batch["id"])
        return {"id": batch["id"], "pid": [os.getpid()] * n, "obj": [id(self)] * n, "tag": [self.tag] * n}


class Chunks(Recorder):
    def __call__(self, batch):
        yield super().__call__(batch)


class FakeDataset:
    def map_batches(self, fn, **kwargs):
        return fn, kwargs


def res(num_gpus: float = 0.0):
    return SimpleNamespace(num_actors=2, num_cpus=1.0, num_gpus=num_gpus, accelerator_type=None)


def test_built_keeps_the_stages_instances_and_drops_the_last_stages(monkeypatch):
    monkeypatch.setattr(ray_runtime, "_built", ray_runtime.OrderedDict())
    Recorder.built = 0
    a = ray_runtime.built(Recorder, {"tag": "a"}, "pool-a", "stage-1")
    b = ray_runtime.built(Recorder, {"tag": "b"}, "pool-b", "stage-1")  # two pools of one stage, side by side
    assert ray_runtime.built(Recorder, {"tag": "a"}, "pool-a", "stage-1") is a and Recorder.built == 2
    assert ray_runtime.built(Recorder, {"tag": "b"}, "pool-b", "stage-1") is b
    ray_runtime.built(Recorder, {"tag": "c"}, "pool-c", "stage-2")
    assert list(ray_runtime._built) == ["pool-c"] and Recorder.built == 3
    for i in range(ray_runtime.MAX_BUILT + 2):
        ray_runtime.built(Recorder, {"tag": "d"}, f"pool-d{i}", "stage-2")
    assert len(ray_runtime._built) == ray_runtime.MAX_BUILT and "pool-c" not in ray_runtime._built


@pytest.mark.parametrize(
    "warm, gpus, actors",
    [(True, 0.0, False), (True, 0.5, True), (False, 0.0, True)],
)
def test_only_a_local_cpu_pool_runs_as_warm_tasks(monkeypatch, warm, gpus, actors):
    monkeypatch.setattr(ray_runtime, "_warm", warm)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    fn, kw = ray_runtime.actor_pool(FakeDataset(), Recorder, res(gpus), 4, {"tag": "x"})
    if actors:
        assert fn is Recorder and isinstance(kw["compute"], ray.data.ActorPoolStrategy)
        assert kw["fn_constructor_kwargs"] == {"tag": "x"} and kw["num_gpus"] == gpus
    else:
        assert fn is ray_runtime._warm_call and "compute" not in kw and kw["concurrency"] == 2
        assert kw["fn_kwargs"]["cls"] is Recorder and kw["fn_kwargs"]["kwargs"] == {"tag": "x"}
    fn, _ = ray_runtime.actor_pool(FakeDataset(), Chunks, res(gpus), 4, {"tag": "x"})
    assert fn is (Chunks if actors else ray_runtime._warm_iter)


def mapped(cls, tag: str) -> list[dict]:
    ds = ray.data.range(48, override_num_blocks=6)
    return ray_runtime.actor_pool(ds, cls, res(), 4, {"tag": tag}, batch_format="numpy").take_all()


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_warm_pools_map_every_row_once_with_one_instance_per_process(ray_local, monkeypatch):
    monkeypatch.setattr(ray_runtime, "_warm", True)
    first, second, chunks = mapped(Recorder, "a"), mapped(Recorder, "b"), mapped(Chunks, "c")
    monkeypatch.setattr(ray_runtime, "_warm", False)
    by_actors = mapped(Recorder, "a")
    for rows, tag in ((first, "a"), (second, "b"), (chunks, "c"), (by_actors, "a")):
        assert sorted(int(r["id"]) for r in rows) == list(range(48)) and {r["tag"] for r in rows} == {tag}
        instances: dict[int, set] = {}
        for r in rows:
            instances.setdefault(int(r["pid"]), set()).add(int(r["obj"]))
        assert all(len(v) == 1 for v in instances.values()), instances  # built once per process
    pids = lambda rows: {int(r["pid"]) for r in rows}  # noqa: E731
    assert pids(second) & pids(first), "the second pool found none of the first pool's processes"
