"""evaluate: held-out queries searched in the index with the checkpoint that built it, scored with MERIT's
metrics; the untrained base model scored the same way as a baseline; a report; an optional gate.

Queries: the rows of the ``train.data`` stages whose split is in ``evaluate.splits`` (``test`` by default,
or out-of-distribution labels such as ``ood_language_th``). Candidates: the index's pool. The trained
model searches the index stage's index (its checkpoint checked against ``index.json``); the baseline
(``train.base``, untrained) embeds the same candidates and queries and searches an index of the same kind.
Written under ``{run_root}/evaluate/``: ``metrics.json`` (per model: R@1, R@5, R@10, MRR@10 with 95%
bootstrap intervals, counts, and the same figures by number of conditions, language and class, and by
the merit stage's out-of-distribution labels when ``merit.ood`` held axes out: each label apart and the
rest as ``in_distribution``),
``data/`` (every query's rank, top-10 ids and their scores per model), ``report.md`` and its PNG plots,
``trec/`` (TREC runs and qrels per split; the train export's model card gets the figures:
``coral.stages.artifacts``). With
``evaluate.gate`` set, a trained metric below its bar fails the stage (outputs kept) and stops the graph.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from coral import checkpoint, metrics, report, storage
from coral import schemas as S
from coral.catalog import lookup
from coral.config import Config, EvaluateConfig, Resources
from coral.errors import ConfigError, UserInputError
from coral.manifest import StageResult
from coral.models import loader
from coral.search import index as search_index
from coral.search import knn
from coral.stages import artifacts, heldout
from coral.stages.base import StageContext, as_matrix

NAMES = metrics.MERIT_NAMES
GROUPS = {"source": S.SOURCE, "conditions": S.NUM_CONDITIONS, "language": S.LANGUAGE, "class": S.CLASS}


class GateFailed(UserInputError):
    pass


def metric_names(cfg: EvaluateConfig) -> list[str]:
    return metrics.metric_names(cfg.metrics, cfg.recall_k, cfg.map_k)


def depth(cfg: EvaluateConfig) -> int:
    """How deep each query is searched: ``top_k``, deeper when Recall@K or mAP@k look further."""
    recall = cfg.recall_k if "recall" in cfg.metrics else ()
    circo = cfg.map_k if "circo" in cfg.metrics else ()
    return max([cfg.top_k, *recall, *circo])


def per_query(ranks: list[int]) -> dict[str, np.ndarray]:
    """MERIT's metrics of each query from its rank (-1 beyond 10); their means are ``merit_metrics``."""
    r = np.asarray(ranks)
    hit = r > 0
    return {
        "R@1": (hit & (r <= 1)).astype(float),
        "R@5": (hit & (r <= 5)).astype(float),
        "R@10": (hit & (r <= 10)).astype(float),
        "MRR@10": np.where(hit, 1.0 / np.maximum(r, 1), 0.0),
    }


