"""MERIT's query text and the checks on it: the template of a composed query and of a cold-start query,
the ``<Product i>`` / ``<image>`` slots a rewrite must keep, and MERIT step 5's rules on a TRIPLETS row.

Query text (MERIT's template, every condition joined by " and " as in MERIT's ``annotate_query.py``):
``Find a product of {class} that have the same {attr_1} with <Product 1> <image>\\n{title_1} </Product 1>
and the same {attr_2} with <Product 2> <image>\\n{title_2} </Product 2> and the same {attr_3} with ...``.
Cold-start text (one product, a near-duplicate pair a -> b differing in ``key``):
``Find a product of {class} that have the same product style with <Product 1> <image>\\n{title_a}
</Product 1> but with {key} {value_b}``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from coral import schemas as S
from coral.catalog import vocab

STYLE_WORD = "product style"  # MERIT's stand-in for "every attribute but the one that changes"
ATTRIBUTE_WORDS = vocab.ATTRIBUTE_WORDS
_SLOT = re.compile(r"</?Product \d+>|<image>")


def class_word(cls: str) -> str:
    names = vocab.CLASSES.get(cls)
    return names[0] if names else cls.replace("_", " ")


def attribute_word(key: str) -> str:
    return ATTRIBUTE_WORDS.get(key, key.replace("_", " "))


def product_slot(i: int, title: str) -> str:
    return f"<Product {i}> {S.IMAGE_SLOT}\n{title} </Product {i}>"


def query_text(cls_word: str, parts: Sequence[tuple[str, str]]) -> str:
    """MERIT's template for conditions ``[(attribute word, product title), ...]``, joined by " and "."""
    conds = [f"the same {attr} with {product_slot(i, title)}" for i, (attr, title) in enumerate(parts, 1)]
    return f"Find a product of {cls_word} that have " + " and ".join(conds)


def cold_query_text(cls_word: str, title: str, attr: str, value: str) -> str:
    return (
        f"Find a product of {cls_word} that have the same {STYLE_WORD} with {product_slot(1, title)} "
        f"but with {attr} {value}"
    )


def validate_slots(original: str, rewritten: str) -> str | None:
    """None when the rewrite keeps every ``<Product i>``/``</Product i>`` tag and ``<image>`` slot of the
    original, same count and order; else why it does not."""
    want, got = _SLOT.findall(original), _SLOT.findall(rewritten)
    if want == got:
        return None
    n_want, n_got = want.count(S.IMAGE_SLOT), got.count(S.IMAGE_SLOT)
    if n_want != n_got:
        return f"image slots: {n_want} in the original, {n_got} in the rewrite"
    missing = [t for t in dict.fromkeys(want) if want.count(t) != got.count(t)]
    extra = [t for t in dict.fromkeys(got) if t not in want]
    if missing or extra:
        return f"product tags changed: missing {missing}, unexpected {extra}"
    return "product tags or image slots reordered"


def rule_filter(row: Mapping) -> str | None:
    """MERIT step 5's rules on a TRIPLETS row: why it must be dropped, or None."""
    if not row[S.POSITIVE_IDS]:
        return "no positives"
    if set(row[S.POSITIVE_IDS]) & set(row[S.QUERY_IMAGE_IDS]):
        return "a positive is one of the query products"
    if row[S.QUERY_TEXT].count(S.IMAGE_SLOT) != len(row[S.QUERY_IMAGE_IDS]):
        return "image slots do not match the query images"
    return None


def apply_rule_filter(rows: Iterable[Mapping]) -> tuple[list[dict], list[dict]]:
    """(rows that pass ``rule_filter``, REJECTED rows for the others)."""
    kept, rejected = [], []
    for row in rows:
        reason = rule_filter(row)
        if reason is None:
            kept.append(dict(row))
        else:
            rejected.append({S.ID: row[S.QUERY_ID], S.REASON: reason})
    return kept, rejected
