"""MERIT and MegaPairs JSON formats: the MERIT README's own records, composed rows, round-trips."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from coral import schemas as S
from coral.catalog import formats as F
from coral.merit import compose as C

# The two example records of the MERIT README, verbatim, unicode escapes decoded.
QUERY_291 = {
    "id": 291,
    "conversations": [
        {
            "from": "human",
            "value": "Find a product of shoes that have the same closure type with <Product 1> <image>\n"
            "รองเท้าแตะเด็กชายลายเบ็นเท็น 2 เทปปรับสายได้ รุ่น SD460 </Product 1> and the same color with "
            "<Product 2> <image>\nเซทผลไม้ฟรีซดราย สตอเบอรี่ 35 กรัม + ทุเรียน 35 กรัม </Product 2>, "
            "featuring a superhero theme.",
        }
    ],
    "pos_cand_list": ["1731463903574001768", "1731463903574067304"],
    "image": ["xxxx.jpg", "yyyjpg"],
}
CANDIDATE = {
    "id": "1730256425535310625",
    "conversations": [
        {
            "from": "human",
            "value": "Represent the given product: <image>\nBalo HiP thời trang Hàn Quốc, chất liệu vải oxford "
            "chống nước, kích thước 31*13*40cm, phù hợp laptop 15.6 inch.",
        }
    ],
    "image": "zzzz.jpg",
}
MEGAPAIRS = {
    "q_img": "images/000123.jpg",
    "q_text": ["the same mug in blue with a striped band"],
    "t_img": "images/000456.jpg",
    "hns": ["images/000123.jpg", "images/000789.jpg"],
}


def pool() -> list[dict]:
    colours, patterns, sizes = (
        ("red", "blue", "green", "black"),
        ("solid", "striped", "dotted"),
        ("small", "large"),
    )
    return [
        {
            "id": f"m{i:04d}",
            "group_id": f"g{i // 2}",
            "class": "mug",
            "attributes": {
                "colour": colours[i % 4],
                "pattern": patterns[(i // 4) % 3],
                "size": sizes[(i // 12) % 2],
            },
            "title": f"cốc số {i}",
            "language": "vi",
            "split": "train",
        }
        for i in range(96)
    ]


def composed() -> tuple[list[dict], dict[str, str]]:
    products = pool()
    rows, _ = C.compose_table(products, C.ComposeParams(num_queries=40, max_rate=0.2), seed=4)
    assert rows
    return rows, {p["id"]: p["language"] for p in products}


def test_seed_query_imports_as_a_triplet_and_exports_back_verbatim():
    row = F.from_merit_query(QUERY_291)
    assert row[S.QUERY_ID] == "291"
    assert row[S.QUERY_IMAGE_IDS] == ["xxxx.jpg", "yyyjpg"]
    assert row[S.POSITIVE_IDS] == QUERY_291["pos_cand_list"]
    assert (row[S.CLASS], row[S.NUM_CONDITIONS], row[S.CONDITION_KEYS]) == (
        "shoes",
        2,
        ["closure type", "color"],
    )
    assert (row[S.SOURCE], row[S.SPLIT]) == ("import", "test")
    assert pa.Table.from_pylist([row], schema=S.TRIPLETS).num_rows == 1 and set(row) == set(S.TRIPLETS.names)
    back = F.to_merit_query(row)
    assert back == QUERY_291
    assert json.dumps(back, ensure_ascii=False) == json.dumps(QUERY_291, ensure_ascii=False)  # key order too
    assert F.from_merit_query(QUERY_291, languages={"xxxx.jpg": "th"})[S.LANGUAGE] == "th"


def test_our_template_writes_the_seed_query_before_its_rewrite():
    text = QUERY_291["conversations"][0]["value"]
    titles = [part.split("\n", 1)[1].rsplit(" </Product", 1)[0] for part in text.split("<image>")[1:]]
    template = C.query_text("shoes", [("closure type", titles[0]), ("color", titles[1])])
    assert text == template + ", featuring a superhero theme."  # the rewrite appended one visible attribute
    assert C.validate_slots(template, text) is None


def test_seed_candidate_round_trip():
    got = F.from_merit_candidate(CANDIDATE)
    assert got == {
        "id": "1730256425535310625",
        "title": CANDIDATE["conversations"][0]["value"].split("\n", 1)[1],
        "image": "zzzz.jpg",
    }
    assert F.to_merit_candidate(got["id"], got["title"], got["image"]) == CANDIDATE
    with pytest.raises(ValueError, match="Represent the given product"):
        F.from_merit_candidate({**CANDIDATE, "conversations": [{"from": "human", "value": "a bag"}]})


def test_composed_rows_round_trip_through_merit_and_released_forms():
    rows, languages = composed()
    for row in rows:
        imported = {**row, S.SOURCE: "import"}
        merit = F.from_merit_query(F.to_merit_query(row), split="train", languages=languages)
        assert merit == {**imported, S.HARD_NEGATIVE_IDS: []}  # MERIT's query format has no negatives
        released = F.to_released_query(row)
        assert F.from_released_query(released, split="train", languages=languages) == imported
        assert F.to_released_query(F.from_released_query(released)) == released


def test_released_query_with_composition_dict_and_paths():
    obj = {
        "query": {"17": {"product style": "as product image"}, "18": {"color": "blue"}},
        "pos_candidate": [19],
        "hard_negative": [20, 21],
        "query instruction": "Find a product of handbag that has the same product style with <Product 1> "
        "<image>\nA </Product 1> and the same color with <Product 2> <image>\nB </Product 2> with a metallic finish.",
    }
    row = F.from_released_query(obj, position=7)
    assert row[S.QUERY_ID] == "7" and row[S.QUERY_IMAGE_IDS] == ["17", "18"]
    assert row[S.POSITIVE_IDS] == ["19"] and row[S.HARD_NEGATIVE_IDS] == ["20", "21"]
    assert row[S.CONDITION_KEYS] == ["product style", "color"] and row[S.CLASS] == "handbag"
    paths = {"17": "img/17.jpg", "18": "img/18.jpg"}
    assert F.to_merit_query(row, path_of=paths.get)["image"] == ["img/17.jpg", "img/18.jpg"]


def test_megapairs_round_trip_and_variants():
    (row,) = F.from_megapairs(MEGAPAIRS, "mp0")
    assert row[S.QUERY_TEXT] == "<image>\nthe same mug in blue with a striped band"
    assert row[S.QUERY_IMAGE_IDS] == ["images/000123.jpg"] and row[S.POSITIVE_IDS] == ["images/000456.jpg"]
    assert (row[S.NUM_CONDITIONS], row[S.CONDITION_KEYS], row[S.CLASS]) == (1, [], "")
    assert pa.Table.from_pylist([row], schema=S.TRIPLETS).num_rows == 1
    assert F.to_megapairs(row) == MEGAPAIRS

    def stem(path):
        return Path(path).stem

    (by_id,) = F.from_megapairs(MEGAPAIRS, "mp0", id_of=stem)
    assert by_id[S.QUERY_IMAGE_IDS] == ["000123"] and by_id[S.HARD_NEGATIVE_IDS] == ["000123", "000789"]
    assert F.to_megapairs(by_id, path_of=lambda i: f"images/{i}.jpg") == MEGAPAIRS

    brief = {
        "q_img": MEGAPAIRS["q_img"],
        "inst": MEGAPAIRS["q_text"][0],
        "t_img": [MEGAPAIRS["t_img"]],
        "hns": MEGAPAIRS["hns"],
    }
    assert F.from_megapairs(brief, "mp0") == [row]
    several = F.from_megapairs({**MEGAPAIRS, "q_text": ["one", "two"]}, "mp1")
    assert [r[S.QUERY_ID] for r in several] == ["mp1-0", "mp1-1"]
    assert [r[S.QUERY_TEXT] for r in several] == ["<image>\none", "<image>\ntwo"]
    rows, _ = composed()
    with pytest.raises(ValueError, match="one-image"):
        F.to_megapairs(rows[0])


def test_files_json_list_and_lines(tmp_path):
    F.write_json(tmp_path / "q.json", [QUERY_291])
    assert F.read_json(tmp_path / "q.json") == [QUERY_291]
    assert "รองเท้า" in (tmp_path / "q.json").read_text(encoding="utf-8")
    F.write_json(tmp_path / "mp.jsonl", [MEGAPAIRS, MEGAPAIRS], lines=True)
    assert F.read_json(tmp_path / "mp.jsonl") == [MEGAPAIRS, MEGAPAIRS]
    assert len((tmp_path / "mp.jsonl").read_text(encoding="utf-8").splitlines()) == 2


def test_image_paths_lists_every_path_an_item_names():
    """What the import stage checks with ``coral.paths.confine``: every image path, not the product ids."""
    assert F.image_paths("merit", QUERY_291) == ["xxxx.jpg", "yyyjpg"]
    assert F.image_paths("candidate", CANDIDATE) == ["zzzz.jpg"]
    assert F.image_paths("megapairs", MEGAPAIRS) == [
        "images/000123.jpg",
        "images/000456.jpg",
        "images/000123.jpg",
        "images/000789.jpg",
    ]
    assert F.image_paths("megapairs", {"q_img": "q", "inst": "x", "t_img": ["../t"]}) == ["q", "../t"]
    assert F.image_paths("released", {"query": ["1001"], "pos_candidate": ["1002"]}) == []
