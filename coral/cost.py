"""What a stage cost: its wall time; the CPU- and GPU-seconds that its actors, tasks and workers held (the
resources they asked Ray for, for as long as they held them); peak memory; rows per second; and its wall
time split into a fixed part (start-up: Ray coming up, everything until the stage's first batch, each
later pool's processes starting and loading their models) and a part that grows with the rows, which
``coral.plan`` projects from.

The driver runs a ``Meter`` around each stage. A thread samples every ``SAMPLE_S``: what Ray holds
(``cluster_resources - available_resources``, logical CPUs and GPUs, all nodes) and the resident memory of
the driver and its child processes (a local Ray's raylet and workers; on a cluster the driver's only, and
the manifest says which). Pool actors started by ``ray_runtime.actor_pool`` are ``metered``: each tells a
small ``Tally`` actor (no CPU) when its process started, when its first batch began, and how long its
``__init__`` and each batch held the pool's resources. A pool's work shorter than the sampling interval
(the index stage of a small run: a few tasks in 0.2 s) can fall between two samples; the sum of those
spans is then the stage's figure (a floor: what the sampler saw, if more, stands). Figures of a Ray
shared with other jobs include theirs.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import psutil
import ray

log = logging.getLogger(__name__)

SAMPLE_S = 0.25
TALLY = "coral_cost_tally"
# the count a stage's rows_per_s and projection go by: (unit, the manifest field it is), per stage;
# train counts steps (its rows_out), serve nothing (a fixed cost: it starts an endpoint)
UNITS = {
    "catalog": ("products", "rows_out"),
    "embed": ("images", "rows_in"),
    "mine": ("images", "rows_in"),
    "merit": ("queries", "rows_in"),  # draws asked for (merit.queries); how many pass its filters varies
    "import_triplets": ("queries", "rows_in"),
    "annotate": ("instances", "rows_out"),
    "train": ("steps", "rows_out"),
    "index": ("candidates", "rows_in"),
    "evaluate": ("queries", "rows_in"),
}


@ray.remote(num_cpus=0)
class Tally:
    """Events from metered actors, by meter: ``add`` is fire-and-forget, ``take`` hands them over once."""

    def __init__(self):
        self.events: dict[str, list[dict]] = {}

    def add(self, meter: str, event: dict) -> None:
        self.events.setdefault(meter, []).append(event)

    def take(self, meter: str) -> list[dict]:
        return self.events.pop(meter, [])


@dataclass(frozen=True)
class Clock:
    """What a metered actor carries: where to report, for which meter and pool."""

    tally: Any
    meter: str
    pool: str

    def report(self, **event) -> None:
        self.tally.add.remote(self.meter, {"pool": self.pool, "pid": os.getpid(), **event})


def metered(cls: type, clock: Clock) -> type:
    """``cls`` (a Ray Data callable class) that reports its process start, its ``__init__``, its first
    batch and each batch's span (``busy``) to ``clock``; same name (Ray Data's operator names), same
    results."""

    def __init__(self, *args, **kwargs):
        entered = time.time()
        created = psutil.Process().create_time()
        cls.__init__(self, *args, **kwargs)
        self._coral_first = True
        clock.report(created=created, init=entered, ready=time.time())

    def first(self) -> float:
        now = time.time()
        if self._coral_first:
            self._coral_first = False
            clock.report(first_batch=now)
        return now

    if inspect.isgeneratorfunction(cls.__call__):

        def __call__(self, batch, *args, **kwargs):
            began = first(self)
            yield from cls.__call__(self, batch, *args, **kwargs)
            clock.report(busy=(began, time.time()))
    else:

        def __call__(self, batch, *args, **kwargs):
            began = first(self)
            out = cls.__call__(self, batch, *args, **kwargs)
            clock.report(busy=(began, time.time()))
            return out

    functools.update_wrapper(__call__, cls.__call__)
    body = {"__init__": __init__, "__call__": __call__, "__module__": cls.__module__}
    return type(cls.__name__, (cls,), body | {"__qualname__": cls.__qualname__})


def task_clock(name: str) -> Clock | None:
    """What a Ray task of the running stage takes (``clock=``) to say when it began; None unmetered."""
    meter = current()
    return None if meter is None else meter.clock(f"task:{name}")


def task_started(clock: Clock | None) -> None:
    """First thing in a metered task: its start ends the stage's lead-in, as an actor's first batch does."""
    if clock is not None:
        clock.report(first_batch=time.time())


_tallies: dict[tuple, Any] = {}


def tally() -> Any:
    """The driver's Tally, started on first use and held for as long as this Ray session (an actor ends
    when its last handle goes); it ends with the driver's job."""
    ctx = ray.get_runtime_context()
    key = (ctx.gcs_address, ctx.get_job_id())
    if key not in _tallies:
        _tallies.clear()  # another Ray session's
        _tallies[key] = Tally.options(name=TALLY, namespace="coral", get_if_exists=True).remote()
    return _tallies[key]


