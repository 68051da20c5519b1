"""Query composition, cold start, slot validation and OOD splits on hand-made catalogs with known answers.

The catalog: product i of a class has colour i % 4, pattern (i // 4) % 3, size (i // 12) % 2 and material
(i // 24) % 5; products 2k and 2k + 1 form a group that differs in colour only.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from coral import schemas as S
from coral.merit import compose as C
from coral.merit import ood

COLOURS = ("red", "blue", "green", "black")
PATTERNS = ("solid", "striped", "dotted")
SIZES = ("small", "large")
MATERIALS = ("wood", "metal", "plastic", "cotton", "leather")


def catalog(cls: str, n: int, prefix: str, split: str = "train", languages=("en",)) -> list[dict]:
    rows = []
    for i in range(n):
        attrs = {
            "colour": COLOURS[i % 4],
            "pattern": PATTERNS[(i // 4) % 3],
            "size": SIZES[(i // 12) % 2],
            "material": MATERIALS[(i // 24) % 5],
        }
        rows.append(
            {
                "id": f"{prefix}{i:04d}",
                "group_id": f"{prefix}g{i // 2}",
                "class": cls,
                "attributes": attrs,
                "title": f"{cls} number {i}",
                "language": languages[(i // 2) % len(languages)],
                "split": split,
            }
        )
    return rows


POOL = catalog("mug", 120, "m") + catalog("hat", 60, "h")
BY_ID = {p["id"]: p for p in POOL}
# every positive and near miss kept, queries with one positive too (four-condition queries have few)
WIDE = C.ComposeParams(
    num_queries=300, max_rate=0.2, min_positives=1, max_positives=10_000, hard_negatives=10_000
)


def satisfied(product: dict, row: dict) -> int:
    """How many of the row's conditions ``product`` satisfies."""
    return sum(
        product["attributes"].get(k) == BY_ID[q]["attributes"][k]
        for q, k in zip(row[S.QUERY_IMAGE_IDS], row[S.CONDITION_KEYS], strict=True)
    )


def brute_force(row: dict) -> tuple[set[str], set[str]]:
    """(positives, near misses) by a scan of the pool."""
    n = row[S.NUM_CONDITIONS]
    same = [p for p in POOL if p["class"] == row[S.CLASS] and p["id"] not in row[S.QUERY_IMAGE_IDS]]
    return {p["id"] for p in same if satisfied(p, row) == n}, {
        p["id"] for p in same if satisfied(p, row) == n - 1
    }


def test_tally_known_answer():
    ix = C.ProductIndex(POOL)
    pos, near = ix.tally("mug", [("colour", "red"), ("pattern", "striped")])
    assert [ix.ids[i] for i in pos] == [
        f"m{i:04d}" for i in range(4, 120, 12)
    ]  # i % 4 == 0, (i // 4) % 3 == 1
    assert len(near) == 20 + 30  # red and not striped, striped and not red
    pos_hat, _ = ix.tally("hat", [("colour", "red"), ("pattern", "striped")])
    assert [ix.ids[i] for i in pos_hat] == ["h0004", "h0016", "h0028", "h0040", "h0052"]


def test_every_positive_satisfies_every_condition_and_no_other_product_does():
    rows, rejected = C.compose_table(POOL, WIDE, seed=3)
    assert len(rows) > 100
    assert {r[S.NUM_CONDITIONS] for r in rows} == {2, 3, 4}
    assert len(rows) + len({r[S.ID].split(".")[0] for r in rejected}) == WIDE.num_queries
    for row in rows:
        positives, near = brute_force(row)
        assert set(row[S.POSITIVE_IDS]) == positives, row
        assert set(row[S.HARD_NEGATIVE_IDS]) == near, row
        class_size = sum(p["class"] == row[S.CLASS] for p in POOL)
        assert 0 < len(positives) / class_size < WIDE.max_rate
        assert {BY_ID[q]["class"] for q in row[S.QUERY_IMAGE_IDS]} == {row[S.CLASS]}
        assert len(set(row[S.QUERY_IMAGE_IDS])) == len(set(row[S.CONDITION_KEYS])) == row[S.NUM_CONDITIONS]
        assert row[S.QUERY_TEXT] == C.query_text(
            C.class_word(row[S.CLASS]),
            [
                (k, BY_ID[q]["title"])
                for q, k in zip(row[S.QUERY_IMAGE_IDS], row[S.CONDITION_KEYS], strict=True)
            ],
        )
        assert C.rule_filter(row) is None


