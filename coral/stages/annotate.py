"""annotate: MegaPairs annotation of the mined pairs (REFERENCE.md section 2).

Step 1 (describe): a VLM sees the query and the target image and describes what they share and how they
differ (WORD_NUM words, drawn per pair). Step 2 (instruct): an LLM turns the description into several
retrieval instructions, its prompt carrying demonstrations drawn from the repo's pool. Each step runs
on the configured engine: ``hf`` or ``openai`` in a Ray Data actor pool, ``vllm`` through
``ray.data.llm``. Every output is validated; a pair whose description or instructions fail goes to
``rejected/`` with the reason and the raw text. Output: one triplet per instruction (schema TRIPLETS).

Every triplet keeps its pair's split (``mine`` pairs held-out images among themselves), so the held-out
instructions are the evaluation's queries; ``annotate.max_pairs`` caps each split.

Units: ``rows_in`` counts pairs, ``rows_out`` pairs annotated, ``rows_rejected`` pairs rejected;
``details.triplets`` counts the rows written. Requests and retries per step are in ``details``.

Images come from the embed stage's source: the catalog table (the rows the pairs reference, read once
and shared through the object store) or the images folder.
"""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import ray

from coral import schemas as S
from coral import storage
from coral.annotate import prompts
from coral.annotate.engines import VLM_TYPES
from coral.annotate.runner import run_step
from coral.annotate.steps import PAIR_ID, Describe, Instruct, order_by_head, step_stats
from coral.catalog import lookup
from coral.config import AnnotateConfig, Config, Resources
from coral.errors import ConfigError
from coral.manifest import StageResult
from coral.models import loader
from coral.stages.base import StageContext, count_rejected, count_rows
from coral.stages.embed import image_id
from coral.storage import Location


def image_table(ctx: StageContext, ids: set[str]) -> pa.Table:
    """(id, image bytes) of the images the pairs reference, from the embed stage's source."""
    cfg = ctx.config.embed
    if cfg.source == "catalog":
        table = lookup.read(ctx.root, [S.ID, S.IMAGE], ids)
    else:
        src = storage.resolve(cfg.images.uri, ctx.config.storage)
        paths = {image_id(p, src.path): p for p in storage.list_files(src)}
        found = sorted(i for i in ids if i in paths)
        data = [storage.read_bytes(Location(src.uri, src.fs, paths[i])) for i in found]
        table = pa.table({S.ID: found, S.IMAGE: pa.array(data, pa.binary())})
    missing = ids - set(table.column(S.ID).to_pylist())
    if missing:
        raise ConfigError(
            f"annotate: {len(missing)} paired images are not in the source, e.g. {min(missing)}"
        )
    return table


class AnnotateStage:
    name = "annotate"

    def inputs(self, config: Config) -> tuple[str, ...]:
        return ("mine", "catalog") if config.embed.source == "catalog" else ("mine",)

    def section(self, config: Config) -> AnnotateConfig:
        return config.annotate

    def output(self, config: Config) -> pa.Schema:
        return S.TRIPLETS

    def resources(self, config: Config) -> dict[str, Resources]:
        return {"describe": config.annotate.describe, "instruct": config.annotate.instruct}

    def validate(self, config: Config) -> None:
        cfg = config.annotate
        pool = len(prompts.demonstrations())
        if cfg.demonstrations > pool:
            raise ConfigError(f"annotate.demonstrations={cfg.demonstrations}, but the pool holds {pool}")
        for step in ("describe", "instruct"):
            engine = getattr(cfg, step)
            if engine.kind in ("hf", "vllm"):
                kind = loader.model_type(engine.model)  # a missing path fails now, before any stage runs
                if step == "describe" and engine.kind == "hf" and kind not in VLM_TYPES:
                    raise ConfigError(
                        f"annotate.describe.model: '{engine.model}' is a '{kind}' model; describing image "
                        f"pairs needs a vision-language model ({', '.join(VLM_TYPES)})"
                    )
            if engine.kind == "vllm":
                try:
                    import vllm  # noqa: F401
                except ImportError:
                    raise ConfigError(f"annotate.{step}.kind=vllm needs vLLM: pip install .[vllm]") from None

    def run(self, ctx: StageContext) -> StageResult:
        cfg = ctx.config.annotate
        out, rejected, stats = (
            ctx.data(self.name),
            ctx.rejected(self.name),
            ctx.stage_dir(self.name).child("stats"),
        )
        src = ctx.data("mine")
        pairs = storage.read_table(src, columns=[S.QUERY_ID, S.TARGET_ID, S.HARD_NEGATIVE_IDS, S.SPLIT])
        if cfg.max_pairs:
            pairs = first_per_split(pairs, cfg.max_pairs)
        keys = [
            f"{q}>{t}"
            for q, t in zip(pairs[S.QUERY_ID].to_pylist(), pairs[S.TARGET_ID].to_pylist(), strict=True)
        ]
        pairs = pairs.add_column(0, PAIR_ID, pa.array(keys, pa.string()))
        instruct = Instruct(cfg)
        pairs = order_by_head(pairs, instruct)
        ids = set(pairs[S.QUERY_ID].to_pylist()) | set(pairs[S.TARGET_ID].to_pylist())
        images = ray.put(image_table(ctx, ids))
        batch = min(cfg.describe.batch_size, cfg.instruct.batch_size)
        ds = ray.data.from_arrow(pairs).repartition(target_num_rows_per_block=batch)
        ds = run_step(ds, Describe(cfg, images), cfg.describe, rejected, stats)
        ds = run_step(ds, instruct, cfg.instruct, rejected, stats)
        ds.write_parquet(out.path, filesystem=out.fs)
        triplets = count_rows(out)
        annotated = len({q.rsplit("#", 1)[0] for q in _query_ids(out)}) if triplets else 0
        reasons = count_rejected(rejected)
        if annotated + sum(reasons.values()) != len(pairs):
            raise RuntimeError(
                f"annotate: {len(pairs)} pairs in but {annotated} annotated + {sum(reasons.values())} rejected"
            )
        return StageResult(
            len(pairs), annotated, reasons, details={"triplets": triplets, **step_stats(stats)}
        )


def first_per_split(pairs: pa.Table, n: int) -> pa.Table:
    """The first ``n`` pairs of each split, in the mined order (so a cap never starves the held-out split)."""
    seen: Counter = Counter()
    keep = []
    for i, split in enumerate(pairs.column(S.SPLIT).to_pylist()):
        seen[split] += 1
        if seen[split] <= n:
            keep.append(i)
    return pairs.take(keep)


def _query_ids(loc: Location) -> list[str]:
    return storage.read_table(loc, columns=[S.QUERY_ID]).column(S.QUERY_ID).to_pylist()
