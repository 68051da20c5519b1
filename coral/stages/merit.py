"""merit: MERIT multi-condition product queries composed from the catalog (REFERENCE.md section 4).

Per split (``train``, ``test`` by default), over that split's products: ``merit.queries[split]`` query
draws, each with 2-4 conditions "the same {attribute} as <Product i>", all positives computed exactly
(every product of the class meeting every condition) and kept only when 0 < positive rate < ``max_rate``;
plus, with ``cold_start``, one query per near-duplicate pair. The draws are spread over Ray tasks by
query index; each query depends only on (pool, seed, index), so the output does not depend on the
sharding. Draws that give no valid query go to ``rejected/`` with the reason.

Units: ``rows_in`` counts query draws, ``rows_out`` queries written, ``rows_rejected`` draws rejected.
Also written: out-of-distribution split labels under ``ood/{language,attribute,class}/`` (query id ->
``train`` or ``ood_{kind}_{value}``), and with ``export`` MERIT's JSON files and the images they name
under ``export/``.
"""

from __future__ import annotations

import posixpath
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from coral import schemas as S
from coral import storage
from coral.config import Config, MeritConfig
from coral.errors import ConfigError
from coral.manifest import StageResult
from coral.merit import compose, formats, llm, ood
from coral.stages.annotate import step_stats
from coral.stages.base import StageContext, count_rejected, count_rows, write_rejected

PRODUCT_COLUMNS = [S.ID, S.GROUP_ID, S.CLASS, S.ATTRIBUTES, S.TITLE, S.LANGUAGE, S.SPLIT]
OOD = pa.schema([(S.QUERY_ID, pa.string()), (S.SPLIT, pa.string())])


def params(cfg: MeritConfig, split: str, n: int) -> compose.ComposeParams:
    return compose.ComposeParams(
        num_queries=n,
        max_rate=cfg.max_rate,
        max_positives=cfg.max_positives,
        hard_negatives=cfg.hard_negatives,
        id_prefix=f"merit-{split}-",
        cold_id_prefix=f"merit_cold-{split}-",
    )


@ray.remote
def _compose(pool: list[dict], p: compose.ComposeParams, seed: int, lo: int, hi: int, cold: bool):
    index = compose.ProductIndex(pool)
    fn = compose.cold_start_queries if cold else compose.compose_table
    return fn(index, p, seed, range(lo, hi))


def compose_split(
    pool: list[dict], p: compose.ComposeParams, seed: int, tasks: int, cold: bool
) -> tuple[list, list, int]:
    """(rows, rejected, draws) for one split's pool: composed queries, then (with ``cold``) one cold-start
    query per near-duplicate pair, each kind sharded by index over at most ``tasks`` Ray tasks."""
    pool_ref = ray.put(pool)
    counts = [(False, p.num_queries), (True, len(compose.near_duplicate_pairs(pool)) if cold else 0)]
    jobs = []
    for is_cold, n in counts:
        bounds = np.linspace(0, n, max(1, min(tasks, n)) + 1).astype(int)
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            if hi > lo:
                jobs.append(_compose.remote(pool_ref, p, seed, int(lo), int(hi), is_cold))
    rows, rejected = [], []
    for r, bad in ray.get(jobs):
        rows += r
        rejected += bad
    return rows, rejected, sum(n for _, n in counts)


def ood_labels(cfg: MeritConfig, rows: list[dict], languages: dict[str, str]) -> dict[str, list]:
    return {
        "language": ood.language_ood(rows, languages, cfg.ood_languages),
        "attribute": ood.attribute_ood(rows, cfg.ood_attributes),
        "class": ood.class_ood(rows, cfg.ood_classes),
    }


