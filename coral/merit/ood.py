"""Out-of-distribution splits of MERIT queries (MERIT step 7): by language, by attribute, by class.

Each function maps TRIPLETS rows to new split labels, one per row: a ``train`` row stays ``train`` only when
it touches nothing held out; a ``test`` row becomes ``ood_{kind}_{value}`` when it is about a held-out
value; every other row gets None (not part of that experiment). A row "touches" its query products,
positives and hard negatives (all are trained on); a test row "is about" what it shows and retrieves
(query products and positives).

- language: a train row touches no product in a held-out language; ``ood_language_th`` holds the test rows
  whose products are all in Thai (MERIT: train without th, ms, id; test on each).
- attribute: a train row has no condition on a held-out key; ``ood_attribute_brand`` holds the test rows
  with a condition on brand (the first held-out key in the given order wins). MERIT tested on products
  that carry the key; every catalog product carries every key, so the condition keys decide here.
- class: a train row is of no held-out class; ``ood_class_phone`` holds the test rows of class phone
  (a query's products all share its class).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from coral import schemas as S

Labels = list[str | None]


def _shown(row: Mapping) -> list[str]:
    return list(row[S.QUERY_IMAGE_IDS]) + list(row[S.POSITIVE_IDS])


def _touched(row: Mapping) -> list[str]:
    return _shown(row) + list(row[S.HARD_NEGATIVE_IDS])


def _split(
    rows: Sequence[Mapping], kind: str, train_ok: Callable[[Mapping], bool], test_value: Callable
) -> Labels:
    labels: Labels = []
    for row in rows:
        if row[S.SPLIT] == "train":
            labels.append("train" if train_ok(row) else None)
        elif row[S.SPLIT] == "test":
            value = test_value(row)
            labels.append(None if value is None else f"ood_{kind}_{value}")
        else:
            labels.append(None)
    return labels


def language_ood(
    rows: Sequence[Mapping],
    product_languages: Mapping[str, str],
    held_out: Sequence[str] = ("th", "ms", "id"),
) -> Labels:
    """Split labels by language; ``product_languages`` maps every product id the rows name to its language."""
    held = set(held_out)

    def test_value(row):
        langs = {product_languages[p] for p in _shown(row)}
        return next(iter(langs)) if len(langs) == 1 and langs <= held else None

    return _split(
        rows, "language", lambda r: not {product_languages[p] for p in _touched(r)} & held, test_value
    )


def attribute_ood(rows: Sequence[Mapping], held_out: Sequence[str] = ("brand", "pattern")) -> Labels:
    """Split labels by condition key."""
    return _split(
        rows,
        "attribute",
        lambda r: not set(r[S.CONDITION_KEYS]) & set(held_out),
        lambda r: next((k for k in held_out if k in r[S.CONDITION_KEYS]), None),
    )


def class_ood(rows: Sequence[Mapping], held_out: Sequence[str] = ("table", "phone")) -> Labels:
    """Split labels by query class."""
    return _split(
        rows,
        "class",
        lambda r: r[S.CLASS] not in held_out,
        lambda r: r[S.CLASS] if r[S.CLASS] in held_out else None,
    )


def apply_labels(rows: Sequence[Mapping], labels: Labels) -> list[dict]:
    """The rows with their new split; rows labelled None are left out."""
    return [{**row, S.SPLIT: label} for row, label in zip(rows, labels, strict=True) if label is not None]
