"""One training step and one validation pass for every retriever (``retrievers.RETRIEVERS``).

A step takes B triplet rows, already turned into features by ``featurize`` (in the Ray Data pipeline);
each query brings its positive and K hard negatives (MegaPairs' layout: the positive of query i at
candidate i * (K + 1); a row with fewer than K negatives repeats them). A query's positives are never
its negatives: wherever one of them sits among the gathered candidates, that logit is left out. The
contrastive term is InfoNCE over every candidate of every worker (``loss.info_nce``). For ``coral`` the
query and its positive are encoded a second time with masked visual and text tokens, and their
reconstruction and MLM terms are added with their weights. Every term is returned by name.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from coral import metrics
from coral import schemas as S
from coral.catalog.lookup import Products
from coral.config import TrainConfig
from coral.models import retrievers
from coral.models.coral import CoralHeads, encode
from coral.train.loss import gather_ids, info_nce, world


def candidates(rows: Sequence[dict], k: int) -> list[str]:
    """Per row its first positive, then K hard negatives: the row's own, repeated when it has fewer (a
    product that is also one of its positives is never one). A row with none fills its K slots with its
    positive, which the loss then leaves out (``false_negatives``): only the other queries' candidates
    are its negatives."""
    out = []
    for r in rows:
        positives = set(r[S.POSITIVE_IDS])
        negs = [n for n in r[S.HARD_NEGATIVE_IDS] if n not in positives] or [r[S.POSITIVE_IDS][0]]
        out += [r[S.POSITIVE_IDS][0], *(negs * k)[:k]]
    return out


def key(pid: str) -> int:
    """A product id as a stable int64, to compare ids across workers as a tensor."""
    return int.from_bytes(hashlib.blake2b(pid.encode(), digest_size=8).digest(), "little", signed=True)


def false_negatives(examples: Sequence[dict], k: int) -> torch.Tensor:
    """(B, W * B * (K + 1)) True where a candidate of any worker's batch is one of the query's positives
    other than its own target slot: those logits are left out of the InfoNCE denominator."""
    rank, _ = world()
    mine = torch.tensor([key(c) for e in examples for c in e["candidate_ids"]], dtype=torch.long)
    every = gather_ids(mine)
    out = torch.zeros(len(examples), len(every), dtype=torch.bool)
    for i, e in enumerate(examples):
        out[i] = torch.isin(every, torch.tensor([key(p) for p in e["positive_ids"]], dtype=torch.long))
        out[i, (rank * len(examples) + i) * (k + 1)] = False
    return out


def featurize(retriever, rows: Sequence[dict], products: Products, k: int) -> list[dict]:
    """Per triplet row: {"query": features, "candidates": [positive, K hard negatives] features, and the
    ids of those candidates and of every positive}."""
    out = []
    for r in rows:
        ids = candidates([r], k)
        out.append(
            {
                "query": retrievers.query_features(retriever, r, products),
                "candidates": [retrievers.candidate_features(retriever, c, products) for c in ids],
                "candidate_ids": ids,
                "positive_ids": list(r[S.POSITIVE_IDS]),
            }
        )
    return out


def losses(
    model,
    retriever,
    examples: Sequence[dict],
    k: int,
    cfg: TrainConfig,
    heads: CoralHeads | None = None,
    special_ids: set[int] | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """{"loss", "contrastive_loss"[, "vision_recon_loss", "mlm_loss"]} for one step's ``featurize``d rows."""
    cands = [c for e in examples for c in e["candidates"]]
    queries = retriever.collate([e["query"] for e in examples])
    q = retriever.embed(model, queries)
    c = retriever.embed(model, retriever.collate(cands))
    exclude = false_negatives(examples, k).to(q.device)
    out = {"contrastive_loss": info_nce(q, c, cfg.temperature, exclude)}
    total = out["contrastive_loss"]
    if heads is not None:
        vision, mlm = [], []
        for batch in (queries, retriever.collate(cands[:: k + 1])):  # the queries and their positives
            enc = encode(
                model,
                batch,
                heads,
                cfg.vision_mask_ratio,
                cfg.text_mask_ratio,
                special_ids,
                generator,
            )
            vision += [enc.vision_loss] if enc.vision_loss is not None else []
            mlm += [enc.mlm_loss] if enc.mlm_loss is not None else []
        if vision:
            out["vision_recon_loss"] = torch.stack(vision).mean()
            total = total + cfg.vision_recon_weight * out["vision_recon_loss"]
        if mlm:
            out["mlm_loss"] = torch.stack(mlm).mean()
            total = total + cfg.mlm_weight * out["mlm_loss"]
    out["loss"] = total
    return out


def embed_all(model, retriever, features: Sequence[dict], batch_size: int = 32) -> torch.Tensor:
    return torch.cat(
        [
            retriever.embed(model, retriever.collate(list(features[i : i + batch_size])))
            for i in range(0, len(features), batch_size)
        ]
    )


@torch.no_grad()
def validate(
    model, retriever, rows: Sequence[dict], pool: Sequence[str], products: Products, batch_size: int = 32
) -> dict[str, float]:
    """MERIT metrics of ``rows`` against the candidate ``pool`` (ids), with the evaluation's metric code."""
    was_training = model.training
    model.eval()
    q = embed_all(
        model, retriever, [retrievers.query_features(retriever, r, products) for r in rows], batch_size
    )
    c = embed_all(
        model, retriever, [retrievers.candidate_features(retriever, i, products) for i in pool], batch_size
    )
    model.train(was_training)
    ranked = metrics.rank_candidates(q.float().cpu().numpy(), c.float().cpu().numpy(), list(pool), k=10)
    ranks = [metrics.first_rank(r, set(row[S.POSITIVE_IDS])) for r, row in zip(ranked, rows, strict=True)]
    return {**metrics.merit_metrics(ranks), "queries": len(rows), "candidates": len(pool)}