class MeritStage:
    name = "merit"

    def inputs(self, config: Config) -> tuple[str, ...]:
        return ("catalog",)

    def section(self, config: Config) -> MeritConfig:
        return config.merit

    def validate(self, config: Config) -> None:
        unknown = set(config.merit.ood_attributes) - set(S.ATTRIBUTE_KEYS)
        if unknown:
            raise ConfigError(
                f"merit.ood_attributes: unknown {sorted(unknown)} (known: {list(S.ATTRIBUTE_KEYS)})"
            )

    def run(self, ctx: StageContext) -> StageResult:
        cfg = ctx.config.merit
        src = ctx.data("catalog")
        products = pq.read_table(src.path, filesystem=src.fs, columns=PRODUCT_COLUMNS).to_pylist()
        label_details = {}
        if cfg.label is not None:
            products, label_details = label(ctx, products)
        by_split: dict[str, list[dict]] = {}
        for p in products:
            by_split.setdefault(p[S.SPLIT], []).append(p)
        missing = sorted(s for s, n in cfg.queries.items() if n and s not in by_split)
        if missing:
            raise ConfigError(f"merit.queries: the catalog has no products in split(s) {missing}")
        rows, rejected, draws, per_split = [], [], 0, {}
        for split, n in sorted(cfg.queries.items()):
            pool = by_split.get(split, [])
            r, bad, d = compose_split(pool, params(cfg, split, n), cfg.seed, cfg.num_tasks, cfg.cold_start)
            rows, rejected, draws = rows + r, rejected + bad, draws + d
            per_split[split] = {
                "draws": d,
                "queries": len(r),
                "cold_start": sum(x[S.SOURCE] == "merit_cold" for x in r),
            }
        write_rejected(ctx.rejected(self.name), rejected)
        if cfg.rewrite is not None or cfg.judge is not None:
            rows = llm_steps(ctx, rows)
        out = ctx.data(self.name)
        storage.write_parquet(out.child("part-00000.parquet"), pa.Table.from_pylist(rows, schema=S.TRIPLETS))
        languages = {p[S.ID]: p[S.LANGUAGE] for p in products}
        ood_counts = {}
        for kind, labels in ood_labels(cfg, rows, languages).items():
            kept = [
                {S.QUERY_ID: r[S.QUERY_ID], S.SPLIT: lab} for r, lab in zip(rows, labels, strict=True) if lab
            ]
            loc = ctx.stage_dir(self.name).child("ood", kind, "part-00000.parquet")
            storage.write_parquet(loc, pa.Table.from_pylist(kept, schema=OOD))
            ood_counts[kind] = dict(Counter(k[S.SPLIT] for k in kept))
        if cfg.export:
            export(ctx, rows, products)
        reasons = count_rejected(ctx.rejected(self.name))
        if len(rows) + sum(reasons.values()) != draws:
            raise RuntimeError(
                f"merit: {draws} draws but {len(rows)} queries + {sum(reasons.values())} rejected"
            )
        details = {
            "splits": per_split,
            "conditions": dict(Counter(str(r[S.NUM_CONDITIONS]) for r in rows)),
            "languages": dict(Counter(r[S.LANGUAGE] for r in rows)),
            "ood": ood_counts,
        }
        if label_details:
            details["label"] = label_details
        if cfg.rewrite is not None or cfg.judge is not None:
            details["llm"] = step_stats(ctx.stage_dir(self.name).child("stats"))
            details["llm"]["rewrites_failed"] = count_rows(ctx.stage_dir(self.name).child("rewrites"))
        return StageResult(draws, len(rows), reasons, details=details)


