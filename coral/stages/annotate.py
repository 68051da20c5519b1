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

import hashlib
import json
import posixpath
import time
from collections import Counter

import pyarrow as pa
import pyarrow.dataset as pads
import ray

from coral import ray_runtime, storage
from coral import schemas as S
from coral.annotate import parse, prompts
from coral.annotate.engines import VLM_TYPES, Generation, make_engine
from coral.config import AnnotateConfig, Config, EngineConfig
from coral.errors import ConfigError
from coral.manifest import StageResult
from coral.stages.base import StageContext, count_rejected, count_rows, write_rejected
from coral.storage import Location

PAIR_ID, DESCRIPTION, QUERY_IMAGE, TARGET_IMAGE = "pair_id", "description", "query_image", "target_image"
DESCRIBED = pa.schema(
    [
        (PAIR_ID, pa.string()),
        (S.QUERY_ID, pa.string()),
        (S.TARGET_ID, pa.string()),
        (S.HARD_NEGATIVE_IDS, pa.list_(pa.string())),
        (S.SPLIT, pa.string()),
        (DESCRIPTION, pa.string()),
    ]
)


class Describe:
    """Step 1: the pair's two images -> a description of WORD_NUM words."""

    name = "describe"
    out_schema = DESCRIBED

    def __init__(self, cfg: AnnotateConfig, images: ray.ObjectRef | pa.Table):
        self.cfg = cfg
        table = ray.get(images) if isinstance(images, ray.ObjectRef) else images
        self.images = dict(
            zip(table.column(S.ID).to_pylist(), table.column(S.IMAGE).to_pylist(), strict=True)
        )

    def prompt(self, row: dict) -> list[dict]:
        word_num = prompts.draw_word_num(prompts.rng_for(self.cfg.seed, row[PAIR_ID]), self.cfg.word_num)
        return prompts.describe_prompt(self.images[row[S.QUERY_ID]], self.images[row[S.TARGET_ID]], word_num)

    def parse(self, row: dict, text: str) -> tuple[list[dict], str | None]:
        reason = parse.check_description(text, self.cfg.description_words, self.cfg.english_only)
        if reason:
            return [], reason
        keep = {k: row[k] for k in (PAIR_ID, S.QUERY_ID, S.TARGET_ID, S.HARD_NEGATIVE_IDS, S.SPLIT)}
        return [{**keep, DESCRIPTION: text.strip()}], None


class Instruct:
    """Step 2: a description -> at least ``min_instructions`` instructions, one triplet each."""

    name = "instruct"
    out_schema = S.TRIPLETS

    def __init__(self, cfg: AnnotateConfig):
        self.cfg, self.seed = cfg, cfg.seed + 1

    def head(self, key: str) -> int:
        """The pair's demonstration set: pairs with the same one share the prompt's head."""
        return prompts.demonstration_set(self.seed, key, self.cfg.demonstration_sets)

    def prompt(self, row: dict) -> list[dict]:
        cfg = self.cfg
        demos = prompts.demonstrations_for(
            self.seed, row[PAIR_ID], cfg.demonstrations, cfg.demonstration_sets
        )
        return prompts.instruct_prompt(
            row[DESCRIPTION], demos, self.cfg.min_instructions, self.cfg.instruction_words[1]
        )

    def parse(self, row: dict, text: str) -> tuple[list[dict], str | None]:
        kept, reason = parse.parse_instructions(
            text,
            row[DESCRIPTION],
            self.cfg.instruction_words,
            self.cfg.english_only,
            self.cfg.min_instructions,
            self.cfg.max_instructions,
        )
        return [triplet(row, i, inst) for i, inst in enumerate(kept)], reason


def triplet(row: dict, i: int, instruction: str) -> dict:
    return {
        S.QUERY_ID: f"{row[PAIR_ID]}#{i}",
        S.QUERY_TEXT: f"{S.IMAGE_SLOT}\n{instruction}",
        S.QUERY_IMAGE_IDS: [row[S.QUERY_ID]],
        S.POSITIVE_IDS: [row[S.TARGET_ID]],
        S.HARD_NEGATIVE_IDS: list(row[S.HARD_NEGATIVE_IDS]),
        S.SOURCE: "megapairs",
        S.SPLIT: row[S.SPLIT],  # the pair's: held-out pairs give held-out instructions
        S.LANGUAGE: "en",
        S.CLASS: "",
        S.NUM_CONDITIONS: 1,
        S.CONDITION_KEYS: [],
    }


def finish(
    step,
    rows: list[dict],
    gens: list[Generation],
    rejected: Location,
    stats: Location,
    heads: int | None = None,
) -> pa.Table:
    """Parse each generation; write the failures (with the raw text) and the batch's request counts."""
    out, bad = [], []
    for row, gen in zip(rows, gens, strict=True):
        if gen.error is not None:
            bad.append({S.ID: row[PAIR_ID], S.REASON: f"{step.name}: {gen.error}", S.RAW: ""})
            continue
        parsed, reason = step.parse(row, gen.text or "")
        if reason is not None:
            bad.append({S.ID: row[PAIR_ID], S.REASON: f"{step.name}: {reason}", S.RAW: gen.text})
        out.extend(parsed)
    write_rejected(rejected, bad, S.REJECTED_RAW)
    write_stats(stats, step.name, [r[PAIR_ID] for r in rows], gens, heads)
    return pa.Table.from_pylist(out, schema=step.out_schema)