def test_default_bounds_schema_and_reasons():
    params = C.ComposeParams(num_queries=200)
    rows, rejected = C.compose_table(POOL, params, seed=0)
    assert rows and rejected
    for row in rows:
        positives, near = brute_force(row)
        class_size = sum(p["class"] == row[S.CLASS] for p in POOL)
        assert 0 < len(positives) / class_size < 0.05
        assert 1 <= len(row[S.POSITIVE_IDS]) <= 3 and set(row[S.POSITIVE_IDS]) <= positives
        assert len(row[S.HARD_NEGATIVE_IDS]) <= 5 and set(row[S.HARD_NEGATIVE_IDS]) <= near
        assert row[S.SOURCE] == "merit" and row[S.SPLIT] == "train" and row[S.LANGUAGE] == "en"
    table = pa.Table.from_pylist(rows, schema=S.TRIPLETS)
    assert table.num_rows == len(rows) and set(rows[0]) == set(S.TRIPLETS.names)
    assert pa.Table.from_pylist(rejected, schema=S.REJECTED).num_rows == len(rejected)
    assert any("positive rate" in r[S.REASON] for r in rejected)


def test_seeded_and_identical_however_sharded_or_ordered():
    whole, whole_rej = C.compose_table(POOL, WIDE, seed=5, indices=range(120))
    a, a_rej = C.compose_table(POOL, WIDE, seed=5, indices=range(0, 70))
    b, b_rej = C.compose_table(list(reversed(POOL)), WIDE, seed=5, indices=range(70, 120))
    assert a + b == whole and a_rej + b_rej == whole_rej
    other, _ = C.compose_table(POOL, WIDE, seed=6, indices=range(120))
    assert other != whole
    ix = C.ProductIndex(POOL)
    assert C.compose_table(ix, WIDE, seed=5, indices=range(120))[0] == whole  # a prebuilt index too


def test_plan_follows_the_weights():
    params = C.ComposeParams()
    plans = [C.draw_plan(np.random.default_rng([7, i]), params) for i in range(5000)]
    counts = np.array([n for _, n in plans])
    for n, w in zip((2, 3, 4), (0.55, 0.20, 0.25), strict=True):
        assert abs((counts == n).mean() - w) < 0.03
    methods = np.array([m for m, _ in plans])
    for m, w in zip(C.METHODS, (0.3, 0.2, 0.5), strict=True):
        assert abs((methods == m).mean() - w) < 0.03


def test_group_first_keeps_the_other_variant_first():
    params = C.ComposeParams(num_queries=60, method_weights=(0, 0, 1), max_rate=0.2)
    rows, _ = C.compose_table(POOL, params, seed=1)
    assert len(rows) > 20
    for row in rows:
        a, b = BY_ID[row[S.QUERY_IMAGE_IDS][0]], BY_ID[row[S.POSITIVE_IDS][0]]
        assert a["group_id"] == b["group_id"] and a["id"] != b["id"]
        diff = [k for k in a["attributes"] if a["attributes"][k] != b["attributes"][k]]
        assert diff == ["colour"] == row[S.CONDITION_KEYS][1:2]
        assert BY_ID[row[S.QUERY_IMAGE_IDS][1]]["group_id"] != a["group_id"]


def test_similarity_picks_the_most_similar_positives():
    calls = []

    def similarity(query_ids, candidate_ids):
        calls.append(list(query_ids))
        return [-int(c[1:]) for c in candidate_ids]  # smaller numbers are more similar

    params = C.ComposeParams(num_queries=40, method_weights=(1, 0, 0), max_rate=0.2, max_positives=2)
    rows, _ = C.compose_table(POOL, params, seed=2, similarity=similarity)
    assert rows and calls
    for row in rows:
        positives, _ = brute_force(row)
        assert row[S.POSITIVE_IDS] == sorted(positives)[:2]
    assert all(r[S.QUERY_IMAGE_IDS] in calls for r in rows)  # scored against each kept query's products


