"""The merit stage's export writes its queries as ``{query, pos, neg}`` JSON lines beside MERIT's layout;
read back with the exported candidates' paths they are the same triplets (no Ray)."""

from __future__ import annotations

import json

import pyarrow as pa

from coral import schemas as S
from coral import storage
from coral.catalog import formats
from coral.config import load_config
from coral.stages.base import StageContext
from coral.stages.merit import export


def test_export_then_import_gives_the_same_triplets(tmp_path):
    ids = ["p1", "p2", "p3", "p4", "p5", "a/b"]
    products = [
        {S.ID: i, S.TITLE: f"title {n}", S.SPLIT: "test" if n < 3 else "train", S.IMAGE: b"png"}
        for n, i in enumerate(ids)
    ]
    run = tmp_path / "run"
    storage.write_parquet(
        storage.resolve(str(run / "catalog" / "data" / "part-00000.parquet")),
        pa.Table.from_pylist(products, schema=pa.schema([(S.ID, pa.string()), (S.IMAGE, pa.binary())])),
    )
    base = {S.SOURCE: "merit", S.LANGUAGE: "", S.CLASS: "", S.NUM_CONDITIONS: 1, S.CONDITION_KEYS: []}
    rows = [
        {**base, S.QUERY_ID: "q1", S.SPLIT: "test", S.QUERY_TEXT: f"like {S.IMAGE_SLOT} in red",
         S.QUERY_IMAGE_IDS: ["p1"], S.POSITIVE_IDS: ["p2"], S.HARD_NEGATIVE_IDS: ["p3", "a/b"]},
        {**base, S.QUERY_ID: "q2", S.SPLIT: "train", S.QUERY_TEXT: f"{S.IMAGE_SLOT} and {S.IMAGE_SLOT}",
         S.QUERY_IMAGE_IDS: ["p4", "p5"], S.POSITIVE_IDS: ["p5", "p4"], S.HARD_NEGATIVE_IDS: [],
         S.NUM_CONDITIONS: 2},
        {**base, S.QUERY_ID: "q3", S.SPLIT: "train", S.QUERY_TEXT: f"like {S.IMAGE_SLOT}",
         S.QUERY_IMAGE_IDS: ["p4"], S.POSITIVE_IDS: ["a/b"], S.HARD_NEGATIVE_IDS: []},
    ]  # fmt: skip
    ctx = StageContext(load_config(None, [f"run.run_root={run}"]), storage.resolve(str(run)))
    export(ctx, rows, products)
    out = run / "merit" / "export"
    for split in ("test", "train"):
        lines = formats.read_json(out / f"{split}.jsonl")
        candidates = json.loads((out / f"candidates-{split}.json").read_text())
        by_path = {c["image"]: c["id"] for c in candidates}
        assert lines and all(
            p in by_path for line in lines for p in formats.image_paths("query_pos_neg", line)
        )
        assert all(line["pos"] == [f"title {ids.index(p)}" for p in [by_path[x] for x in line["pos_image"]]]
                   for line in lines)  # fmt: skip
        back = [formats.from_query_pos_neg(line, id_of=by_path.get, split=split) for line in lines]
        want = [r for r in rows if r[S.SPLIT] == split and r[S.QUERY_ID] != "q3"]  # q3 names a/b: left out
        for got, row in zip(back, want, strict=True):
            negatives = [n for n in row[S.HARD_NEGATIVE_IDS] if n != "a/b"]  # an unsafe id: no image
            assert got == {**row, S.SOURCE: "import", S.HARD_NEGATIVE_IDS: negatives}
