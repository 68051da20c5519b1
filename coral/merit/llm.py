"""MERIT's optional LLM steps on composed queries (REFERENCE.md section 4, steps 4 and 5), as annotation
steps for any engine (``coral.stages.annotate.run_step``).

- ``Rewrite``: the template query becomes a natural instruction. The rewrite is kept only when every
  ``<Product i>`` / ``</Product i>`` tag and every ``<image>`` slot survives in order
  (``compose.validate_slots``); otherwise the query keeps its template text and the failed rewrite is
  recorded in ``rewrites/`` with the reason and the raw text. A query is never lost to a bad rewrite.
- ``Label``: a VLM labels a product's attributes from its image, title and its class's attribute card
  (MERIT step 2); the answer is parsed against the card, anything outside it is dropped.
- ``Judge``: the LLM answers yes or no to "is this query complete and are its conditions accurate";
  "no" or an answer that is neither drops the query (``rejected/``, reason ``judge: ...``).
"""

from __future__ import annotations

import re

import pyarrow as pa

from coral import schemas as S
from coral.annotate.prompts import text
from coral.merit.cards import format_card, parse_labels
from coral.merit.compose import validate_slots
from coral.stages.base import write_rejected
from coral.storage import Location

PAIR_ID = "pair_id"  # the row key the annotation steps use (here: the query id)

REWRITE = (
    "Rewrite this product search query as one natural, fluent instruction in English. Keep every "
    "<Product i> ... </Product i> block and every <image> exactly as written and in the same order; you "
    "may rephrase the words around them and add one attribute that the images show.\n\n"
    "Query: {query}\nRewritten:"
)
JUDGE = (
    "A shopper wrote this search query for a product of class {cls}; each <Product i> block shows a "
    "product whose {keys} the wanted product must share. Is the query complete (every condition "
    "stated) and are its conditions accurate? Answer yes or no.\n\nQuery: {query}\nAnswer:"
)
_YES_NO = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)


def keyed(row: dict) -> dict:
    return {**row, PAIR_ID: row[S.QUERY_ID]}


def unkeyed(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != PAIR_ID}


class Rewrite:
    name = "rewrite"
    out_schema = S.TRIPLETS.append(pa.field(PAIR_ID, pa.string()))

    def __init__(self, failures: Location):
        self.failures = failures

    def prompt(self, row: dict) -> list[dict]:
        return [{"role": "user", "content": [text(REWRITE.format(query=row[S.QUERY_TEXT]))]}]

    def parse(self, row: dict, raw: str) -> tuple[list[dict], str | None]:
        rewritten = (raw or "").strip()
        reason = "empty rewrite" if not rewritten else validate_slots(row[S.QUERY_TEXT], rewritten)
        if reason is not None:
            write_rejected(
                self.failures, [{S.ID: row[S.QUERY_ID], S.REASON: reason, S.RAW: raw or ""}], S.REJECTED_RAW
            )
            return [row], None
        return [{**row, S.QUERY_TEXT: rewritten}], None


class Judge:
    name = "judge"
    out_schema = Rewrite.out_schema

    def prompt(self, row: dict) -> list[dict]:
        keys = ", ".join(row[S.CONDITION_KEYS]) or "attributes"
        return [
            {
                "role": "user",
                "content": [text(JUDGE.format(cls=row[S.CLASS], keys=keys, query=row[S.QUERY_TEXT]))],
            }
        ]

    def parse(self, row: dict, raw: str) -> tuple[list[dict], str | None]:
        m = _YES_NO.match(raw or "")
        if m is None:
            return [], "answer is neither yes nor no"
        return ([row], None) if m.group(1).lower() == "yes" else ([], "no")


LABEL = (
    "This is a product image of class {cls}. Using only the attribute card below, give the value of "
    "each attribute you can determine from the image and the title; skip what you cannot determine. "
    "Answer with one 'key: value' line per attribute.\n\nTitle: {title}\nAttribute card:\n{card}\nAnswer:"
)


class Label:
    """A VLM labels one product's attributes from its image, its title and its class's attribute card;
    an answer that yields no label from the card rejects the product (``label_rejected/``)."""

    name = "label"

    def __init__(self, cards: dict, images: dict[str, bytes], schema: pa.Schema):
        self.cards, self.images, self.out_schema = cards, images, schema

    def prompt(self, row: dict) -> list[dict]:
        card = self.cards.get(row[S.CLASS], {})
        body = LABEL.format(cls=row[S.CLASS], title=row[S.TITLE], card=format_card(card))
        return [{"role": "user", "content": [{"type": "image", "image": self.images[row[S.ID]]}, text(body)]}]

    def parse(self, row: dict, raw: str) -> tuple[list[dict], str | None]:
        labels, reason = parse_labels(raw, self.cards.get(row[S.CLASS], {}))
        if reason is not None:
            return [], reason
        return [{**row, S.ATTRIBUTES: {k: labels.get(k) for k in S.ATTRIBUTE_KEYS}}], None
