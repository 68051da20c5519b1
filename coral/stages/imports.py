"""import_triplets: training triplets read from a released dataset's files (MERIT or MegaPairs formats),
so the training stage can train on them like on the graph's own.

Every item becomes TRIPLETS rows (MegaPairs: one per instruction); an item that cannot be read is
rejected with its position and the reason, and the rest go on. MERIT's queries name images by path and
positives by product id: with ``imports.candidates`` the paths are mapped to product ids and the
candidates (id, title, image path) are written to ``candidates/``. Image paths are kept as written;
``details.image_root`` is the folder they are relative to. Items get ``imports.split``, or with
``imports.test_fraction`` > 0 ``test`` for that fraction of them (a seeded hash of the query id), so
evaluate has held-out queries.

Units: ``rows_in`` counts items read, ``rows_out`` items imported, ``rows_rejected`` items rejected;
``details.triplets`` counts the rows written.
"""

from __future__ import annotations

import posixpath
from collections import Counter

import pyarrow as pa

from coral import schemas as S
from coral import storage
from coral.catalog.products import hashed_split
from coral.config import Config, ImportConfig
from coral.errors import ConfigError
from coral.manifest import StageResult
from coral.merit import compose, formats
from coral.stages.base import StageContext, write_rejected

CANDIDATES = pa.schema([(S.ID, pa.string()), (S.TITLE, pa.string()), (S.IMAGE, pa.string())])


def read_items(uri: str, config: Config, what: str) -> list:
    return storage.read_json_items(storage.resolve(uri, config.storage), f"imports.{what}")


def to_rows(cfg: ImportConfig, item: dict, position: int, id_of) -> list[dict]:
    if cfg.format == "merit":
        rows = [formats.from_merit_query(item, id_of, cfg.split)]
    elif cfg.format == "released":
        rows = [formats.from_released_query(item, position, cfg.split)]
    else:
        rows = formats.from_megapairs(item, f"megapairs-{position:09d}", id_of, cfg.split)
    if cfg.test_fraction > 0 and rows:  # one split per item (MegaPairs: its rows), by its first query id
        split = hashed_split(cfg.seed, rows[0][S.QUERY_ID], cfg.test_fraction, cfg.split)
        rows = [{**r, S.SPLIT: split} for r in rows]
    return rows


class ImportStage:
    name = "import_triplets"

    def inputs(self, config: Config) -> tuple[str, ...]:
        return ()

    def section(self, config: Config) -> ImportConfig:
        return config.imports

    def validate(self, config: Config) -> None:
        if not config.imports.queries:
            raise ConfigError("imports.queries: the file to import is not set")

    def run(self, ctx: StageContext) -> StageResult:
        cfg = ctx.config.imports
        items = read_items(cfg.queries, ctx.config, "queries")
        id_of = str
        candidates = []
        if cfg.candidates:
            for n, obj in enumerate(read_items(cfg.candidates, ctx.config, "candidates"), 1):
                try:
                    candidates.append(formats.from_merit_candidate(obj))
                except (KeyError, IndexError, TypeError, ValueError) as e:
                    raise ConfigError(f"imports.candidates: item {n} of {cfg.candidates}: {e!r}") from None
            by_path = {c[S.IMAGE]: c[S.ID] for c in candidates}
            id_of = lambda path: by_path.get(path, path)  # noqa: E731
        rows, rejected = [], []
        for n, item in enumerate(items):
            try:
                got = to_rows(cfg, item, n, id_of)
            except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
                rejected.append({S.ID: f"item {n}", S.REASON: f"unreadable: {type(e).__name__}: {e}"})
                continue
            reasons = [compose.rule_filter(r) for r in got]
            if any(reasons):
                rejected.append({S.ID: f"item {n}", S.REASON: next(r for r in reasons if r)})
                continue
            rows += got
        ids = [r[S.QUERY_ID] for r in rows]
        if len(set(ids)) != len(ids):
            raise ConfigError(f"imports.queries: {cfg.queries} repeats query ids")
        stage = ctx.stage_dir(self.name)
        storage.write_parquet(
            ctx.data(self.name).child("part-00000.parquet"), pa.Table.from_pylist(rows, schema=S.TRIPLETS)
        )
        if candidates:
            storage.write_parquet(
                stage.child("candidates", "part-00000.parquet"),
                pa.Table.from_pylist(candidates, schema=CANDIDATES),
            )
        write_rejected(ctx.rejected(self.name), rejected)
        reasons = dict(Counter(r[S.REASON] for r in rejected))
        root = storage.resolve(cfg.queries, ctx.config.storage).uri
        details = {
            "triplets": len(rows),
            "candidates": len(candidates),
            "image_root": posixpath.dirname(root),
        }
        return StageResult(len(items), len(items) - len(rejected), reasons, details=details)
