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


# --- a rewrite that adds an attribute: the positives are checked against it ----------------------------

PRODUCTS = [
    {S.ID: "q1", S.CLASS: "mug", S.ATTRIBUTES: {"colour": "red", "pattern": "solid", "material": "cotton"}},
    {S.ID: "q2", S.CLASS: "mug", S.ATTRIBUTES: {"colour": "blue", "pattern": "dotted", "material": "metal"}},
    {S.ID: "p1", S.CLASS: "mug", S.ATTRIBUTES: {"colour": "red", "pattern": "dotted", "size": "large"}},
    {S.ID: "p2", S.CLASS: "mug", S.ATTRIBUTES: {"colour": "red", "pattern": "dotted", "size": "small"}},
    {S.ID: "p3", S.CLASS: "mug", S.ATTRIBUTES: {"colour": "red", "pattern": "dotted", "size": "large"}},
    {S.ID: "h1", S.CLASS: "hat", S.ATTRIBUTES: {"colour": "teal", "pattern": None}},
]
ATTRS = {p[S.ID]: p[S.ATTRIBUTES] for p in PRODUCTS}
POSITIVE_ROW = {
    **ROW,
    S.QUERY_IMAGE_IDS: ["q1", "q2"],
    S.POSITIVE_IDS: ["p1", "p2", "p3"],
    S.HARD_NEGATIVE_IDS: ["h1"],
    S.SOURCE: "merit",
}


def rewritten(extra: str) -> str:
    return (
        f"I want a {extra}mug in the colour of <Product 1> <image>\nKova cotton mug </Product 1> with the "
        "pattern of <Product 2> <image>\nBrisk metal mug </Product 2>."
    )


def rewrite_step(tmp_path, min_positives=2) -> llm.Rewrite:
    failures = storage.resolve(str(tmp_path / "rewrites"))
    return llm.Rewrite(failures, ATTRS, llm.attribute_values(PRODUCTS), min_positives=min_positives)


def test_attribute_values_are_the_vocabulary_and_what_the_class_carries():
    values = llm.attribute_values(PRODUCTS)
    assert set(values) == {"mug", "hat"}
    assert "teal" in values["hat"]["colour"] and "teal" not in values["mug"]["colour"]  # per class
    assert {"red", "blue", "orange"} <= set(values["mug"]["colour"])  # the catalog vocabulary's colours
    assert "leather" in values["mug"]["material"] and "Kova" in values["mug"]["brand"]


def test_rewrite_adding_a_value_keeps_only_the_positives_that_have_it(tmp_path):
    step = rewrite_step(tmp_path)
    text = rewritten("large ")
    assert step.parse(POSITIVE_ROW, text) == (
        [{**POSITIVE_ROW, S.QUERY_TEXT: text, S.POSITIVE_IDS: ["p1", "p3"]}],
        None,
    )
    assert llm.added_attributes(TEXT, text, llm.attribute_values(PRODUCTS)["mug"]) == {"large": ["size"]}
    # the positives keep their order; hard negatives and conditions are untouched
    text = rewritten("Large ")
    assert step.parse({**POSITIVE_ROW, S.POSITIVE_IDS: ["p3", "p2", "p1"]}, text)[0][0][S.POSITIVE_IDS] == [
        "p3",
        "p1",
    ]


def test_rewrite_adding_a_value_no_positive_has_is_rejected(tmp_path):
    step = rewrite_step(tmp_path)
    assert step.parse(POSITIVE_ROW, rewritten("striped ")) == (
        [],
        "rewrite added pattern=striped; no positive has it",
    )
    # one left of the two a query needs: rejected; a cold-start row needs one
    assert step.parse(POSITIVE_ROW, rewritten("small ")) == (
        [],
        "rewrite added size=small; 1 positive(s) have it, fewer than 2",
    )
    cold = {**POSITIVE_ROW, S.SOURCE: "merit_cold"}
    assert step.parse(cold, rewritten("small "))[0][0][S.POSITIVE_IDS] == ["p2"]
    assert rewrite_step(tmp_path, min_positives=1).parse(POSITIVE_ROW, rewritten("small "))[1] is None
    # two added values: a positive needs both
    assert step.parse(POSITIVE_ROW, rewritten("large red "))[0][0][S.POSITIVE_IDS] == ["p1", "p3"]
    assert step.parse(POSITIVE_ROW, rewritten("large blue "))[1] == (
        "rewrite added colour=blue, size=large; no positive has them"
    )


def test_rewrite_adding_nothing_keeps_every_positive(tmp_path):
    step = rewrite_step(tmp_path)
    for extra in ("", "glossy ", "largest "):  # no value, or one only inside a longer word
        text = rewritten(extra)
        assert step.parse(POSITIVE_ROW, text) == ([{**POSITIVE_ROW, S.QUERY_TEXT: text}], None)
    # values inside the product blocks (the titles name materials and brands) are not added by the rewrite
    assert "cotton" in rewritten("") and "metal" in rewritten("")
    # a value the template already states is not new
    template = TEXT + " but with size small"
    text = rewritten("") + " Size small, please."
    row = {**POSITIVE_ROW, S.QUERY_TEXT: template}
    assert step.parse(row, text) == ([{**row, S.QUERY_TEXT: text}], None)
    # without the products' attributes the step does not check (and a broken slot keeps the template)
    plain = llm.Rewrite(storage.resolve(str(tmp_path / "plain")))
    assert plain.parse(POSITIVE_ROW, rewritten("striped "))[0][0][S.POSITIVE_IDS] == ["p1", "p2", "p3"]
    assert step.parse(POSITIVE_ROW, rewritten("striped ").replace("<image>", "", 1)) == ([POSITIVE_ROW], None)
