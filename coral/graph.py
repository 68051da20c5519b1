"""The graph driver: order stages, skip the completed ones, run the rest, write manifests, summarise.

It schedules nothing itself: Ray schedules the work inside each stage. A stage is skipped when its
``_SUCCESS`` marker exists and its manifest's config hash and input hashes match this run's.
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass

from coral import manifest, ray_runtime, storage
from coral.config import Config, section_dict
from coral.errors import ConfigError
from coral.stages import STAGES, StageContext

log = logging.getLogger(__name__)


class StageFailed(RuntimeError):
    def __init__(self, stage: str, cause: BaseException):
        super().__init__(f"stage '{stage}' failed: {type(cause).__name__}: {cause}")
        self.stage = stage


@dataclass
class SummaryRow:
    stage: str
    status: str  # ran | skipped
    rows_in: int
    rows_out: int
    rows_rejected: int
    seconds: float


def select(config: Config, start: str | None = None, until: str | None = None) -> list[str]:
    """The stages to consider, in order; unknown names are ConfigErrors."""
    order = list(config.run.stages)
    for name in order:
        if name not in STAGES:
            raise ConfigError(f"run.stages: unknown stage '{name}' (known: {', '.join(STAGES)})")
    for flag, name in (("--from", start), ("--until", until)):
        if name is not None and name not in order:
            raise ConfigError(f"{flag} {name}: not one of this run's stages ({', '.join(order)})")
    lo = order.index(start) if start else 0
    hi = order.index(until) + 1 if until else len(order)
    if lo >= hi:
        raise ConfigError(f"--from {start} comes after --until {until}")
    for name in order:
        missing = [i for i in STAGES[name].inputs if i not in order]
        if missing:
            raise ConfigError(f"run.stages: stage '{name}' needs {missing}, which the run does not have")
    return order[lo:hi]


def run_graph(config: Config, start: str | None = None, until: str | None = None) -> list[SummaryRow]:
    """Run the selected stages. ``start`` (--from) reruns that stage and everything after it."""
    names = select(config, start, until)
    root = storage.resolve(config.run.run_root, config.storage)
    storage.ensure_writable(root)
    ctx = StageContext(config, root)
    rows = []
    for name in names:
        rows.append(_run_stage(ctx, name, force=start is not None))
    return rows


def _run_stage(ctx: StageContext, name: str, force: bool) -> SummaryRow:
    stage = STAGES[name]
    section = section_dict(stage.section(ctx.config))
    inputs = {i: ctx.manifest(i)["hash"] for i in stage.inputs}
    stage_dir = ctx.stage_dir(name)
    done = manifest.read_complete(stage_dir)
    expected = manifest.lineage_hash(name, manifest.stable_hash(section), inputs)
    if done is not None and not force and done.get("hash") == expected:
        log.info("%s: skipped (complete, config and inputs unchanged) at %s", name, stage_dir.uri)
        return SummaryRow(name, "skipped", done["rows_in"], done["rows_out"], done["rows_rejected"], 0.0)
    if done is not None:
        log.info("%s: config or inputs changed, rerunning", name)
    storage.delete_tree(stage_dir)
    ray_runtime.connect(ctx.config.ray)
    log.info("%s: running -> %s", name, stage_dir.uri)
    started = time.time()
    try:
        result = stage.run(ctx)
    except BaseException as e:
        failed = manifest.build(name, section, inputs, "failed", started, error=f"{type(e).__name__}: {e}")
        try:
            manifest.write_failed(stage_dir, failed)
        except Exception:
            log.warning("%s: could not record the failure:\n%s", name, traceback.format_exc())
        if isinstance(e, KeyboardInterrupt | SystemExit):
            raise
        raise StageFailed(name, e) from e
    m = manifest.build(name, section, inputs, "complete", started, result=result)
    manifest.write_complete(stage_dir, m)
    return SummaryRow(name, "ran", result.rows_in, result.rows_out, result.rows_rejected, m["duration_s"])


def format_summary(rows: list[SummaryRow]) -> str:
    header = ("stage", "status", "rows_in", "rows_out", "rejected", "seconds")
    body = [
        (r.stage, r.status, str(r.rows_in), str(r.rows_out), str(r.rows_rejected), f"{r.seconds:.1f}")
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(header, *body, strict=True)]

    def line(cells):
        return "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, body)])
