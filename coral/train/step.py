"""One training step and one validation pass for the MLLM retrievers (``mmret_mllm``, ``coral``).

A step takes B triplet rows; each query brings its positive and K hard negatives (MegaPairs' layout:
the positive of query i at candidate i * (K + 1); a row with fewer than K negatives repeats them). The
contrastive term is InfoNCE over every candidate of every worker (``loss.info_nce``). For ``coral`` the
query and its positive are encoded a second time with masked visual and text tokens, and their
reconstruction and MLM terms are added with their weights. Every term is returned by name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from coral import metrics
from coral import schemas as S
from coral.config import TrainConfig
from coral.train import collate
from coral.train.coral import CoralHeads, encode
from coral.train.loss import info_nce


@dataclass
class Products:
    """What a candidate needs: its title (may be empty) and its image, by id."""

    titles: dict[str, str]
    images: Callable[[str], object]  # id -> PIL image


def candidates(rows: Sequence[dict], k: int) -> list[str]:
    out = []
    for r in rows:
        negs = list(r[S.HARD_NEGATIVE_IDS]) or list(r[S.POSITIVE_IDS])
        out += [r[S.POSITIVE_IDS][0], *(negs * k)[:k]]
    return out


def query_batch(processor, rows: Sequence[dict], products: Products) -> dict:
    msgs = [collate.query_message(r[S.QUERY_TEXT]) for r in rows]
    return collate.collate(
        processor, msgs, [[products.images(i) for i in r[S.QUERY_IMAGE_IDS]] for r in rows]
    )


def candidate_batch(processor, ids: Sequence[str], products: Products) -> dict:
    msgs = [collate.candidate_message(products.titles.get(i)) for i in ids]
    return collate.collate(processor, msgs, [[products.images(i)] for i in ids])


def losses(
    model,
    processor,
    rows: Sequence[dict],
    products: Products,
    k: int,
    cfg: TrainConfig,
    heads: CoralHeads | None = None,
    special_ids: set[int] | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """{"loss", "contrastive_loss"[, "vision_recon_loss", "mlm_loss"]} for one step's rows."""
    cands = candidates(rows, k)
    q = encode(model, query_batch(processor, rows, products)).embedding
    c = encode(model, candidate_batch(processor, cands, products)).embedding
    out = {"contrastive_loss": info_nce(q, c, cfg.temperature)}
    total = out["contrastive_loss"]
    if heads is not None:
        positives = cands[:: k + 1]
        vision, mlm = [], []
        for batch in (
            query_batch(processor, rows, products),
            candidate_batch(processor, positives, products),
        ):
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


@torch.no_grad()
def validate(
    model, processor, rows: Sequence[dict], pool: Sequence[str], products: Products, batch_size: int = 32
) -> dict[str, float]:
    """MERIT metrics of ``rows`` against the candidate ``pool`` (ids), with the evaluation's metric code."""
    was_training = model.training
    model.eval()
    q = torch.cat(
        [
            encode(model, query_batch(processor, rows[i : i + batch_size], products)).embedding
            for i in range(0, len(rows), batch_size)
        ]
    )
    c = torch.cat(
        [
            encode(model, candidate_batch(processor, pool[i : i + batch_size], products)).embedding
            for i in range(0, len(pool), batch_size)
        ]
    )
    model.train(was_training)
    ranked = metrics.rank_candidates(q.float().numpy(), c.float().numpy(), list(pool), k=10)
    ranks = [metrics.first_rank(r, set(row[S.POSITIVE_IDS])) for r, row in zip(ranked, rows, strict=True)]
    return {**metrics.merit_metrics(ranks), "queries": len(rows), "candidates": len(pool)}
