import io
import itertools

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from coral import schemas as S
from coral.catalog import draw, vocab
from coral.catalog.generate import generate_table, shard_groups
from coral.config import CatalogConfig

BASE = {
    "colour": "red",
    "pattern": "solid",
    "size": "medium",
    "background": "white",
    "material": "wood",
    "brand": "Kova",
}


@pytest.fixture(scope="module")
def table() -> pa.Table:
    return generate_table(CatalogConfig(seed=3, num_groups=30, variants_per_group=3), range(30))


def test_same_seed_same_bytes_and_other_seed_differs():
    cfg = CatalogConfig(seed=5, num_groups=6)
    a, b = generate_table(cfg, range(6)), generate_table(cfg, range(6))
    assert a.equals(b)
    assert a.column(S.IMAGE).to_pylist() == b.column(S.IMAGE).to_pylist()
    c = generate_table(CatalogConfig(seed=6, num_groups=6), range(6))
    assert c.column(S.IMAGE).to_pylist() != a.column(S.IMAGE).to_pylist()


def test_rows_do_not_depend_on_sharding():
    one = CatalogConfig(seed=1, num_groups=9, num_tasks=1)
    three = CatalogConfig(seed=1, num_groups=9, num_tasks=3)
    whole = generate_table(one, range(9))
    parts = pa.concat_tables([generate_table(three, r) for r in shard_groups(three)])
    assert whole.equals(parts)
    assert [len(r) for r in shard_groups(CatalogConfig(num_groups=2, num_tasks=4))] == [1, 1]


def test_schema_ids_and_sizes(table):
    assert table.schema.equals(S.CATALOG)
    assert table.num_rows == 90 and len(set(table.column(S.ID).to_pylist())) == 90
    img = Image.open(io.BytesIO(table.column(S.IMAGE)[0].as_py()))
    assert img.format == "PNG" and img.size == (64, 64)


def test_variants_differ_in_exactly_the_variant_attribute(table):
    rows = table.drop([S.IMAGE]).to_pylist()
    for _, group in itertools.groupby(rows, key=lambda r: r[S.GROUP_ID]):
        group = list(group)
        key = group[0][S.VARIANT_ATTRIBUTE]
        assert len({r[S.CLASS] for r in group}) == 1
        assert len({r[S.ATTRIBUTES][key] for r in group}) == len(group)
        for other in S.ATTRIBUTE_KEYS:
            if other != key:
                assert len({r[S.ATTRIBUTES][other] for r in group}) == 1


def test_split_is_by_group_and_both_present(table):
    split_of = {}
    for g, s in zip(table.column(S.GROUP_ID).to_pylist(), table.column(S.SPLIT).to_pylist(), strict=True):
        assert split_of.setdefault(g, s) == s
    assert set(split_of.values()) == {"train", "test"}
    n_test = sum(v == "test" for v in split_of.values())
    assert 0.15 <= n_test / 30 <= 0.35


def test_titles_carry_non_visual_attributes_captions_only_visual(table):
    for r in table.drop([S.IMAGE]).to_pylist():
        a, lang = r[S.ATTRIBUTES], r[S.LANGUAGE]
        i = vocab.LANGUAGES.index(lang)
        assert a["brand"] in r[S.TITLE]
        assert vocab.MATERIALS[a["material"]][i] in r[S.TITLE]
        assert vocab.CLASSES[r[S.CLASS]][i] in r[S.TITLE]
        assert a["colour"] in r[S.CAPTION] and a["background"] in r[S.CAPTION]
        assert a["brand"] not in r[S.CAPTION] and a["material"] not in r[S.CAPTION]


def test_languages_are_used():
    t = generate_table(CatalogConfig(num_groups=60), range(60))
    assert set(t.column(S.LANGUAGE).to_pylist()) == set(vocab.LANGUAGES)


def test_at_least_twelve_distinct_silhouettes():
    assert len(vocab.CLASSES) >= 12
    masks = {c: np.asarray(draw.silhouette_mask(c, 64, 0.9, (0, 0))) > 0 for c in vocab.CLASSES}
    for a, b in itertools.combinations(masks, 2):
        iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
        assert iou < 0.8, (a, b, iou)


@pytest.mark.parametrize("key", S.VISUAL_ATTRIBUTES)
def test_every_visual_attribute_changes_the_pixels(key):
    other = [v for v in vocab.ATTRIBUTE_VALUES[key] if v != BASE[key]][0]
    a = np.asarray(draw.render("mug", BASE, 64), dtype=int)
    b = np.asarray(draw.render("mug", dict(BASE, **{key: other}), 64), dtype=int)
    assert np.abs(a - b).sum() > 0


@pytest.mark.parametrize("key", S.TEXT_ATTRIBUTES)
def test_non_visual_attributes_do_not_change_the_pixels(key):
    other = [v for v in vocab.ATTRIBUTE_VALUES[key] if v != BASE[key]][0]
    assert draw.png_bytes(draw.render("mug", BASE, 64)) == draw.png_bytes(
        draw.render("mug", dict(BASE, **{key: other}), 64)
    )