def per_query_values(
    cfg: EvaluateConfig,
    ranked: list[list[str]],
    rows: list[dict],
    ranks: list[int],
    p_at_1: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Every configured metric's value for each query (the metric is their mean); ``ranks``: MERIT's."""
    positives = [set(r[S.POSITIVE_IDS]) for r in rows]
    out: dict[str, np.ndarray] = {}
    for family in cfg.metrics:
        if family == "merit":
            out.update(per_query(ranks))
        elif family == "recall":
            out.update({f"Recall@{k}": metrics.recall_per_query(ranked, positives, k) for k in cfg.recall_k})
        elif family == "circo":
            out.update({f"mAP@{k}": metrics.ap_per_query(ranked, positives, k) for k in cfg.map_k})
        else:
            out["P@1"] = p_at_1
    return out


def summarise(values: dict[str, np.ndarray], idx: list[int] | None = None) -> dict:
    """Each metric's mean over the queries ``idx`` (all when None), and their count."""
    n = len(next(iter(values.values())))
    idx = list(range(n)) if idx is None else idx
    return {k: float(np.mean(v[idx])) for k, v in values.items()} | {"queries": len(idx)}


def score(
    ranks: list[int],
    rows: list[dict],
    resamples: int,
    ood: dict[str, dict] | None = None,
    values: dict[str, np.ndarray] | None = None,
) -> dict:
    """The metrics (``values``, per query; MERIT's from ``ranks`` when None) with bootstrap intervals,
    overall and by group; ``ood``: per axis, query id -> its out-of-distribution label: each label's
    queries scored apart, and the queries with no such label as ``in_distribution``."""
    values = per_query(ranks) if values is None else values
    out = summarise(values)
    out["intervals"] = {
        k: [round(x, 4) for x in metrics.bootstrap_ci(v, resamples)] for k, v in values.items()
    }
    out["by"] = {}
    for group, column in GROUPS.items():
        members: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(rows):
            members[str(r[column])].append(i)
        out["by"][group] = {g: summarise(values, idx) for g, idx in sorted(members.items())}
    labelled: set[int] = set()
    for kind, labels in (ood or {}).items():
        members = defaultdict(list)
        for i, r in enumerate(rows):
            if labels.get(r[S.QUERY_ID], "").startswith("ood_"):
                members[labels[r[S.QUERY_ID]]].append(i)
                labelled.add(i)
        out.setdefault("ood", {})[kind] = {g: summarise(values, idx) for g, idx in sorted(members.items())}
    if ood:
        inside = [i for i in range(len(rows)) if i not in labelled]
        out["in_distribution"] = summarise(values, inside) if inside else {"queries": 0}
    return out


def precision_at_1(
    q_emb: np.ndarray, rows: list[dict], cand_ids: list[str], cand_emb: np.ndarray
) -> np.ndarray:
    """MMEB's P@1 of each query over its own candidate list (its first positive, then its hard
    negatives; those outside the pool are left out): 1.0 when the positive scores highest, so a query
    left with no negative in the pool scores 1. A query whose positive is outside the pool scores 0."""
    where = {c: i for i, c in enumerate(cand_ids)}
    out = np.zeros(len(rows))
    for n, (q, r) in enumerate(zip(q_emb, rows, strict=True)):
        pos = r[S.POSITIVE_IDS][0] if r[S.POSITIVE_IDS] else None
        if pos not in where:
            continue
        negs = [where[h] for h in r[S.HARD_NEGATIVE_IDS] if h in where and h not in r[S.POSITIVE_IDS]]
        scores = cand_emb[[where[pos], *negs]] @ q
        out[n] = float(scores[0] > scores[1:].max()) if negs else 1.0
    return out


def gate_failures(gate: dict[str, float], trained: dict) -> list[str]:
    return [
        f"{name} = {trained[name]:.4f} is below the bar {bar} (evaluate.gate)"
        for name, bar in gate.items()
        if trained[name] < bar
    ]


class EvaluateStage:
    name = "evaluate"

    def inputs(self, config: Config) -> tuple[str, ...]:
        return ("index", *config.train.data, "catalog")

    def section(self, config: Config) -> EvaluateConfig:
        return config.evaluate

    def output(self, config: Config) -> pa.Schema:
        return pa.schema(
            [
                (S.QUERY_ID, pa.string()),
                ("model", pa.string()),
                ("rank", pa.int32()),
                ("top_ids", pa.list_(pa.string())),
            ]
        )

    def resources(self, config: Config) -> dict[str, Resources]:
        return {"embed": config.index}  # queries (and a baseline's pool) embedded as the index stage does

    def validate(self, config: Config) -> None:
        axes = set(config.merit.ood)
        for split in config.evaluate.splits:
            if split.startswith("ood_"):
                axis = split.split("_")[1]
                if axis not in axes or "merit" not in config.train.data:
                    raise ConfigError(
                        f"evaluate.splits: {split} needs the merit stage in train.data and '{axis}' in "
                        f"merit.ood (now {list(config.merit.ood)}): only a held-out axis has OOD queries"
                    )
        if config.evaluate.baseline:
            loader.resolve(config.train.base)

    def queries(self, ctx: StageContext, labels: dict[str, dict[str, str]]) -> list[dict]:
        """The held-out rows of ``train.data`` whose split, or OOD label, is in ``evaluate.splits``."""
        cfg = ctx.config.evaluate
        tables = [storage.read_table(ctx.data(s)) for s in ctx.config.train.data]
        rows = pa.concat_tables(tables).sort_by(S.QUERY_ID)
        wanted = set(cfg.splits)
        keep = [
            bool(heldout.query_splits(q, s, labels) & wanted)
            for q, s in zip(rows[S.QUERY_ID].to_pylist(), rows[S.SPLIT].to_pylist(), strict=True)
        ]
        held = rows.filter(pa.array(keep, pa.bool_()))
        if cfg.max_queries:
            held = held.slice(0, cfg.max_queries)
        if held.num_rows == 0:
            raise UserInputError(
                f"evaluate.splits={list(cfg.splits)}: no such queries in {ctx.config.train.data}"
            )
        return held.to_pylist()

    def run(self, ctx: StageContext) -> StageResult:
        import ray

        cfg, icfg = ctx.config.evaluate, ctx.config.index
        uri, kind = search_index.model_of(ctx.config, ctx.root)
        ckpt = checkpoint.describe(uri, kind, ctx.config.storage)
        index_dir = ctx.stage_dir("index")
        index, meta, candidates = search_index.load(index_dir, icfg)
        checkpoint.check_bound(meta, ckpt, index_dir.uri)
        ood = heldout.ood_labels(ctx)
        rows = self.queries(ctx, ood)
        pool = candidates[S.ID].to_pylist()
        images = lookup.columns(lookup.read(ctx.root, ids={i for r in rows for i in r[S.QUERY_IMAGE_IDS]}))
        qds = ray.data.from_arrow(pa.Table.from_pylist(rows))

        def embed_queries(model: str) -> np.ndarray:
            keys, emb = search_index.embed(
                qds, len(rows), kind, model, "query", icfg, ctx.config.storage, images
            )
            if keys != [r[S.QUERY_ID] for r in rows]:  # both in query id order
                raise RuntimeError("evaluate: query ids are not unique")
            return emb

        ranked, sims, p1 = {}, {}, {}
        q_emb = embed_queries(uri)
        ranked["trained"], sims["trained"] = hits(pool, *knn.search(index, q_emb, depth(cfg)))
        if "mmeb" in cfg.metrics:
            p1["trained"] = precision_at_1(q_emb, rows, pool, as_matrix(candidates["embedding"]))
        if cfg.baseline:
            base = search_index.resolve_model(ctx.config.train.base)
            src = lookup.location(ctx.root)  # streamed: the pool's images need not fit in the driver
            cand = ray.data.read_parquet(src.path, filesystem=src.fs, columns=list(lookup.PRODUCT))
            cand = cand.map_batches(_in_pool, fn_kwargs={"pool": pool}, batch_format="pyarrow")
            ids, emb = search_index.embed(cand, len(pool), kind, base, "candidate", icfg, ctx.config.storage)
            q_base = embed_queries(base)
            found = knn.search(search_index.build(emb, icfg), q_base, depth(cfg))
            ranked["baseline"], sims["baseline"] = hits(ids, *found)
            if "mmeb" in cfg.metrics:
                p1["baseline"] = precision_at_1(q_base, rows, ids, emb)
        ranks = {
            m: [metrics.first_rank(r, set(q[S.POSITIVE_IDS])) for r, q in zip(rr, rows, strict=True)]
            for m, rr in ranked.items()
        }
        values = {m: per_query_values(cfg, ranked[m], rows, ranks[m], p1.get(m)) for m in ranked}
        scores = {m: score(ranks[m], rows, cfg.bootstrap, ood, values[m]) for m in ranked}
        out = ctx.stage_dir(self.name)
        result = {
            "models": scores,
            "checkpoint": meta["checkpoint"],
            "baseline_model": ctx.config.train.base if cfg.baseline else None,
            "index": {"spec": meta["spec"], "count": meta["count"]},
            "splits": list(cfg.splits),
            "metrics": metric_names(cfg),
        }
        storage.write_json(out.child("metrics.json"), result)
        artifacts.after_evaluate(ctx, rows, ranked, sims, ood, result)  # trec/, the train export's card
        table = pa.table(
            {
                S.QUERY_ID: [q[S.QUERY_ID] for q in rows for _ in ranks],
                "model": [m for _ in rows for m in ranks],
                "rank": pa.array([ranks[m][i] for i in range(len(rows)) for m in ranks], pa.int32()),
                "top_ids": [ranked[m][i][:10] for i in range(len(rows)) for m in ranks],
                "top_scores": pa.array(
                    [sims[m][i][:10] for i in range(len(rows)) for m in ranks], pa.list_(pa.float32())
                ),
            }
        )
        storage.write_parquet(ctx.data(self.name).child("part-00000.parquet"), table)
        names = metric_names(cfg)
        write_report(out, scores, ranks, meta, names)
        details = {
            m: {k: round(s[k], 4) for k in names} | {"queries": s["queries"]} for m, s in scores.items()
        }
        failures = gate_failures(cfg.gate, scores["trained"])
        if failures:
            raise GateFailed(
                "evaluation gate: " + "; ".join(failures) + f" (metrics at {out.uri}/metrics.json)"
            )
        return StageResult(len(rows), len(rows), {}, details={**details, "gate": dict(cfg.gate) or None})


def hits(pool: list[str], sim: np.ndarray, top: np.ndarray) -> tuple[list[list[str]], list[list[float]]]:
    """Each query's retrieved ids and scores, best first (FAISS pads a short list with row -1)."""
    keep = [row >= 0 for row in top]
    ids = [[pool[j] for j in row[k]] for row, k in zip(top, keep, strict=True)]
    return ids, [s[k].tolist() for s, k in zip(sim, keep, strict=True)]


def _in_pool(batch: pa.Table, pool: list[str]) -> pa.Table:
    return batch.filter(pc.is_in(batch[S.ID], pa.array(pool)))


def write_report(out: storage.Location, scores: dict, ranks: dict, meta: dict, names: list[str]) -> None:
    models, head = list(scores), names[0]
    lines = [
        "# Evaluation",
        "",
        f"Checkpoint `{meta['checkpoint']['uri']}` (hash {meta['checkpoint']['hash']}); index "
        f"`{meta['spec']}` over {meta['count']} candidates; {scores['trained']['queries']} queries.",
        "",
        report.markdown_table(
            ["model", *names, f"{head} 95% interval"],
            [[m, *(scores[m][k] for k in names), str(scores[m]["intervals"][head])] for m in models],
        ),
        "",
        "![ranks](ranks.png)",
        "",
        "![Recall@k](recall_at_k.png)",
        "",
    ]
    storage.write_bytes(out.child("ranks.png"), report.png(report.ranks_figure(ranks)))
    storage.write_bytes(out.child("recall_at_k.png"), report.png(report.recall_figure(ranks)))
    for group in GROUPS:
        cats = sorted(scores["trained"]["by"][group])
        series = {m: [scores[m]["by"][group][c][head] for c in cats] for m in models}
        counts = [scores["trained"]["by"][group][c]["queries"] for c in cats]
        fig = report.bars_figure(cats, series, f"{head} by {group}", 1.0, group, head, counts)
        storage.write_bytes(out.child(f"r1_by_{group}.png"), report.png(fig))
        lines += [
            f"## {head} by {group}",
            "",
            report.markdown_table(
                [group, "queries", *models],
                [
                    [c, scores["trained"]["by"][group][c]["queries"], *(series[m][i] for m in models)]
                    for i, c in enumerate(cats)
                ],
            ),
            "",
            f"![{head} by {group}](r1_by_{group}.png)",
            "",
        ]
    if "in_distribution" in scores["trained"]:
        inside = scores["trained"]["in_distribution"]
        lines += [
            "## In distribution and out of distribution",
            "",
            "Training held out the values of `merit.ood`; the queries about them are scored apart.",
            "",
            report.markdown_table(
                ["queries of", "queries", *(f"{m} {head}" for m in models)],
                [
                    [
                        "in distribution",
                        inside["queries"],
                        *(scores[m]["in_distribution"].get(head, "") for m in models),
                    ]
                ]
                + [
                    [g, groups[g]["queries"], *(scores[m]["ood"][kind][g][head] for m in models)]
                    for kind, groups in scores["trained"].get("ood", {}).items()
                    for g in sorted(groups)
                ],
            ),
            "",
        ]
    storage.write_bytes(out.child("report.md"), "\n".join(lines).encode())


def summary_table(config: Config) -> str | None:
    """The evaluation's metrics as a text table (None when the run has none)."""
    loc = storage.resolve(config.run.run_root, config.storage).child("evaluate", "metrics.json")
    if not storage.exists(loc):
        return None
    result = storage.read_json(loc)
    models, names = result["models"], result.get("metrics", list(NAMES))
    head = names[0]
    rows = []
    for m, s in sorted(models.items(), key=lambda kv: kv[0] != "trained"):
        lo, hi = s["intervals"][head]
        rows.append([m, *(float(s[k]) for k in names), s["queries"], f"[{lo:.3f}, {hi:.3f}]"])
    return report.text_table(["model", *names, "queries", f"{head} 95% interval"], rows)