def write_stats(
    loc: Location, step: str, keys: list[str], gens: list[Generation], heads: int | None = None
) -> None:
    """One small JSON per batch, named after its rows so that a retried batch overwrites its own; ``heads``:
    the distinct shared prompt heads the batch's rows had (an hf engine with a prefix cache)."""
    if not keys:
        return
    name = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]
    errors = Counter(g.error.split(" after ")[0] for g in gens if g.error)
    body = {
        "requests": len(gens),
        "attempts": sum(g.attempts for g in gens),
        "errors": dict(errors),
        "done_at": round(time.time(), 3),  # for the step's throughput after start-up
    }
    if heads is not None:
        body["prompt_heads"] = heads
    storage.write_json(loc.child(f"{step}-{name}.json"), body)


class StepActor:
    """Ray Data callable class: one step on an ``hf`` or ``openai`` engine, loaded once per actor."""

    def __init__(self, step, engine: EngineConfig, rejected: Location, stats: Location):
        if engine.kind == "hf":
            import torch

            torch.set_num_threads(max(1, int(engine.num_cpus)))  # the actor's share, not every core
        self.step, self.engine, self.rejected, self.stats = step, make_engine(engine), rejected, stats

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        cache = getattr(self.engine, "prefixes", None)
        before = cache.hits + cache.misses if cache else 0
        gens = self.engine.generate([self.step.prompt(r) for r in rows])
        heads = cache.hits + cache.misses - before if cache else None
        return finish(self.step, rows, gens, self.rejected, self.stats, heads)


def run_step(ds: ray.data.Dataset, step, engine: EngineConfig, rejected: Location, stats: Location):
    if engine.kind == "vllm":
        from coral.annotate import vllm

        return vllm.run_step(ds, step, engine, rejected, stats)
    return ds.map_batches(
        StepActor,
        fn_constructor_kwargs={"step": step, "engine": engine, "rejected": rejected, "stats": stats},
        compute=ray.data.ActorPoolStrategy(size=engine.num_actors),
        batch_size=engine.batch_size,
        batch_format="pyarrow",
        **ray_runtime.remote_args(engine.num_cpus, engine.num_gpus, engine.accelerator_type),
    )


def order_by_head(pairs: pa.Table, instruct: Instruct) -> pa.Table:
    """Pairs with the same demonstration set next to each other (in their order otherwise), so that the
    instruct step's batches share prompt heads, which the engines compute, and attend to, once per batch."""
    if not instruct.cfg.demonstration_sets:
        return pairs
    heads = [instruct.head(k) for k in pairs.column(PAIR_ID).to_pylist()]
    return pairs.take(sorted(range(len(heads)), key=heads.__getitem__))


def image_table(ctx: StageContext, ids: set[str]) -> pa.Table:
    """(id, image bytes) of the images the pairs reference, from the embed stage's source."""
    cfg = ctx.config.embed
    if cfg.source == "catalog":
        src = ctx.data("catalog")
        table = storage.read_dataset(src, columns=[S.ID, S.IMAGE], filter=pads.field(S.ID).isin(sorted(ids)))
    else:
        from coral.stages.embed import image_id

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


def step_stats(stats: Location) -> dict:
    """Per step: requests, attempts, retries and errors, and ``pairs_per_s_after_first_batch``: the pairs
    of every batch but the first over the time from the first batch's end to the last's, that is the
    step's rate once its actors are up (in a pipeline, the rate its input arrives at, if slower). With an
    hf prefix cache, ``prompt_heads`` over ``batches``: how many distinct shared heads a batch had."""
    out: dict[str, dict] = {}
    done: dict[str, list[tuple[float, int]]] = {}
    for path in storage.list_files(stats, ".json"):
        step = posixpath.basename(path).split("-", 1)[0]
        body = json.loads(storage.read_bytes(Location(stats.uri, stats.fs, path)))
        agg = out.setdefault(step, {"requests": 0, "attempts": 0, "errors": Counter()})
        agg["requests"] += body["requests"]
        agg["attempts"] += body["attempts"]
        agg["errors"].update(body["errors"])
        if "prompt_heads" in body:
            agg["prompt_heads"] = agg.get("prompt_heads", 0) + body["prompt_heads"]
            agg["batches"] = agg.get("batches", 0) + 1
        done.setdefault(step, []).append((body["done_at"], body["requests"]))
    for step, agg in out.items():
        agg["retries"] = agg["attempts"] - agg["requests"]
        agg["errors"] = dict(agg["errors"])
        times = sorted(done[step])
        span = times[-1][0] - times[0][0]
        if len(times) > 1 and span > 0:
            agg["pairs_per_s_after_first_batch"] = round(sum(n for _, n in times[1:]) / span, 3)
    return out


class AnnotateStage:
    name = "annotate"

    def inputs(self, config: Config) -> tuple[str, ...]:
        return ("mine", "catalog") if config.embed.source == "catalog" else ("mine",)

    def section(self, config: Config) -> AnnotateConfig:
        return config.annotate

    def validate(self, config: Config) -> None:
        from coral.models import loader

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