def parallelism(pools: dict) -> float:
    """The actors of a stage's pools (``Stage.resources``), mean over pools (they run side by side, each
    over every row): what a projection divides the growing work by. 1 for work in the driver."""
    counts = [r.num_actors for r in pools.values()]
    return sum(counts) / len(counts) if counts else 1.0


def union_s(spans: list[tuple[float, float]]) -> float:
    """Seconds covered by at least one of the ``(start, end)`` spans."""
    total, reach = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > reach:
            total += b - max(a, reach)
            reach = b
    return total


def held_spans(
    events: list[dict], res: dict[str, tuple[float, float]], window: tuple[float, float]
) -> tuple[float, float, float, float]:
    """From metered actors' reports: the CPU- and GPU-seconds their ``__init__`` and batches held within
    ``window`` (each span times its pool's per-actor ``res``: (cpus, gpus)), and the most CPUs and GPUs
    held at once."""
    marks: list[tuple[float, float, float]] = []  # (time, +/- cpus, +/- gpus)
    cpu_s = gpu_s = 0.0
    for e in events:
        cpus, gpus = res.get(e["pool"], (0.0, 0.0))
        a, b = (e["init"], e["ready"]) if "init" in e else e.get("busy", (0.0, 0.0))
        a, b = max(a, window[0]), min(b, window[1])
        if b > a and (cpus or gpus):
            cpu_s, gpu_s = cpu_s + cpus * (b - a), gpu_s + gpus * (b - a)
            marks += [(a, cpus, gpus), (b, -cpus, -gpus)]
    peak_c = peak_g = now_c = now_g = 0.0
    for _, c, g in sorted(marks, key=lambda m: (m[0], m[1])):  # an end before a start at the same time
        now_c, now_g = now_c + c, now_g + g
        peak_c, peak_g = max(peak_c, now_c), max(peak_g, now_g)
    return cpu_s, gpu_s, peak_c, peak_g


def pool_spans(events: list[dict], started: float) -> dict[str, tuple[float, float]]:
    """Per pool: from its first actor process starting (or, for a process Ray started before the stage,
    its ``__init__``) to its first batch (or, if it got none, its last actor ready): its start-up."""
    pools: dict[str, dict[str, list[float]]] = {}
    for e in events:
        p = pools.setdefault(e["pool"], {"start": [], "first": [], "ready": []})
        if "init" in e:
            p["start"].append(max(started, e["created"] if e["created"] >= started else e["init"]))
            p["ready"].append(e["ready"])
        if "first_batch" in e:
            p["first"].append(e["first_batch"])
    spans = {}
    for name, p in pools.items():
        if p["start"]:
            end = min(p["first"]) if p["first"] else max(p["ready"])
            spans[name] = (min(p["start"]), max(end, min(p["start"])))
    return spans


