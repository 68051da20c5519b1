"""The evaluation's TREC run and qrels files: written per split and model, parsed back, they give the
figures of metrics.json (R@1 and MRR@10 recomputed from the files alone)."""

from __future__ import annotations

import numpy as np
import pytest

from coral import metrics, storage
from coral import schemas as S
from coral.config import load_config
from coral.search import trec
from coral.stages import artifacts
from coral.stages.base import StageContext
from coral.stages.evaluate import score


def figures(run: dict, qrels: dict, by_score: bool = False) -> dict[str, float]:
    """R@1 and MRR@10 of every qrels query from a parsed run: by the file's ranks, or as trec_eval orders
    a query's lines (by score, best first)."""
    ranks = []
    for qid, relevant in qrels.items():
        hits = run.get(qid, [])
        hits = sorted(hits, key=lambda h: -h[2]) if by_score else sorted(hits, key=lambda h: h[1])
        ranks.append(metrics.first_rank([d for d, _, _ in hits], {d for d, r in relevant.items() if r > 0}))
    m = metrics.merit_metrics(ranks)
    return {"R@1": m["R@1"], "MRR@10": m["MRR@10"], "queries": len(ranks)}


def evaluation(n: int = 60, seed: int = 0):
    """Held-out rows, each model's ranked hits and scores, and the OOD labels of a third of the queries."""
    rng = np.random.default_rng(seed)
    pool = [f"p {i}" if i % 9 == 0 else f"p{i}" for i in range(50)]  # some ids with white space
    rows = [
        {
            S.QUERY_ID: f"merit-test-{i:04d}" if i % 11 else f"q {i}%",
            S.SPLIT: "test",
            S.POSITIVE_IDS: [str(p) for p in rng.choice(pool, size=int(rng.integers(1, 4)), replace=False)],
            S.SOURCE: "merit",
            S.NUM_CONDITIONS: 2,
            S.LANGUAGE: "en",
            S.CLASS: "mug",
        }
        for i in range(n)
    ]
    ranked, scores = {}, {}
    for model in ("trained", "baseline"):
        ranked[model] = [[str(p) for p in rng.permutation(pool)[:12]] for _ in rows]
        scores[model] = [sorted(rng.random(12).tolist(), reverse=True) for _ in rows]
    ood = {"class": {r[S.QUERY_ID]: "ood_class_phone" for r in rows[::3]}}
    return rows, ranked, scores, ood


def test_encoding_keeps_a_field_one_token():
    assert trec.encode("p 7") == "p%207" and trec.encode("a%b\tc") == "a%25b%09c"
    assert trec.parse_run("q%201 Q0 p%207 1 0.5 coral-trained\n") == {"q 1": [("p 7", 1, 0.5)]}
    with pytest.raises(ValueError, match="empty id"):
        trec.encode("")
    with pytest.raises(ValueError, match="5 fields"):
        trec.parse_run("q Q0 d 1 0.5\n")


def test_run_files_give_the_evaluations_figures(tmp_path):
    rows, ranked, scores, ood = evaluation()
    cfg = load_config(None, [f"run.run_root={tmp_path}", "evaluate.splits=[test, ood_class_phone]"])
    ctx = StageContext(cfg, storage.resolve(str(tmp_path)))
    ranks = {
        m: [metrics.first_rank(r, set(q[S.POSITIVE_IDS])) for r, q in zip(rr, rows, strict=True)]
        for m, rr in ranked.items()
    }
    result = {"models": {m: score(ranks[m], rows, 50, ood) for m in ranked}}
    (tmp_path / "evaluate" / "trec").mkdir(parents=True)
    (tmp_path / "evaluate" / "trec" / "stale.run").write_text("from an earlier evaluation\n")
    names = artifacts.after_evaluate(ctx, rows, ranked, scores, ood, result)
    folder = tmp_path / "evaluate" / "trec"
    assert (
        sorted(p.name for p in folder.iterdir())
        == sorted(names)
        == [
            "baseline.ood_class_phone.run",
            "baseline.test.run",
            "ood_class_phone.qrels",
            "test.qrels",
            "trained.ood_class_phone.run",
            "trained.test.run",
        ]
    )
    for split in ("test", "ood_class_phone"):
        qrels = trec.parse_qrels((folder / f"{split}.qrels").read_text())
        for model in ranked:
            run = trec.parse_run((folder / f"{model}.{split}.run").read_text())
            want = result["models"][model]
            want = want if split == "test" else want["ood"]["class"][split]
            for by_score in (False, True):
                got = figures(run, qrels, by_score)
                assert got["queries"] == want["queries"]
                assert got["R@1"] == pytest.approx(want["R@1"], abs=1e-9)
                assert got["MRR@10"] == pytest.approx(want["MRR@10"], abs=1e-9)
    lines = (folder / "trained.test.run").read_text().splitlines()
    assert len(lines) == 12 * len(rows) and all(len(line.split()) == 6 for line in lines)
    first = lines[0].split()
    assert first[1] == "Q0" and first[3] == "1" and first[5] == "coral-trained"
    assert float(first[4]) == pytest.approx(scores["trained"][0][0], rel=1e-7)
    test_qrels = trec.parse_qrels((folder / "test.qrels").read_text())
    assert test_qrels == {r[S.QUERY_ID]: dict.fromkeys(r[S.POSITIVE_IDS], 1) for r in rows}