def two_condition_pool(matches: int) -> list[dict]:
    """60 mugs: q1 (red, solid), q2 (blue, striped), ``matches`` red striped ones, the rest blue solid."""

    def mug(pid, colour, pattern):
        attrs = {"colour": colour, "pattern": pattern}
        return {
            "id": pid,
            "group_id": pid,
            "class": "mug",
            "attributes": attrs,
            "title": pid,
            "split": "train",
        }

    rows = [mug("q1", "red", "solid"), mug("q2", "blue", "striped")]
    rows += [mug(f"r{i}", "red", "striped") for i in range(matches)]
    return rows + [mug(f"f{i:02d}", "blue", "solid") for i in range(60 - len(rows))]


def test_min_positives_rejects_one_positive_and_keeps_two():
    constraints = [("colour", "red"), ("pattern", "striped")]
    assert C.ComposeParams().min_positives == 2  # MERIT's bound is the default
    for matches, want in [(1, "1 positives < min_positives 2"), (2, None)]:
        ix = C.ProductIndex(two_condition_pool(matches))
        query = [ix.position["q1"], ix.position["q2"]]
        found = C.select(ix, np.random.default_rng(0), "mug", constraints, query, None, C.ComposeParams())
        if want is None:
            kept, _ = found
            assert sorted(ix.ids[p] for p in kept) == ["r0", "r1"]
        else:
            assert found == want
    # with a bound of 1 the single positive is kept
    ix = C.ProductIndex(two_condition_pool(1))
    query = [ix.position["q1"], ix.position["q2"]]
    one = C.ComposeParams(min_positives=1)
    kept, _ = C.select(ix, np.random.default_rng(0), "mug", constraints, query, None, one)
    assert [ix.ids[p] for p in kept] == ["r0"]
    with pytest.raises(ValueError, match="max_positives 1 < min_positives 2"):
        C.ComposeParams(max_positives=1)


def test_min_positives_drops_exactly_the_queries_with_one_positive():
    """Same seed, bound 1 vs 2: the draws are the same, the bound only drops rows (with the reason)."""
    loose, _ = C.compose_table(POOL, C.ComposeParams(num_queries=200, max_rate=0.2, min_positives=1), seed=9)
    strict, rejected = C.compose_table(POOL, C.ComposeParams(num_queries=200, max_rate=0.2), seed=9)
    single = [r for r in loose if len(brute_force(r)[0]) == 1]
    assert single and strict
    assert strict == [r for r in loose if len(brute_force(r)[0]) >= 2]
    reasons = {r[S.ID]: r[S.REASON] for r in rejected}
    for r in single:
        assert reasons[r[S.QUERY_ID]].endswith(": 1 positives < min_positives 2")
    assert all(len(r[S.POSITIVE_IDS]) >= 2 for r in strict)


def test_similarity_puts_a_preferred_positive_first():
    params = C.ComposeParams(num_queries=80, method_weights=(1, 0, 0), max_rate=0.2)
    plain, _ = C.compose_table(POOL, params, seed=4)
    favourite = {tuple(r[S.QUERY_IMAGE_IDS]): max(brute_force(r)[0]) for r in plain}  # the last id

    def similarity(query_ids, candidate_ids):
        return [1.0 if c == favourite[tuple(query_ids)] else 0.0 for c in candidate_ids]

    ranked, _ = C.compose_table(POOL, params, seed=4, similarity=similarity)
    assert [r[S.QUERY_IMAGE_IDS] for r in ranked] == [r[S.QUERY_IMAGE_IDS] for r in plain]  # same draws
    assert sum(r[S.POSITIVE_IDS][0] != favourite[tuple(r[S.QUERY_IMAGE_IDS])] for r in plain) > 5
    for r in ranked:
        assert r[S.POSITIVE_IDS][0] == favourite[tuple(r[S.QUERY_IMAGE_IDS])]
        # the rest tie at 0: in id order
        assert r[S.POSITIVE_IDS][1:] == sorted(brute_force(r)[0] - {r[S.POSITIVE_IDS][0]})[:2]