@dataclass
class Usage:
    """Integrated samples: resource-seconds held, peaks."""

    cpu_s: float = 0.0
    gpu_s: float = 0.0
    peak_cpus: float = 0.0
    peak_gpus: float = 0.0
    peak_nodes: int = 0
    peak_memory_bytes: int = 0
    samples: int = 0
    fixed: list[tuple[float, float]] = field(default_factory=list)


def held() -> tuple[float, float, int]:
    """CPUs and GPUs that Ray's actors, tasks and workers hold now, and the number of nodes."""
    total, free = ray.cluster_resources(), ray.available_resources()
    nodes = sum(1 for k in total if k.startswith("node:") and not k.startswith("node:__internal"))
    return (
        total.get("CPU", 0.0) - free.get("CPU", 0.0),
        total.get("GPU", 0.0) - free.get("GPU", 0.0),
        nodes,
    )


def tree_rss(root: psutil.Process) -> tuple[int, bool]:
    """Resident bytes of ``root`` and every process below it; whether a raylet is among them (a local
    Ray, whose workers are then counted too)."""
    total, raylet = 0, False
    for p in [root, *root.children(recursive=True)]:
        try:
            total += p.memory_info().rss
            raylet = raylet or p.name() == "raylet"
        except psutil.Error:  # ended between the listing and the read
            pass
    return total, raylet


_current: Meter | None = None


def current() -> Meter | None:
    """The meter of the stage running in this process, if any (``ray_runtime.actor_pool`` asks)."""
    return _current


