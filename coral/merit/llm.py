"""MERIT's optional LLM steps on composed queries (REFERENCE.md section 4, steps 4 and 5), as annotation
steps for any engine (``coral.annotate.runner.run_step``).

- ``Rewrite``: the template query becomes a natural instruction. The rewrite is kept only when every
  ``<Product i>`` / ``</Product i>`` tag and every ``<image>`` slot survives in order
  (``compose.validate_slots``); otherwise the query keeps its template text and the failed rewrite is
  recorded in ``rewrites/`` with the reason and the raw text. A query is never lost to a broken slot.
  MERIT lets the rewrite add a visible attribute: when the rewritten text (outside the product blocks,
  whose titles are the products' own) names an attribute value of the query's class that the template
  did not (``attribute_values``: the catalog vocabulary's values and those the class's products carry),
  only the row's positives that carry that value stay, in their order; the others (they now miss one
  condition) are dropped from ``positive_ids``. A row left with fewer than ``min_positives`` (cold-start
  rows: 1) is rejected, reason ``rewrite: rewrite added colour=red; no positive has it``. A value is
  matched as a whole word, case-insensitively; negations ("not red") are not understood and count as
  naming the value, which can only drop positives, never add a wrong one. Only the kept positives (up to
  ``max_positives``) are checked: the pool is not searched again.
- ``Label``: a VLM labels a product's attributes from its image, title and its class's attribute card
  (MERIT step 2); the answer is parsed against the card, anything outside it is dropped.
- ``Judge``: the LLM answers yes or no to "is this query complete and are its conditions accurate";
  "no" or an answer that is neither drops the query (``rejected/``, reason ``judge: ...``).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping

import pyarrow as pa

from coral import schemas as S
from coral import storage
from coral.annotate.prompts import text
from coral.annotate.steps import PAIR_ID  # the row key the annotation steps use (here: the query id)
from coral.catalog import vocab
from coral.merit.cards import format_card, is_missing, parse_labels
from coral.merit.compose import COLD_SOURCE, validate_slots
from coral.storage import Location

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


Values = Mapping[str, Mapping[str, Collection[str]]]  # class -> attribute key -> values
_BLOCK = re.compile(r"<Product (\d+)>.*?</Product \1>", re.DOTALL)


def attribute_values(products: Iterable[Mapping]) -> dict[str, dict[str, list[str]]]:
    """class -> key -> the values a rewrite may name for that class: the catalog vocabulary's values of
    every key, and the values the class's products carry."""
    out: dict[str, dict[str, set[str]]] = {}
    for p in products:
        keys = out.setdefault(str(p[S.CLASS]), {k: set(v) for k, v in vocab.ATTRIBUTE_VALUES.items()})
        for k, v in (p.get(S.ATTRIBUTES) or {}).items():
            if not is_missing(v):
                keys.setdefault(k, set()).add(str(v))
    return {c: {k: sorted(v) for k, v in keys.items()} for c, keys in out.items()}


def _named(query: str, values: Mapping[str, Collection[str]]) -> dict[str, list[str]]:
    """value -> the keys it belongs to, for every value named outside the ``<Product i>`` blocks."""
    words = _BLOCK.sub(" ", query).lower()
    named: dict[str, list[str]] = {}
    for key in sorted(values):
        for value in values[key]:
            pattern = r"\s+".join(re.escape(w) for w in str(value).lower().split())
            if pattern and re.search(rf"(?<!\w){pattern}(?!\w)", words):
                named.setdefault(str(value), []).append(key)
    return named


def added_attributes(template: str, rewritten: str, values: Mapping[str, Collection[str]]) -> dict:
    """value -> keys, for the values the rewrite names and the template does not."""
    before = _named(template, values)
    return {v: keys for v, keys in _named(rewritten, values).items() if v not in before}


class Rewrite:
    """MERIT step 4's rewrite. With ``attributes`` (product id -> its attributes, for the rows'
    positives) the positives are checked against any attribute value the rewrite adds (module
    docstring); ``values`` (``attribute_values``) is what counts as a value, the vocabulary's by default."""

    name = "rewrite"
    out_schema = S.TRIPLETS.append(pa.field(PAIR_ID, pa.string()))

    def __init__(
        self,
        failures: Location,
        attributes: Mapping[str, Mapping[str, str | None]] | None = None,
        values: Values | None = None,
        min_positives: int = 1,
    ):
        self.failures, self.attributes, self.values = failures, attributes, values
        self.min_positives = min_positives

    def prompt(self, row: dict) -> list[dict]:
        return [{"role": "user", "content": [text(REWRITE.format(query=row[S.QUERY_TEXT]))]}]

    def parse(self, row: dict, raw: str) -> tuple[list[dict], str | None]:
        rewritten = (raw or "").strip()
        reason = "empty rewrite" if not rewritten else validate_slots(row[S.QUERY_TEXT], rewritten)
        if reason is not None:
            storage.write_rejected(
                self.failures, [{S.ID: row[S.QUERY_ID], S.REASON: reason, S.RAW: raw or ""}], S.REJECTED_RAW
            )
            return [row], None
        if self.attributes is None:
            return [{**row, S.QUERY_TEXT: rewritten}], None
        return self.check_added(row, rewritten)

    def check_added(self, row: dict, rewritten: str) -> tuple[list[dict], str | None]:
        """The rewritten row with only the positives that carry every value the rewrite added, or why
        it is rejected (fewer than ``min_positives`` left; a cold-start row needs 1)."""
        values = (self.values or {}).get(row[S.CLASS], vocab.ATTRIBUTE_VALUES)
        added = added_attributes(row[S.QUERY_TEXT], rewritten, values)
        if not added:
            return [{**row, S.QUERY_TEXT: rewritten}], None

        def carries(pid: str) -> bool:
            attrs = self.attributes.get(pid) or {}
            return all(any(attrs.get(k) == v for k in keys) for v, keys in added.items())

        kept = [pid for pid in row[S.POSITIVE_IDS] if carries(pid)]
        need = 1 if row.get(S.SOURCE) == COLD_SOURCE else self.min_positives
        if len(kept) < need:
            what = ", ".join(f"{'/'.join(keys)}={v}" for v, keys in sorted(added.items()))
            it = "it" if len(added) == 1 else "them"
            has = (
                f"no positive has {it}"
                if not kept
                else f"{len(kept)} positive(s) have {it}, fewer than {need}"
            )
            return [], f"rewrite added {what}; {has}"
        return [{**row, S.QUERY_TEXT: rewritten, S.POSITIVE_IDS: kept}], None


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