def mean_cosine(vectors: dict[str, np.ndarray], query: list[str], candidates) -> np.ndarray:
    unit = {k: v / np.linalg.norm(v) for k, v in vectors.items()}
    centre = np.mean([unit[q] for q in query], axis=0)
    return np.array([float(unit[c] @ centre) for c in candidates])


def test_embedding_similarity_ranks_positives_and_hard_negatives():
    rng = np.random.default_rng(0)
    vectors = {p["id"]: rng.normal(size=8).astype(np.float32) for p in POOL}
    ids = sorted(vectors)
    similarity = C.embedding_similarity(ids, np.stack([vectors[i] for i in ids]))
    params = C.ComposeParams(num_queries=120, method_weights=(1, 1, 0), max_rate=0.2, hard_negatives=4)
    rows, _ = C.compose_table(POOL, params, seed=11, similarity=similarity)
    assert len(rows) > 10
    for r in rows:
        query = r[S.QUERY_IMAGE_IDS]
        positives, near = brute_force(r)
        kept = mean_cosine(vectors, query, r[S.POSITIVE_IDS])
        best = np.sort(mean_cosine(vectors, query, positives))[::-1][: len(kept)]
        np.testing.assert_allclose(kept, best, atol=1e-6)  # the most similar, most similar first
        groups = {BY_ID[q]["group_id"] for q in query}
        siblings = [n for n in near if BY_ID[n]["group_id"] in groups]
        others = [n for n in near if BY_ID[n]["group_id"] not in groups]
        want = np.concatenate(
            [-np.sort(-mean_cosine(vectors, query, tier)) for tier in (siblings, others) if tier]
        )[: params.hard_negatives]
        np.testing.assert_allclose(mean_cosine(vectors, query, r[S.HARD_NEGATIVE_IDS]), want, atol=1e-6)
    assert any(len(r[S.HARD_NEGATIVE_IDS]) == params.hard_negatives for r in rows)


def test_embedding_similarity_known_values():
    sim = C.embedding_similarity(["a", "b", "c"], np.array([[1, 0], [0, 2], [1, 1]], np.float32))
    got = sim(["a", "b"], ["c", "d", "a"])
    np.testing.assert_allclose(got[[0, 2]], [np.sqrt(0.5), 0.5], atol=1e-6)
    assert got[1] == -np.inf  # no vector: ranked last
    np.testing.assert_allclose(sim(["a", "missing"], ["b", "c"]), [0.0, np.sqrt(0.5)], atol=1e-6)
    assert list(sim(["missing"], ["a", "b"])) == [0.0, 0.0]
    with pytest.raises(ValueError, match="one vector per id"):
        C.embedding_similarity(["a"], np.zeros((2, 3)))


def test_text_forms():
    assert C.query_text("mug", [("colour", "A"), ("pattern", "B"), ("size", "C")]) == (
        "Find a product of mug that have the same colour with <Product 1> <image>\nA </Product 1> "
        "and the same pattern with <Product 2> <image>\nB </Product 2> "
        "and the same size with <Product 3> <image>\nC </Product 3>"
    )
    assert C.cold_query_text("mug", "A", "colour", "red") == (
        "Find a product of mug that have the same product style with <Product 1> <image>\nA </Product 1> "
        "but with colour red"
    )
    assert C.class_word("tshirt") == "t-shirt" and C.class_word("coffee_table") == "coffee table"
    assert (
        C.attribute_word("background") == "background" and C.attribute_word("closure_type") == "closure type"
    )


