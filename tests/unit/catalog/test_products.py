"""coral.catalog.products: the catalog from the user's products file (no Ray)."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pytest
from PIL import Image

from coral import schemas as S
from coral import storage
from coral.catalog import formats, products
from coral.config import CatalogConfig, Config, ImportConfig, load_config
from coral.errors import ConfigError
from coral.stages.catalog import CatalogStage
from coral.stages.imports import to_rows


def png(colour=(200, 30, 30), mode="RGB", size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format="PNG")
    return buf.getvalue()


def write_dataset(folder) -> list[dict]:
    """Images under ``folder/images`` (one corrupt, one empty, one missing) and the items naming them."""
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "a.png").write_bytes(png())
    (folder / "images" / "b.png").write_bytes(png((0, 90, 0)))
    (folder / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (folder / "images" / "empty.png").write_bytes(b"")
    return [
        formats.to_merit_candidate("101", "Red mug", "images/a.png"),
        {
            "id": 102,
            "title": "Green lamp",
            "image": "images/b.png",
            "class": "lamp",
            "language": "th",
            "attributes": {"colour": "green", "material": 3, "shape": "round"},
            "split": "train",
        },
        {"id": "103", "title": "Broken", "image": "images/corrupt.png"},
        {"id": "104", "title": "Empty", "image": "images/empty.png"},
        {"id": "105", "title": "Gone", "image": "images/missing.png"},
        {"id": "101", "title": "Again", "image": "images/b.png"},
        {"id": "", "title": "No id", "image": "images/a.png"},
        {"id": None, "title": "Null id", "image": "images/a.png"},
        {"id": "106", "image": "images/a.png"},  # no title
    ]


def test_both_formats_parse_with_defaults():
    merit = products.parse_product(formats.to_merit_candidate(7, "A red\nmug", "x/7.jpg"))
    assert merit[S.ID] == "7" and merit[S.TITLE] == "A red\nmug" and merit[S.IMAGE] == "x/7.jpg"
    assert merit[S.CLASS] == "product" and merit[S.LANGUAGE] == "en"
    assert merit[S.ATTRIBUTES] == dict.fromkeys(S.ATTRIBUTE_KEYS)
    assert merit[S.CAPTION] == "A red\nmug" and merit[S.GROUP_ID] == "7" and merit[S.VARIANT_ATTRIBUTE] == ""
    assert merit[S.SPLIT] == "train"  # test_fraction 0
    plain = products.parse_product(
        {
            "id": "p1",
            "title": "Lamp",
            "image": "l.png",
            "class": "lamp",
            "language": "vi",
            "attributes": {"colour": "blue", "size": 2, "weight": "1kg"},
            "split": "ood",
            "caption": "a blue lamp",
            "group_id": "g1",
        }
    )
    assert (plain[S.CLASS], plain[S.LANGUAGE], plain[S.SPLIT]) == ("lamp", "vi", "ood")
    assert (plain[S.CAPTION], plain[S.GROUP_ID]) == ("a blue lamp", "g1")
    assert plain[S.ATTRIBUTES] == {**dict.fromkeys(S.ATTRIBUTE_KEYS), "colour": "blue", "size": "2"}
    assert plain["dropped_attributes"] == ["weight"]
    with pytest.raises(ValueError, match="Represent the given product"):
        products.parse_product({"id": 1, "conversations": [{"from": "human", "value": "x"}], "image": "a"})


def test_split_is_a_deterministic_seeded_fraction():
    ids = [f"p{i}" for i in range(2000)]

    def splits(seed, fraction):
        return [
            products.parse_product({"id": i, "title": "", "image": "a"}, seed, fraction)[S.SPLIT] for i in ids
        ]

    a = splits(3, 0.3)
    assert a == splits(3, 0.3)  # same ids, same seed: the same splits
    assert set(a) == {"train", "test"} and 0.26 < a.count("test") / len(a) < 0.34
    assert splits(4, 0.3) != a
    assert set(splits(3, 0.0)) == {"train"} and set(splits(3, 1.0)) == {"test"}
    # an id's split does not depend on the other products in the file
    alone = products.parse_product({"id": "p17", "title": "", "image": "a"}, 3, 0.3)[S.SPLIT]
    assert alone == a[17]
    # an explicit split wins
    assert (
        products.parse_product({"id": "p1", "title": "", "image": "a", "split": "x"}, 3, 1.0)[S.SPLIT] == "x"
    )


def test_rows_and_rejections_with_reasons(tmp_path):
    items = write_dataset(tmp_path)
    (tmp_path / "products.json").write_text(json.dumps(items))
    read, root = products.read_items(str(tmp_path / "products.json"))
    assert read == items and root.path == str(tmp_path)
    entries, rejected, details = products.parse_products(read)
    assert details == {"dropped_attributes": {"shape": 1}}
    rows, bad = products.product_rows(entries, root)
    table = products.table(rows)
    assert table.schema.equals(S.CATALOG)
    assert table[S.ID].to_pylist() == ["101", "102"]
    assert table[S.IMAGE].to_pylist() == [png(), png((0, 90, 0))]  # the file's bytes
    second = table.to_pylist()[1]
    assert (second[S.CLASS], second[S.LANGUAGE], second[S.SPLIT]) == ("lamp", "th", "train")
    assert second[S.ATTRIBUTES]["colour"] == "green" and second[S.ATTRIBUTES]["material"] == "3"
    got = {r[products.ITEM]: (r[S.ID], r[S.REASON], r[products.IMAGE_PATH]) for r in rejected + bad}
    assert (
        got[2][0] == "103"
        and got[2][1].startswith("undecodable image: ")
        and got[2][2] == "images/corrupt.png"
    )
    assert got[3] == ("104", "empty image file", "images/empty.png")
    assert got[4] == ("105", "image not found", "images/missing.png")
    assert got[5] == ("101", "duplicate id", "images/b.png")
    assert got[6] == ("item 6", "empty id", "images/a.png")
    assert got[7] == ("item 7", "empty id", "images/a.png")
    assert got[8][0] == "item 8" and got[8][1].startswith("unreadable: KeyError")
    assert len(got) == 7 and len(rows) + len(got) == len(items)
    pa.Table.from_pylist(rejected + bad, schema=products.REJECTED)  # fits the rejected schema


def test_json_lines_absolute_paths_and_bad_files(tmp_path):
    (tmp_path / "a.png").write_bytes(png())
    lines = [{"id": "x", "title": "t", "image": str(tmp_path / "a.png")}]
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "p.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    read, root = products.read_items(str(sub / "p.jsonl"))
    entries = products.parse_products(read)[0]
    rows, bad = products.product_rows(entries, root)  # outside the file's folder: rejected
    assert not rows and [(r[S.ID], r[S.REASON]) for r in bad] == [
        ("x", "image path: absolute path outside the file's folder and the allowed roots")
    ]
    rows, bad = products.product_rows(entries, root, allowed=(str(tmp_path),))  # allowed explicitly
    assert [r[S.ID] for r in rows] == ["x"] and not bad
    assert products.image_location(root, "../a.png", allowed=(str(tmp_path),)).path == str(tmp_path / "a.png")
    with pytest.raises(ValueError, match="escapes the file's folder"):
        products.image_location(root, "../a.png")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"catalog\.products: .* neither a JSON list nor JSON lines"):
        products.read_items(str(tmp_path / "bad.json"))
    with pytest.raises(ConfigError, match=r"catalog\.products: cannot read"):
        products.read_items(str(tmp_path / "nope.json"))


def test_images_plain_rgb_decoding_would_change_become_png():
    rgba = png((10, 20, 30, 0), mode="RGBA")
    out = products.image_bytes(rgba)
    assert out != rgba
    img = Image.open(io.BytesIO(out))
    assert img.format == "PNG" and img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, format="JPEG")
    assert products.image_bytes(buf.getvalue()) == buf.getvalue()
    with pytest.raises(ValueError, match="undecodable"):
        products.image_bytes(b"GIF89a nonsense")


def test_shards_are_bounded():
    assert products.shards([], 4) == []
    assert [len(s) for s in products.shards(list(range(6)), 4)] == [2, 1, 1, 2]
    big = products.shards(list(range(2500)), 1)
    assert len(big) == 3 and max(map(len, big)) <= products.PER_TASK
    assert [x for s in big for x in s] == list(range(2500))


def test_config_and_validate():
    cfg = load_config(None, ["catalog.source=products", "catalog.products=s3://b/p.json"])
    assert cfg.catalog.source == "products" and cfg.catalog.products == "s3://b/p.json"
    assert CatalogConfig(source="products", test_fraction=1.0).test_fraction == 1.0
    with pytest.raises(ConfigError, match="test_fraction"):
        CatalogConfig(test_fraction=1.0)  # synthetic: a test split of every group leaves none to train
    with pytest.raises(ConfigError, match=r"catalog\.products"):
        CatalogStage().validate(load_config(None, ["catalog.source=products"]))
    CatalogStage().validate(Config())  # synthetic needs no file
    with pytest.raises(ConfigError, match="test_fraction"):
        ImportConfig(test_fraction=1.5)
    assert storage.resolve("s3://b/p.json").is_s3


def test_import_test_fraction_is_seeded_by_query_id():
    items = [
        formats.to_merit_query(
            {
                S.QUERY_ID: str(i),
                S.QUERY_TEXT: "Find a mug with <image>",
                S.POSITIVE_IDS: ["9"],
                S.QUERY_IMAGE_IDS: ["a"],
            }
        )
        for i in range(400)
    ]

    def splits(**kw):
        cfg = ImportConfig(split="train", **kw)
        return [to_rows(cfg, item, n, str)[0][S.SPLIT] for n, item in enumerate(items)]

    assert set(splits()) == {"train"}  # 0: everything keeps imports.split
    a = splits(test_fraction=0.25)
    assert a == splits(test_fraction=0.25) and 0.17 < a.count("test") / len(a) < 0.33
    assert set(a) == {"train", "test"} and splits(test_fraction=0.25, seed=1) != a
    assert a == [products.hashed_split(0, str(i), 0.25) for i in range(400)]
    mega = ImportConfig(format="megapairs", test_fraction=0.5)
    rows = to_rows(mega, {"q_img": "q", "q_text": ["a", "b", "c"], "t_img": "t"}, 0, str)
    assert len({r[S.SPLIT] for r in rows}) == 1  # one item's instructions share its split
