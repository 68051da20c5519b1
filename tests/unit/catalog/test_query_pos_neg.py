"""``{query, pos, neg}`` JSON lines (FlagEmbedding's and Tevatron's training format): composed rows go out
and come back as the same triplets; the variants a user's file may have; the paths the import checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from coral import schemas as S
from coral.catalog import formats as F
from tests.unit.catalog.test_formats import composed

LINE = {
    "query_id": "q7",
    "query": "Find a product of mug that has the same colour as <Product 1> <image>\ncốc đỏ </Product 1>",
    "query_image": ["images/m0001.png"],
    "pos": ["cốc xanh", "cốc vàng"],
    "pos_image": ["images/m0002.png", "images/m0003.png"],
    "neg": ["ấm trà"],
    "neg_image": ["images/m0009.png"],
}


def stem(path: str) -> str:
    return Path(path).stem


def path_of(pid: str) -> str:
    return f"images/{pid}.png"


def test_composed_rows_round_trip_with_their_hard_negatives():
    rows, languages = composed()
    titles = {pid: f"title of {pid}" for r in rows for pid in (*r[S.POSITIVE_IDS], *r[S.HARD_NEGATIVE_IDS])}
    assert any(r[S.HARD_NEGATIVE_IDS] for r in rows)
    for row in rows:
        line = F.to_query_pos_neg(row, path_of, titles)
        assert list(line) == ["query_id", "query", "query_image", "pos", "pos_image", "neg", "neg_image"]
        assert line["pos"] == [titles[p] for p in row[S.POSITIVE_IDS]]
        assert line["neg_image"] == [path_of(n) for n in row[S.HARD_NEGATIVE_IDS]]
        back = F.from_query_pos_neg(line, id_of=stem, split="train", languages=languages)
        assert back == {**row, S.SOURCE: "import"}


def test_a_line_reads_as_a_triplet():
    row = F.from_query_pos_neg(LINE, id_of=stem, split="test")
    assert row[S.QUERY_ID] == "q7" and row[S.QUERY_TEXT] == LINE["query"]
    assert row[S.QUERY_IMAGE_IDS] == ["m0001"] and row[S.POSITIVE_IDS] == ["m0002", "m0003"]
    assert row[S.HARD_NEGATIVE_IDS] == ["m0009"] and (row[S.SOURCE], row[S.SPLIT]) == ("import", "test")
    assert (row[S.CLASS], row[S.NUM_CONDITIONS], row[S.CONDITION_KEYS]) == ("mug", 1, ["colour"])
    assert set(row) == set(S.TRIPLETS.names)
    assert (
        F.to_query_pos_neg(row, path_of, {"m0002": "cốc xanh", "m0003": "cốc vàng", "m0009": "ấm trà"})
        == LINE
    )


def test_variants_of_a_users_file():
    brief = {"query": "the same mug in blue", "query_image": "q.jpg", "pos_image": "t.jpg"}  # strings
    row = F.from_query_pos_neg(brief, position="qpn-000000004")
    assert row[S.QUERY_ID] == "qpn-000000004" and row[S.QUERY_TEXT] == "<image>\nthe same mug in blue"
    assert row[S.QUERY_IMAGE_IDS] == ["q.jpg"] and row[S.POSITIVE_IDS] == ["t.jpg"]
    assert row[S.HARD_NEGATIVE_IDS] == [] and row[S.NUM_CONDITIONS] == 1
    text_only = F.from_query_pos_neg({"query": "a red mug", "pos": ["Red mug"], "pos_image": ["r.jpg"]})
    assert text_only[S.QUERY_IMAGE_IDS] == [] and text_only[S.QUERY_TEXT] == "a red mug"
    with pytest.raises(KeyError, match="pos_image"):  # FlagEmbedding's text lines name no product
        F.from_query_pos_neg({"query": "a red mug", "pos": ["Red mug"], "neg": ["Blue mug"]})
    with pytest.raises(ValueError, match="neg has 2 items but neg_image 1 images"):
        F.from_query_pos_neg({**LINE, "neg": ["a", "b"]})
    with pytest.raises(TypeError, match="query is a list"):
        F.from_query_pos_neg({**LINE, "query": ["x"]})


def test_image_paths_are_every_path_a_line_names():
    assert F.image_paths("query_pos_neg", LINE) == [
        "images/m0001.png",
        "images/m0002.png",
        "images/m0003.png",
        "images/m0009.png",
    ]
    assert F.image_paths("query_pos_neg", {"query": "x", "query_image": "../q.jpg", "pos_image": "t"}) == [
        "../q.jpg",
        "t",
    ]


def test_json_lines_file(tmp_path):
    F.write_json(tmp_path / "train.jsonl", [LINE, LINE], lines=True)
    text = (tmp_path / "train.jsonl").read_text(encoding="utf-8")
    assert len(text.splitlines()) == 2 and "cốc xanh" in text
    assert F.read_json(tmp_path / "train.jsonl") == [LINE, LINE]