def label(ctx: StageContext, products: list[dict]) -> tuple[list[dict], dict]:
    """MERIT step 2: a VLM labels the products that lack a label (or all), from attribute cards built
    on the labelled ones; then the label filters (missing values, values seen once, keys with fewer than
    two values, per class). Products the VLM cannot label keep no attributes (still candidates)."""
    from coral.merit import cards as card_lib
    from coral.stages.annotate import run_step

    cfg, stage = ctx.config.merit, ctx.stage_dir("merit")
    complete = [p for p in products if all(not card_lib.is_missing(v) for v in p[S.ATTRIBUTES].values())]
    todo = products if cfg.label_products == "all" else [p for p in products if p not in complete]
    if not todo:
        return products, {"requests": 0}
    cards = card_lib.build_cards(complete or products)
    src = ctx.data("catalog")
    ids = [p[S.ID] for p in todo]
    table = pq.read_table(src.path, filesystem=src.fs, columns=[S.ID, S.IMAGE], filters=[(S.ID, "in", ids)])
    images = dict(zip(table.column(S.ID).to_pylist(), table.column(S.IMAGE).to_pylist(), strict=True))
    schema = pa.schema([S.CATALOG.field(c) for c in PRODUCT_COLUMNS]).append(
        pa.field(llm.PAIR_ID, pa.string())
    )
    rows = pa.Table.from_pylist([{**p, llm.PAIR_ID: p[S.ID]} for p in todo], schema=schema)
    ds = ray.data.from_arrow(rows).repartition(target_num_rows_per_block=cfg.label.batch_size)
    ds = run_step(
        ds, llm.Label(cards, images, schema), cfg.label, stage.child("label_rejected"), stage.child("stats")
    )
    labelled = {r[S.ID]: {k: v for k, v in r.items() if k != llm.PAIR_ID} for r in ds.take_all()}
    unlabelled = dict.fromkeys(S.ATTRIBUTE_KEYS)
    todo_ids = set(ids)
    out = [
        labelled.get(p[S.ID]) or ({**p, S.ATTRIBUTES: unlabelled} if p[S.ID] in todo_ids else p)
        for p in products
    ]
    details = {"requests": len(todo), "labelled": len(labelled), "failed": len(todo) - len(labelled)}
    return card_lib.filter_labels(out), details


def llm_steps(ctx: StageContext, rows: list[dict]) -> list[dict]:
    """The optional rewrite and judge steps over the composed queries, on their engines."""
    from coral.stages.annotate import run_step

    cfg, stage = ctx.config.merit, ctx.stage_dir("merit")
    rejected, stats = ctx.rejected("merit"), stage.child("stats")
    steps = [(llm.Rewrite(stage.child("rewrites")), cfg.rewrite), (llm.Judge(), cfg.judge)]
    steps = [(step, engine) for step, engine in steps if engine is not None]
    batch = min(engine.batch_size for _, engine in steps)
    table = pa.Table.from_pylist([llm.keyed(r) for r in rows], schema=llm.Rewrite.out_schema)
    ds = ray.data.from_arrow(table).repartition(target_num_rows_per_block=batch)
    for step, engine in steps:
        ds = run_step(ds, step, engine, rejected, stats)
    return sorted((llm.unkeyed(r) for r in ds.take_all()), key=lambda r: r[S.QUERY_ID])


def export(ctx: StageContext, rows: list[dict], products: list[dict]) -> None:
    """MERIT's JSON: queries-{split}.json, candidates-test.json, and the images they name (PNG)."""
    root = ctx.stage_dir("merit").child("export")

    def path_of(pid: str) -> str:
        return f"images/{pid}.png"

    for split in sorted({r[S.SPLIT] for r in rows}):
        items = [formats.to_merit_query(r, path_of) for r in rows if r[S.SPLIT] == split]
        storage.write_bytes(root.child(f"queries-{split}.json"), formats.dumps(items).encode())
    test = [p for p in products if p[S.SPLIT] == "test"]
    items = [formats.to_merit_candidate(p[S.ID], p[S.TITLE], path_of(p[S.ID])) for p in test]
    storage.write_bytes(root.child("candidates-test.json"), formats.dumps(items).encode())
    named = {i for r in rows for i in r[S.QUERY_IMAGE_IDS]} | {p[S.ID] for p in test}
    src = ctx.data("catalog")
    table = pq.read_table(src.path, filesystem=src.fs, columns=[S.ID, S.IMAGE])
    for pid, image in zip(table.column(S.ID).to_pylist(), table.column(S.IMAGE).to_pylist(), strict=True):
        if pid in named:
            storage.write_bytes(root.child(posixpath.join("images", f"{pid}.png")), image)
