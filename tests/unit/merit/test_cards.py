"""Attribute statistics, cards, label filters and answer parsing on hand-made products."""

from __future__ import annotations

import pytest

from coral.merit import cards


def product(pid: str, cls: str, **attrs) -> dict:
    return {"id": pid, "class": cls, "attributes": attrs}


# mug: colour has 3 real values (red x3, blue x2, green x1), pattern 2 (solid x4, striped x2),
# brand 1 (Kova x6); hat: colour 2 values. Missing answers sprinkled in.
PRODUCTS = [
    product("m1", "mug", colour="red", pattern="solid", brand="Kova"),
    product("m2", "mug", colour="red", pattern="solid", brand="Kova"),
    product("m3", "mug", colour="red", pattern="striped", brand="Kova"),
    product("m4", "mug", colour="blue", pattern="striped", brand="Kova"),
    product("m5", "mug", colour="blue", pattern="solid", brand="Kova"),
    product("m6", "mug", colour="green", pattern="solid", brand="Kova", size="Unknown"),
    product("m7", "mug", colour="SKIP", pattern=None, brand="n/a", size=""),
    product("h1", "hat", colour="red"),
    product("h2", "hat", colour="black"),
]


def test_is_missing_is_case_insensitive_and_covers_placeholders():
    for v in (None, "", " ", "skip", "SKIP", "None", "unknown", "N/A", "na", "null"):
        assert cards.is_missing(v), v
    for v in ("red", "0", "nylon", "nonwoven"):
        assert not cards.is_missing(v), v


def test_stats_count_values_per_class_without_missing():
    stats = cards.attribute_stats(PRODUCTS)
    assert set(stats) == {"mug", "hat"}
    assert dict(stats["mug"]["colour"]) == {"red": 3, "blue": 2, "green": 1}
    assert dict(stats["mug"]["brand"]) == {"Kova": 6}
    assert "size" not in stats["mug"]  # only missing answers
    assert dict(stats["hat"]["colour"]) == {"red": 1, "black": 1}


def test_cards_rank_keys_by_distinct_values_and_values_by_frequency():
    got = cards.build_cards(PRODUCTS)
    assert got["mug"] == {
        "colour": ["red", "blue", "green"],
        "pattern": ["solid", "striped"],
    }  # brand: 1 value
    assert list(got["mug"]) == ["colour", "pattern"]
    assert got["hat"] == {"colour": ["black", "red"]}  # a frequency tie is broken by name
    assert cards.build_cards(PRODUCTS, max_values=2)["mug"]["colour"] == ["red", "blue"]
    assert list(cards.build_cards(PRODUCTS, max_keys=1)["mug"]) == ["colour"]
    assert cards.build_cards(list(reversed(PRODUCTS))) == got  # input order does not matter
    assert cards.format_card(got["mug"]) == "colour: red, blue, green\npattern: solid, striped"


def test_filters_drop_missing_then_rare_values_then_single_value_keys():
    out = cards.filter_labels(PRODUCTS)
    assert [p["id"] for p in out] == [p["id"] for p in PRODUCTS]  # every product keeps its place
    by_id = {p["id"]: p["attributes"] for p in out}
    assert by_id["m1"] == {"colour": "red", "pattern": "solid"}  # brand: one distinct value
    assert by_id["m6"] == {"pattern": "solid"}  # green seen once; size "Unknown" is missing
    assert by_id["m7"] == {}
    assert by_id["h1"] == {}  # red and black each seen once in hat
    assert PRODUCTS[0]["attributes"]["brand"] == "Kova"  # inputs are not modified
    loose = {p["id"]: p["attributes"] for p in cards.filter_labels(PRODUCTS, min_count=1)}
    assert loose["m6"] == {"colour": "green", "pattern": "solid"}
    assert loose["h1"] == {"colour": "red"}


CARD = {"colour": ["red", "light blue", "black"], "closure type": ["zipper", "buckle"], "brand": ["Kova"]}


@pytest.mark.parametrize(
    "text, labels, reason",
    [
        ("colour: red\nclosure type: zipper", {"colour": "red", "closure type": "zipper"}, None),
        (
            "- Colour: **Light Blue**\n- closure_type: Buckle.",
            {"colour": "light blue", "closure type": "buckle"},
            None,
        ),
        ("1. colour: black\n2) brand: kova", {"colour": "black", "brand": "Kova"}, None),
        ('```json\n{"colour": "RED", "brand": "skip"}\n```', {"colour": "red"}, None),
        (
            'Here you go: {"attributes": {"Closure-Type": "zipper"}} hope it helps',
            {"closure type": "zipper"},
            None,
        ),
        ('{"colour": ["red"], "closure type": 3, "brand": "Kova"}', {"brand": "Kova"}, None),
        ("colour\uff1ared", {"colour": "red"}, None),
        ("colour: red\ncolour: black", {"colour": "red"}, None),  # the first answer for a key wins
        ("colour: red\nmaterial: leather\nsize: large", {"colour": "red"}, None),  # keys off the card
        ("colour: magenta\nbrand: unknown", {}, "no value from the card in the answer"),
        ("colour: skip\nclosure type: none", {}, "no value from the card in the answer"),
        ("I cannot tell from this image.", {}, "no key: value pairs in the answer"),
        ("   ", {}, "empty answer"),
        (None, {}, "empty answer"),
        ("{not json", {}, "no key: value pairs in the answer"),
    ],
)
def test_parse_labels_golden(text, labels, reason):
    assert cards.parse_labels(text, CARD) == (labels, reason)
