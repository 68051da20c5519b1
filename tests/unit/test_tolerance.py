"""The comparison the tests use for search results computed twice: float noise passes, real differences
(another id, a moved rank, a score off by more than the tolerance) fail."""

from __future__ import annotations

import pytest

from tests.tolerance import assert_same_search, ranking_differences, tie_runs


def answer(hits, **extra):
    return (
        {
            "results": [
                {"rank": i + 1, "id": h, "score": s, "title": h.upper()} for i, (h, s) in enumerate(hits)
            ]
        }
        | {
            "checkpoint": "c",
            "index": "i",
        }
        | extra
    )


def test_float_noise_in_the_7th_digit_passes():
    a = answer([("p1", 0.9444145560264587), ("p2", 0.5)])
    b = answer([("p1", 0.944414496421814), ("p2", 0.50000001)])
    assert_same_search(a, b)


@pytest.mark.parametrize(
    "b",
    [
        answer([("p2", 0.9), ("p1", 0.5)]),  # another order, no tie
        answer([("p1", 0.9), ("p3", 0.5)]),  # another id ... at a score that ties nothing before the cut
        answer([("p1", 0.9001), ("p2", 0.5)]),  # a score off by 1e-4
        answer([("p1", 0.9), ("p2", 0.5)], index="other"),  # another index answered
    ],
)
def test_real_differences_fail(b):
    a = answer([("p1", 0.9), ("p2", 0.5), ("p4", 0.1)])
    b["results"].append({"rank": 3, "id": "p4", "score": 0.1, "title": "P4"})
    with pytest.raises(AssertionError):
        assert_same_search(a, b)


def test_ties_may_trade_places_and_the_last_tie_may_bring_another_member():
    assert tie_runs([0.9, 0.8, 0.8000001, 0.1]) == [range(0, 1), range(1, 3), range(3, 4)]
    assert not ranking_differences(
        ["a", "b", "c", "d"], [0.9, 0.8, 0.8, 0.1], ["a", "c", "b", "d"], [0.9, 0.8, 0.8, 0.1]
    )
    assert not ranking_differences(["a", "b"], [0.9, 0.8], ["a", "z"], [0.9, 0.8])  # z ties b past the cut
    assert ranking_differences(["a", "b", "c"], [0.9, 0.8, 0.8], ["a", "b", "z"], [0.9, 0.1, 0.1])
    assert ranking_differences(["a"], [0.9], ["a", "b"], [0.9, 0.8]) == ["lengths 1/1 vs 2/2"]