def test_cold_start_from_near_duplicate_pairs():
    mugs = catalog("mug", 120, "m")
    pairs = C.near_duplicate_pairs(mugs)
    assert len(pairs) == 120 and pairs[:2] == [("m0000", "m0001", "colour"), ("m0001", "m0000", "colour")]
    rows, rejected = C.cold_start_queries(mugs, seed=0)  # min_positives (2 by default) does not apply
    assert len(rows) == 120 and not rejected
    row = rows[0]
    assert row[S.QUERY_ID] == "merit_cold-00000000" and row[S.SOURCE] == "merit_cold"
    assert row[S.QUERY_IMAGE_IDS] == ["m0000"] and row[S.POSITIVE_IDS] == ["m0001"]  # each block is unique
    assert row[S.QUERY_TEXT] == C.cold_query_text("mug", "mug number 0", "colour", "blue")
    assert row[S.NUM_CONDITIONS] == 1 and row[S.CONDITION_KEYS] == ["colour"]
    a, b = BY_ID["m0000"]["attributes"], BY_ID["m0001"]["attributes"]
    for neg in row[S.HARD_NEGATIVE_IDS]:
        attrs = BY_ID[neg]["attributes"]
        hits = sum(attrs[k] == (b if k == "colour" else a)[k] for k in a)
        assert hits == len(a) - 1
    assert C.cold_start_queries(mugs, seed=0, indices=[5, 6])[0] == rows[5:7]


@pytest.mark.parametrize(
    "rewritten, reason",
    [
        (
            "Looking for a mug like <Product 1> <image>\nA </Product 1> in the pattern of <Product 2> <image>\nB "
            "</Product 2>, glossy.",
            None,
        ),
        (
            "A mug like <Product 1> <image>\nA </Product 1> and <Product 2> B </Product 2>",
            "image slots: 2 in the original, 1 in the rewrite",
        ),
        (
            "A mug like <Product 1> <image>\nA and <Product 2> <image>\nB </Product 2>",
            "product tags changed: missing ['</Product 1>'], unexpected []",
        ),
        (
            "A mug like <Product 1> <image>\nA </Product 1> and <Product 3> <image>\nB </Product 3>",
            "product tags changed: missing ['<Product 2>', '</Product 2>'], unexpected ['<Product 3>', '</Product 3>']",
        ),
        (
            "<Product 2> <image>\nB </Product 2> then <Product 1> <image>\nA </Product 1>",
            "product tags or image slots reordered",
        ),
        ("", "image slots: 2 in the original, 0 in the rewrite"),
    ],
)
def test_validate_slots(rewritten, reason):
    original = C.query_text("mug", [("colour", "A"), ("pattern", "B")])
    assert C.validate_slots(original, original) is None
    assert C.validate_slots(original, rewritten) == reason


def test_rule_filter_drops_a_positive_that_is_a_query_product():
    rows, _ = C.compose_table(POOL, WIDE, seed=3, indices=range(20))
    row = rows[0]
    assert C.rule_filter(row) is None
    assert (
        C.rule_filter({**row, S.POSITIVE_IDS: [row[S.QUERY_IMAGE_IDS][1]]})
        == "a positive is one of the query products"
    )
    assert C.rule_filter({**row, S.POSITIVE_IDS: []}) == "no positives"
    bad = {**row, S.QUERY_ID: "bad", S.POSITIVE_IDS: row[S.QUERY_IMAGE_IDS][:1]}
    assert C.apply_rule_filter([row, bad]) == (
        [row],
        [{"id": "bad", "reason": "a positive is one of the query products"}],
    )
    assert (
        C.rule_filter({**row, S.QUERY_IMAGE_IDS: row[S.QUERY_IMAGE_IDS][:1]})
        == "image slots do not match the query images"
    )


def test_pool_of_mixed_splits_is_refused():
    with pytest.raises(ValueError, match="one split at a time"):
        C.ProductIndex(catalog("mug", 4, "a") + catalog("mug", 4, "b", split="test"))


# --- out-of-distribution splits -------------------------------------------------------------------------


def row(qid, split, query, positives, negatives=(), cls="mug", keys=("colour", "pattern")) -> dict:
    return {
        S.QUERY_ID: qid,
        S.SPLIT: split,
        S.QUERY_IMAGE_IDS: list(query),
        S.POSITIVE_IDS: list(positives),
        S.HARD_NEGATIVE_IDS: list(negatives),
        S.CLASS: cls,
        S.CONDITION_KEYS: list(keys),
    }


