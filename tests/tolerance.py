"""Comparing search results computed twice: in another batch shape, thread count or process.

A batched matrix product may sum in another order, and another CPU may pick another kernel, so the
same query's scores can differ in the 7th digit. Ids and ranks must then agree exactly, except that
candidates whose scores tie within the tolerance may trade places, and a tie across the top-k cut-off
may bring in another member of the tie.
"""

from __future__ import annotations

import math

REL = 1e-5  # relative tolerance on a score; float32 sums of 64-1024 terms differ by far less
ABS = 1e-6  # for scores near zero


def close(a: float, b: float, rel: float = REL) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=ABS)


def tie_runs(scores: list[float], rel: float = REL) -> list[range]:
    """Positions grouped into runs of consecutive scores that tie within the tolerance."""
    runs, start = [], 0
    for i in range(1, len(scores) + 1):
        if i == len(scores) or not close(scores[i - 1], scores[i], rel):
            runs.append(range(start, i))
            start = i
    return runs


def ranking_differences(
    ids_a: list, scores_a: list[float], ids_b: list, scores_b: list[float], rel: float = REL
) -> list[str]:
    """What differs between two rankings of one query beyond float noise (empty when they agree)."""
    if len(ids_a) != len(ids_b) or len(scores_a) != len(ids_a) or len(scores_b) != len(ids_b):
        return [f"lengths {len(ids_a)}/{len(scores_a)} vs {len(ids_b)}/{len(scores_b)}"]
    out = [
        f"rank {i + 1}: score {x} vs {y}"
        for i, (x, y) in enumerate(zip(scores_a, scores_b, strict=True))
        if not close(x, y, rel)
    ]
    runs = tie_runs(scores_a, rel)
    for run in runs[:-1]:  # the last run may tie with candidates past the cut-off: its ids may differ
        a, b = [ids_a[i] for i in run], [ids_b[i] for i in run]
        if set(a) != set(b):
            out.append(f"ranks {run.start + 1}-{run.stop}: {a} vs {b}")
    return out


def assert_same_search(a: dict, b: dict, rel: float = REL) -> None:
    """Two ``/v1/search`` answers to one query: the same checkpoint, index, ranks and ids (ties aside),
    scores within ``rel``, and the same fields otherwise."""
    assert {k: v for k, v in a.items() if k != "results"} == {k: v for k, v in b.items() if k != "results"}
    ra, rb = a["results"], b["results"]
    assert [h["rank"] for h in ra] == [h["rank"] for h in rb]
    diffs = ranking_differences(
        [h["id"] for h in ra], [h["score"] for h in ra], [h["id"] for h in rb], [h["score"] for h in rb], rel
    )
    assert not diffs, diffs
    by_id = {h["id"]: h for h in rb}
    for h in ra:  # every other field of a hit (title, ...) is the candidate's own
        if h["id"] in by_id:
            assert {k: v for k, v in h.items() if k not in ("rank", "score")} == {
                k: v for k, v in by_id[h["id"]].items() if k not in ("rank", "score")
            }
