"""MERIT's LLM steps: a rewrite is kept only with every tag and slot; the judge keeps only a yes."""

from __future__ import annotations

import pyarrow.parquet as pq

from coral import schemas as S
from coral import storage
from coral.merit import llm

TEXT = (
    "Find a product of mug that have the same colour with <Product 1> <image>\nKova cotton mug </Product 1> "
    "and the same pattern with <Product 2> <image>\nBrisk metal mug </Product 2>"
)
ROW = {
    S.QUERY_ID: "merit-test-1",
    S.QUERY_TEXT: TEXT,
    S.CLASS: "mug",
    S.CONDITION_KEYS: ["colour", "pattern"],
}


def test_rewrite_keeps_a_good_rewrite_and_the_template_otherwise(tmp_path):
    failures = storage.resolve(str(tmp_path / "rewrites"))
    step = llm.Rewrite(failures)
    good = (
        "I want a mug in the colour of <Product 1> <image>\nKova cotton mug </Product 1> with the pattern "
        "of <Product 2> <image>\nBrisk metal mug </Product 2>, preferably glossy."
    )
    assert step.parse(ROW, good) == ([{**ROW, S.QUERY_TEXT: good}], None)
    assert "Find a product of mug" in step.prompt(ROW)[0]["content"][0]["text"]
    dropped_slot = good.replace("<Product 2> <image>", "<Product 2>")
    swapped = good.replace("<Product 1>", "<Product X>")
    for bad in (dropped_slot, swapped, "", "   "):
        assert step.parse(ROW, bad) == ([ROW], None)  # the query survives with its template
    failed = pq.read_table(failures.path).to_pylist()
    assert len(failed) == 1  # one file per query id: retries and repeats overwrite it
    assert failed[0][S.ID] == "merit-test-1" and failed[0][S.REASON]


def test_judge_keeps_yes_and_drops_no_or_anything_else():
    step = llm.Judge()
    assert "colour, pattern" in step.prompt(ROW)[0]["content"][0]["text"]
    for answer in ("Yes", "yes, it is complete", " YES."):
        assert step.parse(ROW, answer) == ([ROW], None)
    assert step.parse(ROW, "No, the brand is missing") == ([], "no")
    for answer in ("", "maybe", "yesterday", "\x0b garbage"):
        assert step.parse(ROW, answer) == ([], "answer is neither yes nor no")


def test_label_parses_answers_against_the_card():
    card = {"colour": ["red", "blue"], "pattern": ["solid", "striped"], "brand": ["Kova", "Brisk"]}
    product = {S.ID: "p1", S.CLASS: "mug", S.TITLE: "Kova cotton mug", S.ATTRIBUTES: {}}
    step = llm.Label({"mug": card}, {"p1": b"PNG"}, None)
    prompt = step.prompt(product)[0]["content"]
    assert prompt[0] == {"type": "image", "image": b"PNG"} and "colour: red, blue" in prompt[1]["text"]
    (row,), reason = step.parse(product, "colour: Red\npattern: plaid\nbrand: skip\nsize: large")
    assert reason is None
    assert row[S.ATTRIBUTES]["colour"] == "red"  # the card's spelling
    assert row[S.ATTRIBUTES]["pattern"] is None and row[S.ATTRIBUTES]["brand"] is None  # not on the card
    assert set(row[S.ATTRIBUTES]) == set(S.ATTRIBUTE_KEYS)
    assert step.parse(product, "\x0b ^^ garbage")[0] == []
    assert step.parse(product, "\x0b ^^ garbage")[1]
