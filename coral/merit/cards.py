"""Attribute statistics per class, attribute cards, the label filters, and parsing of labelling answers.

A product is a dict with at least ``id``, ``class`` and ``attributes`` (key -> value, a value may be None).
An attribute card is ``{key: [value, ...]}`` for one class: keys ranked by their number of distinct values
(most first), each key's values by frequency (most first), at most ``max_values`` values a key. It is the
closed vocabulary a labelling model picks from (MERIT step 1); ``filter_labels`` applies the rules of
MERIT step 2 to the labels the model gave.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping

from coral import schemas as S

Card = dict[str, list[str]]

# answers that mean "could not tell": dropped wherever labels are read (compared lower-cased, stripped)
MISSING_VALUES = frozenset({"", "skip", "skipped", "none", "unknown", "n/a", "na", "null", "-"})


def is_missing(value: object) -> bool:
    """True for None and for the placeholder answers of ``MISSING_VALUES`` (case-insensitive)."""
    return value is None or str(value).strip().lower() in MISSING_VALUES


def attribute_stats(products: Iterable[Mapping]) -> dict[str, dict[str, Counter]]:
    """class -> key -> Counter of values over the products, missing values left out."""
    stats: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    for p in products:
        for key, value in (p.get(S.ATTRIBUTES) or {}).items():
            if not is_missing(value):
                stats[p[S.CLASS]][key][str(value)] += 1
    return {cls: dict(keys) for cls, keys in stats.items()}


def _ranked_values(counter: Counter) -> list[str]:
    return [v for v, _ in sorted(counter.items(), key=lambda vc: (-vc[1], vc[0]))]


def build_cards(
    products: Iterable[Mapping], max_values: int = 20, max_keys: int | None = None, min_distinct: int = 2
) -> dict[str, Card]:
    """One card per class. Keys with fewer than ``min_distinct`` distinct values are left out (they cannot
    tell products apart); ties are broken by name so the card is the same for any input order."""
    cards = {}
    for cls, keys in sorted(attribute_stats(products).items()):
        ranked = sorted(
            (k for k, c in keys.items() if len(c) >= min_distinct), key=lambda k: (-len(keys[k]), k)
        )
        if max_keys is not None:
            ranked = ranked[:max_keys]
        cards[cls] = {k: _ranked_values(keys[k])[:max_values] for k in ranked}
    return cards


def format_card(card: Card) -> str:
    """The card as prompt text: one ``key: value1, value2, ...`` line per key, in card order."""
    return "\n".join(f"{k}: {', '.join(values)}" for k, values in card.items())


def filter_labels(products: Iterable[Mapping], min_distinct: int = 2, min_count: int = 2) -> list[dict]:
    """Copies of the products with their attributes cleaned per class, in this order: missing values
    dropped; values seen fewer than ``min_count`` times in the class dropped (a value seen once cannot
    make a query with a positive); keys left with fewer than ``min_distinct`` distinct values dropped.
    Products keep their place (an emptied product is still a candidate)."""
    products = list(products)
    stats = attribute_stats(products)
    keep: dict[str, dict[str, set[str]]] = {}
    for cls, keys in stats.items():
        keep[cls] = {}
        for key, counter in keys.items():
            values = {v for v, n in counter.items() if n >= min_count}
            if len(values) >= min_distinct:
                keep[cls][key] = values
    out = []
    for p in products:
        allowed = keep.get(p[S.CLASS], {})
        attrs = {
            k: str(v)
            for k, v in (p.get(S.ATTRIBUTES) or {}).items()
            if not is_missing(v) and str(v) in allowed.get(k, ())
        }
        out.append({**p, S.ATTRIBUTES: attrs})
    return out


# --- parsing a labelling answer -------------------------------------------------------------------------

_FENCE = re.compile(r"```(?:json)?", re.IGNORECASE)
_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s*")
_QUOTES = " \t\"'`*_"


def _norm_key(text: str) -> str:
    return " ".join(re.sub(r"[_\-]", " ", str(text)).strip(_QUOTES).lower().split())


def _norm_value(text: str) -> str:
    return " ".join(str(text).strip(_QUOTES).rstrip(".,;").strip(_QUOTES).lower().split())


def _json_pairs(text: str) -> list[tuple[str, object]] | None:
    body = _FENCE.sub("", text)
    start, end = body.find("{"), body.rfind("}")
    if start < 0 or end <= start:
        return None
    try:
        obj = json.loads(body[start : end + 1])
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    if len(obj) == 1 and isinstance(next(iter(obj.values())), dict):  # {"attributes": {...}}
        obj = next(iter(obj.values()))
    return list(obj.items())


def _line_pairs(text: str) -> list[tuple[str, object]]:
    pairs = []
    for line in text.splitlines():
        line = _BULLET.sub("", line.replace("\uff1a", ":"))
        if ":" not in line:
            continue
        key, value = line.split(":", 1)
        pairs.append((key, value.strip().rstrip(",")))
    return pairs


def parse_labels(text: str | None, card: Card) -> tuple[dict[str, str], str | None]:
    """Labels from a model's answer, either a JSON object (fences and surrounding prose allowed) or
    ``key: value`` lines (bullets allowed). Keys and values are matched to the card case-insensitively
    (``_``/``-``/space alike in keys) and returned in the card's spelling; unknown keys, values outside the
    card, non-string values and missing answers (``skip``, ``unknown``...) are left out; the first answer
    for a key wins. Returns ``(labels, None)``, or ``({}, reason)`` when no label survives."""
    if text is None or not text.strip():
        return {}, "empty answer"
    pairs = _json_pairs(text)
    if pairs is None:
        pairs = _line_pairs(text)
    if not pairs:
        return {}, "no key: value pairs in the answer"
    keys = {_norm_key(k): k for k in card}
    labels: dict[str, str] = {}
    for raw_key, raw_value in pairs:
        key = keys.get(_norm_key(raw_key))
        if key is None or key in labels or not isinstance(raw_value, str | int | float):
            continue
        if isinstance(raw_value, bool) or is_missing(_norm_value(raw_value)):
            continue
        value = {_norm_value(v): v for v in card[key]}.get(_norm_value(raw_value))
        if value is not None:
            labels[key] = value
    if not labels:
        return {}, "no value from the card in the answer"
    return labels, None
