"""Generate catalog rows deterministically: group ``g`` depends only on (seed, g), never on sharding.

A product group is one product in several variants that differ in exactly one attribute; the split is
by group, so a test product's siblings are never in train.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from coral import schemas as S
from coral.catalog import draw, vocab
from coral.config import CatalogConfig


def test_groups(cfg: CatalogConfig) -> set[int]:
    n_test = round(cfg.num_groups * cfg.test_fraction)
    if cfg.test_fraction > 0 and cfg.num_groups > 1:
        n_test = min(max(n_test, 1), cfg.num_groups - 1)
    order = np.random.default_rng([cfg.seed, 7919]).permutation(cfg.num_groups)
    return {int(g) for g in order[:n_test]}


def _pick(rng: np.random.Generator, values) -> str:
    return str(values[rng.integers(len(values))])


def group_rows(cfg: CatalogConfig, group: int, split: str) -> list[dict]:
    rng = np.random.default_rng([cfg.seed, group])
    cls = _pick(rng, tuple(vocab.CLASSES))
    language = _pick(rng, cfg.languages)
    base = {k: _pick(rng, vocab.ATTRIBUTE_VALUES[k]) for k in S.ATTRIBUTE_KEYS}
    varying = [k for k in S.ATTRIBUTE_KEYS if len(vocab.ATTRIBUTE_VALUES[k]) >= cfg.variants_per_group]
    if not varying:
        raise ValueError(f"variants_per_group={cfg.variants_per_group} exceeds every attribute's value count")
    key = _pick(rng, varying)
    values = [base[key]] + [
        str(v) for v in rng.permutation([v for v in vocab.ATTRIBUTE_VALUES[key] if v != base[key]])
    ]
    rows = []
    for variant in range(cfg.variants_per_group):
        attrs = dict(base, **{key: values[variant]})
        offset = tuple(float(x) for x in rng.uniform(-0.04, 0.04, size=2))
        image = draw.render(cls, attrs, cfg.image_size, offset)
        rows.append(
            {
                S.ID: f"p{group:06d}-{variant}",
                S.GROUP_ID: f"g{group:06d}",
                S.CLASS: cls,
                S.ATTRIBUTES: attrs,
                S.VARIANT_ATTRIBUTE: key,
                S.TITLE: vocab.title(language, cls, attrs),
                S.LANGUAGE: language,
                S.CAPTION: vocab.caption(cls, attrs),
                S.IMAGE: draw.png_bytes(image),
                S.SPLIT: split,
            }
        )
    return rows


def shard_groups(cfg: CatalogConfig) -> list[range]:
    """Contiguous group ranges, one per task (never empty)."""
    n = min(cfg.num_tasks, cfg.num_groups)
    bounds = np.linspace(0, cfg.num_groups, n + 1).round().astype(int)
    return [range(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def generate_table(cfg: CatalogConfig, groups: range) -> pa.Table:
    test = test_groups(cfg)
    rows = [r for g in groups for r in group_rows(cfg, g, "test" if g in test else "train")]
    return pa.Table.from_pylist(rows, schema=S.CATALOG)