class Meter:
    """``with Meter("embed") as m: ...``; then ``m.block(...)`` is the manifest's ``cost``."""

    def __init__(self, stage: str, interval: float = SAMPLE_S):
        self.stage, self.interval = stage, interval
        self.id = f"{stage}-{uuid.uuid4().hex[:12]}"
        self.usage = Usage()
        self.pools: dict[str, int] = {}  # pool key -> actors asked for
        self.pool_res: dict[str, tuple[float, float]] = {}  # pool key -> (CPUs, GPUs) per actor
        self._stop = threading.Event()
        self._tally = None
        self._last = 0.0

    def __enter__(self) -> Meter:
        global _current
        self.started = self._last = time.time()
        self._cpu0 = time.process_time()
        self._proc = psutil.Process()
        self._local = False  # whether a local Ray's processes are among this one's children
        self._thread = threading.Thread(target=self._run, name=f"meter-{self.stage}", daemon=True)
        self._thread.start()
        _current = self
        return self

    def __exit__(self, *exc) -> None:
        global _current
        _current = None
        self._stop.set()
        self._thread.join(timeout=10)
        self.sample()
        self.ended = time.time()
        self.driver_cpu_s = time.process_time() - self._cpu0
        self.events = []
        if self._tally is not None:
            try:
                self.events = ray.get(self._tally.take.remote(self.id), timeout=30)
            except Exception as e:  # the figures lose their start-up split; the stage goes on
                log.warning(
                    "%s: no start-up reports from its actors (%s): all of it counts as work", self.stage, e
                )

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        now, u = time.time(), self.usage
        dt, self._last = now - self._last, now
        u.samples += 1
        rss, local = tree_rss(self._proc)
        u.peak_memory_bytes, self._local = max(u.peak_memory_bytes, rss), self._local or local
        if not ray.is_initialized():
            return
        try:
            cpus, gpus, nodes = held()
        except Exception:  # Ray shutting down under us: the sample is lost, not the stage
            return
        u.cpu_s, u.gpu_s = u.cpu_s + cpus * dt, u.gpu_s + gpus * dt
        u.peak_cpus, u.peak_gpus = max(u.peak_cpus, cpus), max(u.peak_gpus, gpus)
        u.peak_nodes = max(u.peak_nodes, nodes)

    def fixed(self, start: float, end: float) -> None:
        """Count ``[start, end]`` as start-up (e.g. Ray coming up)."""
        self.usage.fixed.append((start, end))

    def clock(self, key: str) -> Clock:
        if self._tally is None:
            self._tally = tally()
        return Clock(self._tally, self.id, key)

    def wrap(self, cls: type, actors: int, cpus: float = 0.0, gpus: float = 0.0) -> type:
        """``cls`` metered, as a new pool of this stage (``ray_runtime.actor_pool``) of ``actors`` actors
        holding ``cpus`` and ``gpus`` each."""
        key = f"{cls.__name__}#{len(self.pools)}"
        self.pools[key] = actors
        self.pool_res[key] = (float(cpus), float(gpus))
        return metered(cls, self.clock(key))

    def block(self, rows_in: int, rows_out: int, work_s: float | None, parallelism: float) -> dict:
        """The manifest's ``cost``: figures measured, and the fixed/work split the projection uses.

        ``work_s``: the stage's own figure for its part that grows with its rows (train: its steps after
        the first, at the rate it measured), else wall time less start-up. ``parallelism``: the actors
        a pool of the stage had (mean over its pools), what a projection divides the work by."""
        wall = self.ended - self.started
        spans = pool_spans(self.events, self.started)
        # start-up: until the stage's first batch (reading its inputs, planning, the first actors coming
        # up), each later pool's own start-up, and what the stage marked (Ray coming up)
        firsts = [e["first_batch"] for e in self.events if "first_batch" in e]  # tasks' starts too
        lead = [(self.started, min(firsts))] if firsts else []
        firsts_by_pool: dict[str, float] = {}
        for e in self.events:
            if "first_batch" in e:
                firsts_by_pool[e["pool"]] = min(
                    firsts_by_pool.get(e["pool"], e["first_batch"]), e["first_batch"]
                )
        clip = [
            (max(a, self.started), min(b, self.ended)) for a, b in [*self.usage.fixed, *lead, *spans.values()]
        ]
        startup = union_s([s for s in clip if s[1] > s[0]])
        unit, which = UNITS.get(self.stage, (None, None))
        units = {"rows_in": rows_in, "rows_out": rows_out}.get(which or "", 0)
        if unit is None:  # nothing grows: all of it is fixed
            work = 0.0
        elif work_s is not None:
            work = min(max(work_s, 0.0), wall)
        else:
            work = max(wall - startup, 0.0)
        u = self.usage
        # what the pools' own spans say they held: where it is more than the samples saw, it stands
        cpu_s, gpu_s, peak_cpus, peak_gpus = held_spans(
            self.events, self.pool_res, (self.started, self.ended)
        )
        return {
            "wall_s": round(wall, 3),
            "cpu_s": round(max(u.cpu_s, cpu_s), 2),
            "gpu_s": round(max(u.gpu_s, gpu_s), 2),
            "peak_cpus": max(u.peak_cpus, peak_cpus),
            "peak_gpus": max(u.peak_gpus, peak_gpus),
            "peak_nodes": u.peak_nodes,
            "peak_memory_bytes": u.peak_memory_bytes,
            "memory_scope": "driver and local Ray" if self._local else "driver",
            "driver_cpu_s": round(self.driver_cpu_s, 2),
            "unit": unit,
            "units": units,
            "rows_per_s": round(units / wall, 3) if unit and wall > 0 else None,
            "fixed_s": round(wall - work, 3),
            "work_s": round(work, 3),
            "parallelism": parallelism,
            # per pool: its actors' start-up, and its first batch's start counted from the stage's
            "pools": {
                k: {
                    "actors": n,
                    "startup_s": round(spans[k][1] - spans[k][0], 3) if k in spans else None,
                    "first_batch_s": round(firsts_by_pool[k] - self.started, 3)
                    if k in firsts_by_pool
                    else None,
                }
                for k, n in self.pools.items()
            },
            "samples": u.samples,
        }
