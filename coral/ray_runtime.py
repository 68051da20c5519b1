"""Connect to Ray: join a cluster when an address is given (RAY_ADDRESS under ``ray job submit``),
otherwise start a local Ray whose logical CPU count keeps actor pools, tasks and train workers from
deadlocking on a small machine. On a local Ray a stage's model pool runs as tasks in Ray's long-lived
worker processes, each keeping the pool's model (``warm_workers``): a later stage finds torch and
transformers imported (5-6 s of a core per new process) instead of starting actors cold."""

from __future__ import annotations

import inspect
import logging
import os
import uuid
from collections import OrderedDict
from typing import Any

import ray

from coral import cost
from coral.config import RayConfig

log = logging.getLogger(__name__)

_warm = False  # this driver's local Ray runs CPU model pools as tasks in warm processes (RayConfig)
# in each Ray worker process: the model pool instances it built for the running stage (its pools run side
# by side), at most MAX_BUILT; a stage's instances go when the next stage's first pool lands there
_built: OrderedDict[str, tuple[str, Any]] = OrderedDict()
MAX_BUILT = 4


def connect(cfg: RayConfig) -> str:
    """Initialise Ray once per process; returns "existing", "cluster" or "local"."""
    global _warm
    if ray.is_initialized():
        return "existing"
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    _warm = cfg.warm_workers and not address
    if address:
        ray.init(address=address, log_to_driver=True)
        log.info("joined Ray cluster at %s", address)
        return "cluster"
    # read by Serve's processes when they start, so set before Ray starts them
    os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1" if cfg.serve_throughput_optimized else "0")
    # a direct-ingress replica drains 30 s on shutdown by default, for load balancers to let it go; a
    # local Ray has none, so a Serve app stops in a second, not half a minute
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
    # Ray Train's controller looks at its workers every 2 s by default, so a train stage waits seconds for
    # its worker group to start, its reports and its end; on one machine looking is cheap
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    # nor does one machine get preempted: no watcher actor (a process to start) per train stage
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # Ray Data reads a Parquet dataset's footers on a pool of 32 actors (one process each, started and
    # killed per read, taking warm workers with them) before reading it; one actor lists a machine's files
    # (the embed stage over 3,000 images: 8.2-8.4 s warm against 10.0-11.4 s)
    os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
    ray.init(
        address="local",  # a new Ray of our own, never one that `ray start` left running on this machine
        num_cpus=cfg.num_cpus,
        include_dashboard=cfg.include_dashboard,
        _temp_dir=cfg.temp_dir,
        configure_logging=True,
        logging_level=logging.WARNING,
    )
    log.info("started a local Ray with %d logical CPUs", cfg.num_cpus)
    return "local"


def remote_args(res: Any) -> dict:
    """Ray's per-actor (or per-task, per-replica) resource options from a section's resources
    (``coral.config.Resources``: num_cpus, num_gpus, accelerator_type, and custom ``resources`` where the
    section has them); ``accelerator_type`` (``A10G``, ``L4``, ``A100``...) places the actor on a node of
    that GPU type, as cluster.yaml declares."""
    args: dict = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus}
    if res.accelerator_type:
        args["accelerator_type"] = res.accelerator_type
    custom = getattr(res, "resources", None)
    if custom:
        args["resources"] = dict(custom)
    return args


def actor_pool(
    ds: ray.data.Dataset,
    cls: type,
    res: Any,
    batch_size: int,
    kwargs: dict,
    size: int | None = None,
    batch_format: str = "pyarrow",
) -> ray.data.Dataset:
    """``ds`` mapped by a pool of ``cls`` actors (built with ``kwargs``), sized and placed by the stage's
    declared resources: ``res.num_actors`` actors (or ``size``) of ``remote_args(res)`` each. The one place
    a stage's resources become Ray Data's actor pool options. Under a stage's ``cost.Meter`` the actors
    report their start-up to it."""
    meter = cost.current()
    if meter is not None:
        cls = meter.wrap(cls, size or res.num_actors, res.num_cpus, res.num_gpus)
    if _warm and not res.num_gpus and ray.is_initialized():  # a GPU task's device is not its process's
        fn = _warm_iter if inspect.isgeneratorfunction(cls.__call__) else _warm_call
        return ds.map_batches(
            fn,
            fn_kwargs={"cls": cls, "kwargs": kwargs, "key": uuid.uuid4().hex, "stage": _stage_token(meter)},
            concurrency=size or res.num_actors,
            batch_size=batch_size,
            batch_format=batch_format,
            **remote_args(res),
        )
    return ds.map_batches(
        cls,
        fn_constructor_kwargs=kwargs,
        compute=ray.data.ActorPoolStrategy(size=size or res.num_actors),
        batch_size=batch_size,
        batch_format=batch_format,
        **remote_args(res),
    )


def _stage_token(meter) -> str:
    """Which stage a pool belongs to: pools of one stage keep each other's instances."""
    return f"{os.getpid()}:{id(meter)}" if meter is not None else "unmetered"


def built(cls: type, kwargs: dict, key: str, stage: str) -> Any:
    """In a Ray worker process: the pool ``key``'s instance of ``cls``, built by the first of its tasks
    that lands here. Another stage's instances go first; at most ``MAX_BUILT`` stay (the oldest goes)."""
    if key in _built:
        _built.move_to_end(key)
        return _built[key][1]
    for k in [k for k, (s, _) in _built.items() if s != stage]:
        del _built[k]
    while len(_built) >= MAX_BUILT:
        _built.popitem(last=False)
    inst = cls(**kwargs)
    _built[key] = (stage, inst)
    return inst


def _warm_call(batch, cls: type, kwargs: dict, key: str, stage: str):
    return built(cls, kwargs, key, stage)(batch)


def _warm_iter(batch, cls: type, kwargs: dict, key: str, stage: str):
    yield from built(cls, kwargs, key, stage)(batch)
