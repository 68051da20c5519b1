"""What training may not see: rows touching a held-out language, class or attribute are dropped, whatever
their source; held-out queries belong to their split and to their OOD labels."""

from __future__ import annotations

from coral import schemas as S
from coral.stages import heldout

PRODUCTS = {"a": ("en", "mug"), "b": ("th", "mug"), "c": ("en", "phone"), "d": ("vi", "mug")}


def row(qid, images, positives, negatives=(), keys=(), cls=""):
    return {
        S.QUERY_ID: qid,
        S.QUERY_IMAGE_IDS: list(images),
        S.POSITIVE_IDS: list(positives),
        S.HARD_NEGATIVE_IDS: list(negatives),
        S.CONDITION_KEYS: list(keys),
        S.CLASS: cls,
    }


def test_rows_touching_a_held_out_value_are_dropped_and_counted_per_axis():
    rows = [
        row("clean", ["a"], ["d"], keys=["colour"], cls="mug"),
        row("thai-negative", ["a"], ["d"], ["b"]),  # only its hard negative is Thai: still touched
        row("phone-positive", ["a"], ["c"]),  # a MegaPairs-style row (no class) showing a phone
        row("brand", ["a"], ["d"], keys=["brand"], cls="mug"),
        row("thai-phone", ["b"], ["c"]),
    ]
    axes = {"language": ("th",), "class": ("phone",), "attribute": ("brand",)}
    kept, dropped = heldout.training_rows(rows, axes, PRODUCTS)
    assert [r[S.QUERY_ID] for r in kept] == ["clean"]
    assert dropped == {"language": 2, "class": 2, "attribute": 1}
    kept, dropped = heldout.training_rows(rows, {"attribute": ("brand",)}, PRODUCTS)
    assert len(kept) == 4 and dropped == {"attribute": 1}
    assert heldout.training_rows(rows, {}, PRODUCTS) == (rows, {})


def test_a_query_belongs_to_its_split_and_its_ood_labels():
    labels = {"language": {"q1": "ood_language_th", "q2": "train"}, "class": {"q1": "ood_class_phone"}}
    assert heldout.query_splits("q1", "test", labels) == {"test", "ood_language_th", "ood_class_phone"}
    assert heldout.query_splits("q2", "train", labels) == {"train"}
    assert heldout.query_splits("q3", "test", {}) == {"test"}