LANG = {
    "en1": "en",
    "en2": "en",
    "vi1": "vi",
    "th1": "th",
    "th2": "th",
    "th3": "th",
    "ms1": "ms",
    "ms2": "ms",
}
HAND = [
    row("t1", "train", ["en1", "vi1"], ["en2"], keys=("colour", "size")),
    row("t2", "train", ["en1", "en2"], ["vi1"], ["th1"], cls="phone"),  # a Thai hard negative
    row("t3", "train", ["ms1", "en1"], ["en2"], keys=("brand", "size")),
    row("e1", "test", ["th1", "th2"], ["th3"], ["en1"], keys=("size", "material")),  # negatives are not shown
    row("e2", "test", ["ms1", "ms2"], ["ms1"], cls="table", keys=("pattern", "brand")),
    row("e3", "test", ["th1", "en1"], ["th2"], keys=("brand", "colour")),
    row("e4", "test", ["en1", "en2"], ["en2"], cls="phone"),
    row("x1", "ood_language_th", ["th1", "th2"], ["th3"]),
]


def test_ood_known_answers():
    assert ood.language_ood(HAND, LANG) == [
        "train",
        None,
        None,
        "ood_language_th",
        "ood_language_ms",
        None,
        None,
        None,
    ]
    assert ood.attribute_ood(HAND) == [
        "train",
        None,
        None,
        None,
        "ood_attribute_brand",
        "ood_attribute_brand",
        "ood_attribute_pattern",
        None,
    ]
    assert ood.class_ood(HAND) == [
        "train",
        None,
        "train",
        None,
        "ood_class_table",
        None,
        "ood_class_phone",
        None,
    ]
    kept = ood.apply_labels(HAND, ood.class_ood(HAND))
    assert [(r[S.QUERY_ID], r[S.SPLIT]) for r in kept] == [
        ("t1", "train"),
        ("t3", "train"),
        ("e2", "ood_class_table"),
        ("e4", "ood_class_phone"),
    ]


def test_ood_test_sets_are_disjoint_from_training_on_composed_queries():
    # mugs are en/vi, hats Thai; the test pool has its own products
    train = catalog("mug", 120, "m", languages=("en", "vi")) + catalog("hat", 96, "h", languages=("th",))
    test = catalog("mug", 120, "M", "test", ("en", "vi")) + catalog("hat", 96, "H", "test", ("th",))
    params = C.ComposeParams(num_queries=150, max_rate=0.2)
    rows = C.compose_table(train, params, seed=0)[0] + C.compose_table(test, params, seed=0)[0]
    languages = {p["id"]: p["language"] for p in train + test}

    def touched(r):
        return set(r[S.QUERY_IMAGE_IDS]) | set(r[S.POSITIVE_IDS]) | set(r[S.HARD_NEGATIVE_IDS])

    for labels, held_out in [
        (ood.language_ood(rows, languages), {"th", "ms", "id"}),
        (ood.class_ood(rows, held_out=("hat",)), {"hat"}),
        (ood.attribute_ood(rows, held_out=("material", "pattern")), {"material", "pattern"}),
    ]:
        split = ood.apply_labels(rows, labels)
        trained = [r for r in split if r[S.SPLIT] == "train"]
        tested = [r for r in split if r[S.SPLIT].startswith("ood_")]
        assert trained and tested
        seen = set().union(*(touched(r) for r in trained))
        for r in tested:
            assert not touched(r) & seen
            value = r[S.SPLIT].rsplit("_", 1)[1]
            assert value in held_out
            if r[S.SPLIT].startswith("ood_language_"):
                assert {languages[p] for p in r[S.QUERY_IMAGE_IDS] + r[S.POSITIVE_IDS]} == {value}
            if r[S.SPLIT].startswith("ood_class_"):
                assert r[S.CLASS] == value
            if r[S.SPLIT].startswith("ood_attribute_"):
                assert value in r[S.CONDITION_KEYS]
        for r in trained:
            assert not {languages[p] for p in touched(r)} & held_out
            assert r[S.CLASS] not in held_out and not set(r[S.CONDITION_KEYS]) & held_out
