"""TREC run and qrels files of an evaluation, for ``trec_eval`` and the tools that read its formats.

- run (``{model}.{split}.run``): one line per retrieved candidate, ``qid Q0 docid rank score run_tag``,
  best first; ``rank`` 1-based, ``score`` the index's similarity (inner product of L2-normalised
  embeddings; 9 significant digits, a float32 exactly), ``run_tag`` ``coral-{model}``. A query searched as deep as the evaluation searched it
  (``evaluate.top_k``, deeper for Recall@K / mAP@k); a query with no hit has no line.
- qrels (``{split}.qrels``): ``qid 0 docid 1`` for every positive of every query of the split.

Ids are written as they are, but for white space and ``%``, which are percent-encoded (``%20``, ``%25``):
both formats split a line on white space. ``parse_run`` and ``parse_qrels`` read them back, decoded.
trec_eval orders a query's lines by score (ties by docid), not by ``rank``: with tied scores its order
may differ from the evaluation's, which keeps the index's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from urllib.parse import unquote

from coral import storage

_UNSAFE = re.compile(r"[\s%]")


def encode(name: str) -> str:
    """An id as one white-space-free field (``%`` and white space percent-encoded)."""
    if not name:
        raise ValueError("an empty id cannot be written to a TREC file")
    return _UNSAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), name)


def run_text(
    query_ids: Sequence[str], ranked: Sequence[Sequence[str]], scores: Sequence[Sequence[float]], tag: str
) -> str:
    lines = []
    for qid, docs, sims in zip(query_ids, ranked, scores, strict=True):
        q = encode(qid)
        lines += [
            f"{q} Q0 {encode(d)} {n} {s:.9g} {tag}"
            for n, (d, s) in enumerate(zip(docs, sims, strict=True), 1)
        ]
    return "".join(line + "\n" for line in lines)


def qrels_text(query_ids: Sequence[str], positives: Sequence[Sequence[str]]) -> str:
    lines = [
        f"{encode(q)} 0 {encode(p)} 1"
        for q, pos in zip(query_ids, positives, strict=True)
        for p in dict.fromkeys(pos)
    ]
    return "".join(line + "\n" for line in lines)


def parse_run(text: str) -> dict[str, list[tuple[str, int, float]]]:
    """qid -> [(docid, rank, score)], in the file's order."""
    out: dict[str, list[tuple[str, int, float]]] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 6:
            raise ValueError(f"run line {n}: {len(fields)} fields, not 6 (qid Q0 docid rank score tag)")
        qid, _, doc, rank, score, _ = fields
        out.setdefault(unquote(qid), []).append((unquote(doc), int(rank), float(score)))
    return out


def parse_qrels(text: str) -> dict[str, dict[str, int]]:
    """qid -> {docid: relevance}."""
    out: dict[str, dict[str, int]] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 4:
            raise ValueError(f"qrels line {n}: {len(fields)} fields, not 4 (qid iter docid relevance)")
        out.setdefault(unquote(fields[0]), {})[unquote(fields[2])] = int(fields[3])
    return out


def write(
    out: storage.Location,
    query_ids: Sequence[str],
    positives: Sequence[Sequence[str]],
    splits: Mapping[str, Sequence[int]],
    ranked: Mapping[str, Sequence[Sequence[str]]],
    scores: Mapping[str, Sequence[Sequence[float]]],
) -> list[str]:
    """Per split (its queries' positions in ``query_ids``) a qrels file and, per model of ``ranked``, a
    run file, under ``out``; returns the files' names."""
    names = []
    for split, members in splits.items():
        ids = [query_ids[i] for i in members]
        storage.write_bytes(
            out.child(f"{split}.qrels"), qrels_text(ids, [positives[i] for i in members]).encode()
        )
        names.append(f"{split}.qrels")
        for model, lists in ranked.items():
            text = run_text(
                ids, [lists[i] for i in members], [scores[model][i] for i in members], f"coral-{model}"
            )
            storage.write_bytes(out.child(f"{model}.{split}.run"), text.encode())
            names.append(f"{model}.{split}.run")
    return names
