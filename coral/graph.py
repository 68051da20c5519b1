"""The graph driver: order stages, skip the completed ones, run the rest, write manifests, summarise.

It schedules nothing itself: Ray schedules the work inside each stage. A stage is skipped when its
``_SUCCESS`` marker exists and its manifest's config hash and input hashes match this run's. A stage that
fails leaves a ``failed`` manifest and its full traceback in ``{stage}/error.log``.
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass

from coral import cost, manifest, ray_runtime, report, storage
from coral.config import Config, section_dict, section_hash_dict
from coral.errors import ConfigError, UserInputError
from coral.lease import Lease, LeaseLost
from coral.stages.base import StageContext, check_output
from coral.stages.registry import STAGES

log = logging.getLogger(__name__)


class EmptyOutput(RuntimeError):
    """A stage wrote no rows: the next stage would get an empty table."""


def empty_output_message(name: str, rejected: dict[str, int], rows_in: int, most: int = 3) -> str:
    """``{stage} wrote 0 rows (of N in)``, and its most common rejection reasons with their counts."""
    top = sorted(rejected.items(), key=lambda kv: (-kv[1], kv[0]))[:most]
    why = "; ".join(f"{n} x {reason}" for reason, n in top) if top else "nothing was rejected either"
    return f"{name} wrote 0 rows ({rows_in} in); most common rejections: {why}"


ERROR_LOG = "error.log"  # a failed stage's full traceback, in its folder


class StageFailed(RuntimeError):
    """``stage 'x' failed: Error: message``; ``log``: the URI of its ``error.log`` (None if unwritten)."""

    def __init__(self, stage: str, cause: BaseException, log: str | None = None):
        super().__init__(f"stage '{stage}' failed: {type(cause).__name__}: {cause}")
        self.stage, self.log = stage, log


@dataclass
class SummaryRow:
    stage: str
    status: str  # ran | skipped
    rows_in: int
    rows_out: int
    rows_rejected: int
    seconds: float
    cost: dict | None = None  # the manifest's (coral.cost); None when skipped


def select(config: Config, start: str | None = None, until: str | None = None) -> list[str]:
    """The stages to consider, in order; unknown, repeated or misordered names are ConfigErrors."""
    order = list(config.run.stages)
    for i, name in enumerate(order):
        if name not in STAGES:
            raise ConfigError(f"run.stages: unknown stage '{name}' (known: {', '.join(STAGES)})")
        if name in order[:i]:
            raise ConfigError(f"run.stages: stage '{name}' is listed twice")
        for needed in STAGES[name].inputs(config):
            if needed not in order[:i]:
                raise ConfigError(f"run.stages: stage '{name}' needs '{needed}' before it")
    for flag, name in (("--from", start), ("--until", until)):
        if name is not None and name not in order:
            raise ConfigError(f"{flag} {name}: not one of this run's stages ({', '.join(order)})")
    lo = order.index(start) if start else 0
    hi = order.index(until) + 1 if until else len(order)
    if lo >= hi:
        raise ConfigError(f"--from {start} comes after --until {until}")
    return order[lo:hi]


def run_graph(
    config: Config,
    start: str | None = None,
    until: str | None = None,
    summary: list[SummaryRow] | None = None,
) -> list[SummaryRow]:
    """Run the selected stages. ``start`` (--from) reruns that stage and everything after it.

    Rows are appended to ``summary`` as stages finish, so a caller can report them after a failure."""
    names = select(config, start, until)
    for name in names:
        STAGES[name].validate(config)
    root = storage.resolve(config.run.run_root, config.storage)
    existed = storage.ensure_writable(root)
    # before any stage folder is read or touched, and before Ray starts: UserInputError naming the holder
    # while another run holds this run_root
    lease = Lease(root, config.storage, config.run.lease_ttl_s).acquire()
    try:
        ctx = StageContext(config, root)
        missing = [
            i for n in names for i in STAGES[n].inputs(config) if i not in names and not ctx.is_complete(i)
        ]
        if missing:
            lease.release()
            if not existed:
                storage.delete_tree(root)
            raise UserInputError(
                f"stage '{missing[0]}' is not complete under {root.uri}; run it first (drop --from, or --from {missing[0]})"
            )
        rows = [] if summary is None else summary
        for name in names:
            rows.append(_run_stage(ctx, name, force=start is not None, lease=lease))
        return rows
    finally:
        lease.release()


def _run_stage(ctx: StageContext, name: str, force: bool, lease: Lease | None = None) -> SummaryRow:
    stage = STAGES[name]
    section = stage.section(ctx.config)
    config_hash = manifest.stable_hash(section_hash_dict(section))
    inputs = {i: ctx.manifest(i)["hash"] for i in stage.inputs(ctx.config)}
    stage_dir = ctx.stage_dir(name)
    done = manifest.read_complete(stage_dir)
    if (
        done is not None
        and not force
        and not getattr(stage, "always_runs", False)
        and done.get("hash") == manifest.lineage_hash(name, config_hash, inputs)
    ):
        log.info("%s: skipped (complete, config and inputs unchanged) at %s", name, stage_dir.uri)
        return SummaryRow(name, "skipped", done["rows_in"], done["rows_out"], done["rows_rejected"], 0.0)
    if done is not None:
        log.info("%s: %s, rerunning", name, "--from given" if force else "config or inputs changed")
    log.info("%s: running -> %s%s", name, stage_dir.uri, describe_resources(stage.resources(ctx.config)))
    started = time.time()
    try:
        if lease is not None:
            lease.check()
        storage.delete_tree(stage_dir)
        with cost.Meter(name) as meter:
            ray_runtime.connect(ctx.config.ray)
            meter.fixed(started, time.time())  # Ray coming up (the first stage) is start-up
            result = stage.run(ctx)
        check_output(ctx.data(name), stage.output(ctx.config))
        if result.rows_out == 0:
            raise EmptyOutput(empty_output_message(name, result.rejected, result.rows_in))
        spent = meter.block(
            result.rows_in, result.rows_out, result.work_s, cost.parallelism(stage.resources(ctx.config))
        )
        m = manifest.build(
            name, section_dict(section), config_hash, inputs, "complete", started, result=result, cost=spent
        )
        if lease is not None:
            lease.check()  # never mark complete what another run may have written into
        manifest.write_complete(stage_dir, m)
    except BaseException as e:
        error = f"{type(e).__name__}: {e}"
        failed = manifest.build(
            name, section_dict(section), config_hash, inputs, "failed", started, error=error
        )
        error_log = None
        if not isinstance(e, LeaseLost):  # the stage folder is another run's now
            error_log = write_error_log(stage_dir, name, traceback.format_exc())
            try:
                manifest.write_failed(stage_dir, failed | ({"error_log": error_log} if error_log else {}))
            except Exception:
                log.warning("%s: could not record the failure:\n%s", name, traceback.format_exc())
        if isinstance(e, KeyboardInterrupt | SystemExit):
            raise
        raise StageFailed(name, e, error_log) from e
    return SummaryRow(
        name, "ran", result.rows_in, result.rows_out, result.rows_rejected, m["duration_s"], spent
    )


def write_error_log(stage_dir: storage.Location, name: str, trace: str) -> str | None:
    """The failed stage's traceback (its code's, chained causes included) into ``{stage}/error.log``;
    its URI, or None when it could not be written (a warning says why)."""
    loc = stage_dir.child(ERROR_LOG)
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    try:
        storage.write_bytes(loc, f"stage '{name}' failed at {when}\n\n{trace}".encode())
    except Exception:
        log.warning("%s: could not write %s:\n%s", name, loc.uri, traceback.format_exc())
        return None
    return loc.uri


def format_summary(rows: list[SummaryRow]) -> str:
    """The run's stages, what each read, wrote and rejected, and what it cost (``coral.cost``: the CPU-
    and GPU-seconds its Ray work held, peak memory, its units per second), with a total."""
    header = [
        "stage",
        "status",
        "rows_in",
        "rows_out",
        "rejected",
        "seconds",
        "cpu_s",
        "gpu_s",
        "peak_mem",
        "rate",
    ]
    body = [
        [r.stage, r.status, r.rows_in, r.rows_out, r.rows_rejected, f"{r.seconds:.1f}", *_cost(r.cost)]
        for r in rows
    ]
    ran = [r.cost for r in rows if r.cost]
    total = [
        f"{sum(r.seconds for r in rows):.1f}",
        f"{sum(c['cpu_s'] for c in ran):.1f}",
        f"{sum(c['gpu_s'] for c in ran):.1f}",
        report.gib(max((c["peak_memory_bytes"] for c in ran), default=0)),
        "",
    ]
    body.append(["total", "", "", "", sum(r.rows_rejected for r in rows), *total])
    return report.text_table(header, body, left=2)


def _cost(c: dict | None) -> list[str]:
    if not c:
        return ["-"] * 4
    rate = f"{c['rows_per_s']:.1f} {c['unit']}/s" if c.get("rows_per_s") is not None else "-"
    return [f"{c['cpu_s']:.1f}", f"{c['gpu_s']:.1f}", report.gib(c["peak_memory_bytes"]), rate]


def describe_resources(pools: dict) -> str:
    """`` (clip_image: 2 x 1 CPU; train: 2 x 1 CPU 1 GPU L4)`` for the start-up log line."""
    if not pools:
        return ""

    def one(r) -> str:
        gpu = f" {r.num_gpus:g} GPU" if r.num_gpus else ""
        return f"{r.num_actors} x {r.num_cpus:g} CPU{gpu}{' ' + r.accelerator_type if r.accelerator_type else ''}"

    return " (" + "; ".join(f"{k}: {one(r)}" for k, r in pools.items()) + ")"
