"""merit: MERIT multi-condition product queries composed from the catalog (REFERENCE.md section 4).

Per split (``train``, ``test`` by default), over that split's products: ``merit.queries[split]`` query
draws, each with 2-4 conditions "the same {attribute} as <Product i>", all positives computed exactly
(every product of the class meeting every condition) and kept only when 0 < positive rate < ``max_rate``;
plus, with ``cold_start``, one query per near-duplicate pair. The draws are spread over Ray tasks by
query index; each query depends only on (pool, seed, index), so the output does not depend on the
sharding. Draws that give no valid query go to ``rejected/`` with the reason.

MERIT step 4: a query is kept only with at least ``min_positives`` positives (cold-start queries: 1,
``coral.merit.compose``). With ``rerank_by`` set to an image encoder of ``embed.encoders``, the stage reads
the embed stage's vectors (``emb_{encoder}``) and ranks the kept positives and the hard negatives by their
mean cosine to the query products; the vectors of each split's products go to the Ray tasks through the
object store, and each task builds the similarity function from them. The optional rewrite step keeps
only the positives that carry an attribute value the rewrite adds (``coral.merit.llm``).

Units: ``rows_in`` counts query draws, ``rows_out`` queries written, ``rows_rejected`` draws rejected.
Also written: for each axis ``merit.ood`` holds out of training, out-of-distribution split labels under
``ood/{language,attribute,class}/`` (query id -> ``train`` or ``ood_{kind}_{value}``; the train stage
drops the rows that touch a held-out value, evaluate scores the labelled queries apart), and with
``export`` MERIT's layout under ``export/``: ``queries-{split}.json``, ``candidates-{split}.json`` (the
products of each split) and the images they name (``images/<id>.png``), and the same queries as
``{query, pos, neg}`` JSON lines, hard negatives included (``{split}.jsonl``, FlagEmbedding's and
Tevatron's training format; ``coral.catalog.formats``): a product whose id is not one safe file-name
component (``coral.paths.safe_name``), and every query naming it as a query product or positive, are left
out of the export, each with the reason under ``export_rejected/`` and counted in
``details.export_rejected`` (as a hard negative it is only left out of the query's ``neg``).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import ray

from coral import cost, storage
from coral import schemas as S
from coral.annotate.runner import run_step
from coral.annotate.steps import step_stats
from coral.catalog import formats, lookup
from coral.config import Config, MeritConfig, Resources
from coral.errors import ConfigError
from coral.manifest import StageResult
from coral.merit import cards as card_lib
from coral.merit import compose, llm, ood
from coral.models.kinds import modality
from coral.paths import PathError, safe_name
from coral.stages.base import StageContext, as_matrix, count_rejected, count_rows

PRODUCT_COLUMNS = [S.ID, S.GROUP_ID, S.CLASS, S.ATTRIBUTES, S.TITLE, S.LANGUAGE, S.SPLIT]
OOD = pa.schema([(S.QUERY_ID, pa.string()), (S.SPLIT, pa.string())])


def params(cfg: MeritConfig, split: str, n: int) -> compose.ComposeParams:
    return compose.ComposeParams(
        num_queries=n,
        max_rate=cfg.max_rate,
        min_positives=cfg.min_positives,
        max_positives=cfg.max_positives,
        hard_negatives=cfg.hard_negatives,
        id_prefix=f"merit-{split}-",
        cold_id_prefix=f"merit_cold-{split}-",
    )


Embeddings = tuple[list[str], np.ndarray]  # product ids, one float32 row per id


@ray.remote
def _compose(
    pool: list[dict],
    p: compose.ComposeParams,
    seed: int,
    lo: int,
    hi: int,
    cold: bool,
    embeddings: Embeddings | None = None,
    clock=None,
):
    cost.task_started(clock)
    index = compose.ProductIndex(pool)
    similarity = None if embeddings is None else compose.embedding_similarity(*embeddings)
    fn = compose.cold_start_queries if cold else compose.compose_table
    return fn(index, p, seed, range(lo, hi), similarity)


def compose_split(
    pool: list[dict],
    p: compose.ComposeParams,
    seed: int,
    tasks: int,
    cold: bool,
    embeddings: Embeddings | None = None,
) -> tuple[list, list, int]:
    """(rows, rejected, draws) for one split's pool: composed queries, then (with ``cold``) one cold-start
    query per near-duplicate pair, each kind sharded by index over at most ``tasks`` Ray tasks. With
    ``embeddings`` (the pool's image vectors) positives and hard negatives are ranked by similarity."""
    pool_ref = ray.put(pool)
    emb_ref = None if embeddings is None else ray.put(embeddings)
    counts = [(False, p.num_queries), (True, len(compose.near_duplicate_pairs(pool)) if cold else 0)]
    jobs = []
    for is_cold, n in counts:
        bounds = np.linspace(0, n, max(1, min(tasks, n)) + 1).astype(int)
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            if hi > lo:
                jobs.append(
                    _compose.remote(
                        pool_ref, p, seed, int(lo), int(hi), is_cold, emb_ref, cost.task_clock("compose")
                    )
                )
    rows, rejected = [], []
    for r, bad in ray.get(jobs):
        rows += r
        rejected += bad
    return rows, rejected, sum(n for _, n in counts)


def load_embeddings(ctx: StageContext, encoder: str) -> dict[str, np.ndarray]:
    """product id -> its vector in the embed stage's column ``emb_{encoder}``."""
    src, column = ctx.data("embed"), S.embedding_column(encoder)
    table = storage.read_table(src, columns=[S.ID, column])
    try:
        matrix = as_matrix(table.column(column))
    except ValueError as e:
        raise RuntimeError(f"merit: embed column {column} at {src.uri}: {e}") from None
    return dict(zip(table.column(S.ID).to_pylist(), matrix, strict=True))


def pool_embeddings(vectors: dict[str, np.ndarray], pool: list[dict]) -> tuple[Embeddings, int]:
    """(the pool's ids that have a vector with their vectors, how many products have none)."""
    ids = [p[S.ID] for p in pool if p[S.ID] in vectors]
    dim = len(next(iter(vectors.values()))) if vectors else 0
    matrix = np.stack([vectors[i] for i in ids]) if ids else np.zeros((0, dim), np.float32)
    return (ids, matrix), len(pool) - len(ids)


def ood_labels(cfg: MeritConfig, rows: list[dict], languages: dict[str, str]) -> dict[str, list]:
    """Labels of the axes ``merit.ood`` holds out (training leaves their values out; none when empty)."""
    labellers = {
        "language": lambda: ood.language_ood(rows, languages, cfg.ood_languages),
        "attribute": lambda: ood.attribute_ood(rows, cfg.ood_attributes),
        "class": lambda: ood.class_ood(rows, cfg.ood_classes),
    }
    return {axis: labellers[axis]() for axis in cfg.ood}


class MeritStage:
    name = "merit"

    def inputs(self, config: Config) -> tuple[str, ...]:
        return ("catalog", "embed") if config.merit.rerank_by else ("catalog",)

    def section(self, config: Config) -> MeritConfig:
        return config.merit

    def output(self, config: Config) -> pa.Schema:
        return S.TRIPLETS

    def resources(self, config: Config) -> dict[str, Resources]:
        cfg = config.merit
        steps = {"label": cfg.label, "rewrite": cfg.rewrite, "judge": cfg.judge}
        return {k: v for k, v in steps.items() if v is not None}

    def validate(self, config: Config) -> None:
        unknown = set(config.merit.ood_attributes) - set(S.ATTRIBUTE_KEYS)
        if unknown:
            raise ConfigError(
                f"merit.ood_attributes: unknown {sorted(unknown)} (known: {list(S.ATTRIBUTE_KEYS)})"
            )
        name = config.merit.rerank_by
        if name is not None:
            encoders = {e.name: e for e in config.embed.encoders}
            if name not in encoders:
                raise ConfigError(
                    f"merit.rerank_by: '{name}' is not an encoder of embed.encoders (known: {list(encoders)})"
                )
            if modality(encoders[name].kind) != "image":
                raise ConfigError(
                    f"merit.rerank_by: '{name}' is a {encoders[name].kind} encoder; MERIT re-ranks by image "
                    "similarity, name an image encoder"
                )
            if config.embed.source != "catalog":
                raise ConfigError(
                    "merit.rerank_by needs embed.source: catalog (the vectors must be the products')"
                )

    def run(self, ctx: StageContext) -> StageResult:
        cfg = ctx.config.merit
        products = lookup.read(ctx.root, PRODUCT_COLUMNS).to_pylist()
        label_details = {}
        if cfg.label is not None:
            products, label_details = label(ctx, products)
        by_split: dict[str, list[dict]] = {}
        for p in products:
            by_split.setdefault(p[S.SPLIT], []).append(p)
        missing = sorted(s for s, n in cfg.queries.items() if n and s not in by_split)
        if missing:
            raise ConfigError(f"merit.queries: the catalog has no products in split(s) {missing}")
        vectors = load_embeddings(ctx, cfg.rerank_by) if cfg.rerank_by else None
        rows, rejected, draws, per_split = [], [], 0, {}
        for split, n in sorted(cfg.queries.items()):
            pool = by_split.get(split, [])
            embeddings, unembedded = pool_embeddings(vectors, pool) if vectors is not None else (None, 0)
            p = params(cfg, split, n)
            r, bad, d = compose_split(pool, p, cfg.seed, cfg.num_tasks, cfg.cold_start, embeddings)
            rows, rejected, draws = rows + r, rejected + bad, draws + d
            per_split[split] = {
                "draws": d,
                "queries": len(r),
                "cold_start": sum(x[S.SOURCE] == "merit_cold" for x in r),
            }
            if vectors is not None:
                per_split[split]["without_vector"] = unembedded  # ranked last, left out of query means
        storage.write_rejected(ctx.rejected(self.name), rejected)
        if cfg.rewrite is not None or cfg.judge is not None:
            rows = llm_steps(ctx, rows, products)
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
        export_rejected = export(ctx, rows, products) if cfg.export else {}
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
        if cfg.export:
            details["export_rejected"] = export_rejected
        if cfg.rerank_by:
            details["rerank_by"] = cfg.rerank_by
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
    cfg, stage = ctx.config.merit, ctx.stage_dir("merit")
    complete = [p for p in products if all(not card_lib.is_missing(v) for v in p[S.ATTRIBUTES].values())]
    todo = products if cfg.label_products == "all" else [p for p in products if p not in complete]
    if not todo:
        return products, {"requests": 0}
    cards = card_lib.build_cards(complete or products)
    ids = [p[S.ID] for p in todo]
    images = lookup.images_by_id(lookup.read(ctx.root, [S.ID, S.IMAGE], ids))
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


def llm_steps(ctx: StageContext, rows: list[dict], products: list[dict]) -> list[dict]:
    """The optional rewrite and judge steps over the composed queries, on their engines. The rewrite step
    gets the attributes of the rows' positives and the values of each class, to check what it adds."""
    cfg, stage = ctx.config.merit, ctx.stage_dir("merit")
    rejected, stats = ctx.rejected("merit"), stage.child("stats")
    positives = {pid for r in rows for pid in r[S.POSITIVE_IDS]}
    rewrite = llm.Rewrite(
        stage.child("rewrites"),
        attributes={p[S.ID]: p[S.ATTRIBUTES] for p in products if p[S.ID] in positives},
        values=llm.attribute_values(products),
        min_positives=cfg.min_positives,
    )
    steps = [(rewrite, cfg.rewrite), (llm.Judge(), cfg.judge)]
    steps = [(step, engine) for step, engine in steps if engine is not None]
    batch = min(engine.batch_size for _, engine in steps)
    table = pa.Table.from_pylist([llm.keyed(r) for r in rows], schema=llm.Rewrite.out_schema)
    ds = ray.data.from_arrow(table).repartition(target_num_rows_per_block=batch)
    for step, engine in steps:
        ds = run_step(ds, step, engine, rejected, stats)
    return sorted((llm.unkeyed(r) for r in ds.take_all()), key=lambda r: r[S.QUERY_ID])


def unsafe_ids(ids: list[str]) -> dict[str, str]:
    """Product id -> why it cannot name a file (``coral.paths.safe_name``), for the ids that cannot."""
    out = {}
    for pid in ids:
        try:
            safe_name(pid)
        except PathError as e:
            out[pid] = str(e)
    return out


def export(ctx: StageContext, rows: list[dict], products: list[dict]) -> dict[str, int]:
    """MERIT's layout: queries-{split}.json and candidates-{split}.json (conversation format, what MERIT's
    training and inference scripts read), and every image they name (PNG), under ``merit/export/``; the
    queries also as ``{split}.jsonl``, ``{query, pos, neg}`` JSON lines with their hard negatives.
    Products whose id is no safe file name, and the queries naming them, are left out, each with the
    reason under ``merit/export_rejected/``; returns those reasons counted."""
    root = ctx.stage_dir("merit").child("export")
    table = lookup.read(ctx.root, [S.ID, S.IMAGE])
    catalog_ids = table.column(S.ID).to_pylist()
    unsafe = unsafe_ids(list(dict.fromkeys([*catalog_ids, *(p[S.ID] for p in products)])))
    rejected = [{S.ID: pid, S.REASON: f"id is not a safe file name: {why}"} for pid, why in unsafe.items()]

    def path_of(pid: str) -> str:
        return f"images/{pid}.png"

    kept = []
    for r in rows:
        named = [i for i in dict.fromkeys([*r[S.QUERY_IMAGE_IDS], *r[S.POSITIVE_IDS]]) if i in unsafe]
        if named:
            rejected.append(
                {
                    S.ID: r[S.QUERY_ID],
                    S.REASON: f"names a product whose id is not a safe file name: {named[:3]}",
                }
            )
        else:
            kept.append(r)
    titles = {p[S.ID]: p[S.TITLE] for p in products}
    for split in sorted({r[S.SPLIT] for r in rows}):
        items = [formats.to_merit_query(r, path_of) for r in kept if r[S.SPLIT] == split]
        storage.write_bytes(root.child(f"queries-{split}.json"), formats.dumps(items).encode())
        lines = [
            formats.to_query_pos_neg(
                {**r, S.HARD_NEGATIVE_IDS: [n for n in r.get(S.HARD_NEGATIVE_IDS) or [] if n not in unsafe]},
                path_of,
                titles,
            )
            for r in kept
            if r[S.SPLIT] == split
        ]
        storage.write_bytes(root.child(f"{split}.jsonl"), formats.dumps(lines, lines=True).encode())
    for split in sorted({p[S.SPLIT] for p in products}):
        pool = [p for p in products if p[S.SPLIT] == split and p[S.ID] not in unsafe]
        items = [formats.to_merit_candidate(p[S.ID], p[S.TITLE], path_of(p[S.ID])) for p in pool]
        storage.write_bytes(root.child(f"candidates-{split}.json"), formats.dumps(items).encode())
    for pid, image in zip(catalog_ids, table.column(S.IMAGE).to_pylist(), strict=True):
        if pid not in unsafe:
            storage.write_bytes(root.child("images", f"{safe_name(pid)}.png"), image)
    storage.write_rejected(ctx.stage_dir("merit").child("export_rejected"), rejected)
    return dict(Counter(r[S.REASON].split(": ")[0] for r in rejected))
