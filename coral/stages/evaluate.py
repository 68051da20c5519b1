"""evaluate: held-out queries searched in the index with the checkpoint that built it, scored with MERIT's
metrics; the untrained base model scored the same way as a baseline; a report; an optional gate.

Queries: the rows of the ``train.data`` stages whose split is in ``evaluate.splits`` (``test`` by default,
or out-of-distribution labels such as ``ood_language_th``). Candidates: the index's pool. The trained
model searches the index stage's index (its checkpoint checked against ``index.json``); the baseline
(``train.base``, untrained) embeds the same candidates and queries and searches an index of the same kind.
Written under ``{run_root}/evaluate/``: ``metrics.json`` (per model: R@1, R@5, R@10, MRR@10 with 95%
bootstrap intervals, counts, and the same figures by number of conditions, language and class, and by
the merit stage's out-of-distribution labels when it wrote them),
``data/`` (every query's rank, top-10 ids and their scores per model), ``report.md`` and its PNG plots. With
``evaluate.gate`` set, a trained metric below its bar fails the stage (outputs kept) and stops the graph.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from coral import checkpoint, metrics, report, storage
from coral import schemas as S
from coral.config import Config, EvaluateConfig
from coral.errors import UserInputError
from coral.manifest import StageResult
from coral.mining import knn
from coral.stages import index as index_stage
from coral.stages.base import StageContext

NAMES = ("R@1", "R@5", "R@10", "MRR@10")
GROUPS = {"conditions": S.NUM_CONDITIONS, "language": S.LANGUAGE, "class": S.CLASS}


class GateFailed(UserInputError):
    pass


def per_query(ranks: list[int]) -> dict[str, np.ndarray]:
    r = np.asarray(ranks)
    hit = r > 0
    return {
        "R@1": (hit & (r <= 1)).astype(float),
        "R@5": (hit & (r <= 5)).astype(float),
        "R@10": (hit & (r <= 10)).astype(float),
        "MRR@10": np.where(hit, 1.0 / np.maximum(r, 1), 0.0),
    }


def score(ranks: list[int], rows: list[dict], resamples: int, ood: dict[str, dict] | None = None) -> dict:
    """MERIT metrics with bootstrap intervals, overall and by group; ``ood``: per kind, query id -> its
    out-of-distribution label (the merit stage's ``ood/`` tables), scored per label."""
    out = {**metrics.merit_metrics(ranks), "queries": len(ranks)}
    values = per_query(ranks)
    out["intervals"] = {k: [round(x, 4) for x in metrics.bootstrap_ci(values[k], resamples)] for k in NAMES}
    out["by"] = {}
    for group, column in GROUPS.items():
        members: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(rows):
            members[str(r[column])].append(i)
        out["by"][group] = {
            g: {**metrics.merit_metrics([ranks[i] for i in idx]), "queries": len(idx)}
            for g, idx in sorted(members.items())
        }
    for kind, labels in (ood or {}).items():
        members = defaultdict(list)
        for i, r in enumerate(rows):
            if labels.get(r[S.QUERY_ID], "").startswith("ood_"):
                members[labels[r[S.QUERY_ID]]].append(i)
        out.setdefault("ood", {})[kind] = {
            g: {**metrics.merit_metrics([ranks[i] for i in idx]), "queries": len(idx)}
            for g, idx in sorted(members.items())
        }
    return out


def ood_labels(ctx: StageContext) -> dict[str, dict]:
    """The merit stage's out-of-distribution labels, when it ran and wrote them."""
    if "merit" not in ctx.config.train.data:
        return {}
    out = {}
    for kind in ("language", "attribute", "class"):
        loc = ctx.stage_dir("merit").child("ood", kind)
        if storage.list_files(loc, ".parquet"):
            t = pq.read_table(loc.path, filesystem=loc.fs)
            out[kind] = dict(zip(t[S.QUERY_ID].to_pylist(), t[S.SPLIT].to_pylist(), strict=True))
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

    def validate(self, config: Config) -> None:
        if config.evaluate.baseline:
            from coral.models import loader

            loader.resolve(config.train.base)

    def queries(self, ctx: StageContext) -> list[dict]:
        cfg = ctx.config.evaluate
        tables = [pq.read_table(ctx.data(s).path, filesystem=ctx.data(s).fs) for s in ctx.config.train.data]
        rows = pa.concat_tables(tables)
        held = rows.filter(pc.is_in(rows[S.SPLIT], pa.array(list(cfg.splits)))).sort_by(S.QUERY_ID)
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
        uri, kind = index_stage.model_of(ctx.config, ctx.root)
        ckpt = checkpoint.describe(uri, kind, ctx.config.storage)
        index_dir = ctx.stage_dir("index")
        index, meta, candidates = index_stage.load(index_dir, icfg)
        checkpoint.check_bound(meta, ckpt, index_dir.uri)
        rows = self.queries(ctx)
        pool = candidates[S.ID].to_pylist()
        src = ctx.data("catalog")
        catalog = pq.read_table(src.path, filesystem=src.fs, columns=[S.ID, S.TITLE, S.IMAGE])
        needed = {i for r in rows for i in r[S.QUERY_IMAGE_IDS]}
        catalog = catalog.filter(pc.is_in(catalog[S.ID], pa.array(sorted(needed))))
        images = {k: catalog[k].to_pylist() for k in (S.ID, S.TITLE, S.IMAGE)}
        qds = ray.data.from_arrow(pa.Table.from_pylist(rows))

        def embed_queries(model: str) -> np.ndarray:
            keys, emb = index_stage.embed(
                qds, len(rows), kind, model, "query", icfg, ctx.config.storage, images
            )
            if keys != [r[S.QUERY_ID] for r in rows]:  # both in query id order
                raise RuntimeError("evaluate: query ids are not unique")
            return emb

        ranked, sims = {}, {}
        ranked["trained"], sims["trained"] = hits(pool, *knn.search(index, embed_queries(uri), cfg.top_k))
        if cfg.baseline:
            base = index_stage.resolve_model(ctx.config.train.base)
            cand = ray.data.read_parquet(src.path, filesystem=src.fs, columns=[S.ID, S.TITLE, S.IMAGE])
            cand = cand.map_batches(_in_pool, fn_kwargs={"pool": pool}, batch_format="pyarrow")
            ids, emb = index_stage.embed(cand, len(pool), kind, base, "candidate", icfg, ctx.config.storage)
            found = knn.search(index_stage.build(emb, icfg), embed_queries(base), cfg.top_k)
            ranked["baseline"], sims["baseline"] = hits(ids, *found)
        ranks = {
            m: [metrics.first_rank(r, set(q[S.POSITIVE_IDS])) for r, q in zip(rr, rows, strict=True)]
            for m, rr in ranked.items()
        }
        ood = ood_labels(ctx)
        scores = {m: score(r, rows, cfg.bootstrap, ood) for m, r in ranks.items()}
        out = ctx.stage_dir(self.name)
        result = {
            "models": scores,
            "checkpoint": meta["checkpoint"],
            "baseline_model": ctx.config.train.base if cfg.baseline else None,
            "index": {"spec": meta["spec"], "count": meta["count"]},
            "splits": list(cfg.splits),
        }
        storage.write_json(out.child("metrics.json"), result)
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
        write_report(out, scores, ranks, meta)
        details = {
            m: {k: round(s[k], 4) for k in NAMES} | {"queries": s["queries"]} for m, s in scores.items()
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


def write_report(out: storage.Location, scores: dict, ranks: dict, meta: dict) -> None:
    models = list(scores)
    lines = [
        "# Evaluation",
        "",
        f"Checkpoint `{meta['checkpoint']['uri']}` (hash {meta['checkpoint']['hash']}); index "
        f"`{meta['spec']}` over {meta['count']} candidates; {scores['trained']['queries']} queries.",
        "",
        report.markdown_table(
            ["model", *NAMES, "R@1 95% interval"],
            [[m, *(scores[m][k] for k in NAMES), str(scores[m]["intervals"]["R@1"])] for m in models],
        ),
        "",
        "![ranks](ranks.png)",
        "",
    ]
    bins = [str(i) for i in range(1, 11)] + ["miss"]
    hist = {
        m: [sum(1 for r in ranks[m] if (r == i if i else r < 0)) for i in [*range(1, 11), 0]] for m in models
    }
    storage.write_bytes(
        out.child("ranks.png"),
        report.bars_png(bins, {m: [float(v) for v in hist[m]] for m in models}, "rank of the best positive"),
    )
    for group in GROUPS:
        cats = sorted(scores["trained"]["by"][group])
        series = {m: [scores[m]["by"][group][c]["R@1"] for c in cats] for m in models}
        storage.write_bytes(
            out.child(f"r1_by_{group}.png"), report.bars_png(cats, series, f"R@1 by {group}", 1.0)
        )
        lines += [
            f"## R@1 by {group}",
            "",
            report.markdown_table(
                [group, "queries", *models],
                [
                    [c, scores["trained"]["by"][group][c]["queries"], *(series[m][i] for m in models)]
                    for i, c in enumerate(cats)
                ],
            ),
            "",
            f"![R@1 by {group}](r1_by_{group}.png)",
            "",
        ]
    for kind, groups in scores["trained"].get("ood", {}).items():
        labels = sorted(groups)
        lines += [
            f"## Out of distribution: {kind}",
            "",
            report.markdown_table(
                ["label", "queries", *(f"{m} R@1" for m in models)],
                [
                    [g, groups[g]["queries"], *(scores[m]["ood"][kind][g]["R@1"] for m in models)]
                    for g in labels
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
    models = storage.read_json(loc)["models"]
    lines = [f"{'model':<10}" + "".join(f"{k:>9}" for k in NAMES) + f"{'queries':>9}  R@1 95% interval"]
    for m, s in sorted(models.items(), key=lambda kv: kv[0] != "trained"):
        lo, hi = s["intervals"]["R@1"]
        lines.append(
            f"{m:<10}" + "".join(f"{s[k]:>9.3f}" for k in NAMES) + f"{s['queries']:>9}  [{lo:.3f}, {hi:.3f}]"
        )
    return "\n".join(lines)
