"""What training must never see, in one place: the out-of-distribution values ``merit.ood`` holds out,
the rows that touch them, and the labels the merit stage wrote for the held-out queries.

MERIT step 7: a model trained without some languages, attributes or classes is tested on them. With
``merit.ood`` naming axes (``language``, ``attribute``, ``class``; values from ``merit.ood_languages``,
``ood_attributes``, ``ood_classes``), the train stage drops every training row, of any source, that
touches a held-out value: a query product, positive or hard negative in a held-out language or class,
or a condition on a held-out attribute. Evaluate scores the held-out queries labelled
``ood_{axis}_{value}`` apart from the in-distribution ones.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from coral import schemas as S
from coral import storage
from coral.catalog import lookup
from coral.config import Config
from coral.stages.base import StageContext

AXES = {"language": "ood_languages", "attribute": "ood_attributes", "class": "ood_classes"}


def ood_axes(config: Config) -> dict[str, tuple[str, ...]]:
    """Held-out values per configured axis (empty when ``merit.ood`` is)."""
    return {axis: tuple(getattr(config.merit, AXES[axis])) for axis in config.merit.ood}


def touches(row: Mapping, axis: str, held: tuple[str, ...], products: Mapping[str, tuple[str, str]]) -> bool:
    """Whether a row touches a held-out value of ``axis``; ``products``: id -> (language, class)."""
    if axis == "attribute":
        return bool(set(row[S.CONDITION_KEYS]) & set(held))
    named = [*row[S.QUERY_IMAGE_IDS], *row[S.POSITIVE_IDS], *row[S.HARD_NEGATIVE_IDS]]
    at = 0 if axis == "language" else 1
    values = {products[i][at] for i in named if i in products}
    if axis == "class" and row[S.CLASS]:
        values.add(row[S.CLASS])
    return bool(values & set(held))


def training_rows(
    rows: list[dict], axes: Mapping[str, tuple[str, ...]], products: Mapping[str, tuple[str, str]]
) -> tuple[list[dict], dict[str, int]]:
    """(the rows that touch no held-out value, rows dropped per axis: a row counts under each it touches)."""
    kept, dropped = [], Counter()
    for row in rows:
        hit = [axis for axis, held in axes.items() if touches(row, axis, held, products)]
        dropped.update(hit)
        if not hit:
            kept.append(row)
    return kept, dict(dropped)


def product_info(ctx: StageContext) -> dict[str, tuple[str, str]]:
    """Catalog product id -> (language, class)."""
    t = lookup.read(ctx.root, [S.ID, S.LANGUAGE, S.CLASS])
    return {
        i: (lang, cls)
        for i, lang, cls in zip(
            t[S.ID].to_pylist(), t[S.LANGUAGE].to_pylist(), t[S.CLASS].to_pylist(), strict=True
        )
    }


def ood_labels(ctx: StageContext) -> dict[str, dict[str, str]]:
    """Per axis, query id -> ``train`` or ``ood_{axis}_{value}``: the merit stage's labels, when it ran
    with ``merit.ood`` and trains the model (``train.data``)."""
    if "merit" not in ctx.config.train.data:
        return {}
    out = {}
    for axis in AXES:
        loc = ctx.stage_dir("merit").child("ood", axis)
        if storage.list_files(loc, ".parquet"):
            t = storage.read_table(loc)
            out[axis] = dict(zip(t[S.QUERY_ID].to_pylist(), t[S.SPLIT].to_pylist(), strict=True))
    return out


def query_splits(query_id: str, split: str, labels: Mapping[str, Mapping[str, str]]) -> set[str]:
    """The splits a query belongs to: its own and its OOD labels (``ood_language_th``, ...)."""
    return {split} | {lab[query_id] for lab in labels.values() if lab.get(query_id, "").startswith("ood_")}
