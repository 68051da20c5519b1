"""import_triplets: training triplets read from a released dataset's files (MERIT's or MegaPairs' formats,
or ``{query, pos, neg}`` JSON lines), so the training stage can train on them like on the graph's own.

Every item becomes TRIPLETS rows (MegaPairs: one per instruction); an item that cannot be read is
rejected with its position and the reason, and the rest go on. MERIT's queries name images by path and
positives by product id, ``{query, pos, neg}`` lines every image and candidate by path: with
``imports.candidates`` the paths are mapped to product ids and the candidates (id, title, image path) are
written to ``candidates/``. Image paths are kept as written; ``details.image_root`` is the folder they
are relative to. Every image path an item names must resolve under its file's folder or
``imports.allowed_image_roots`` (``coral.paths.confine``); an item naming any other is rejected with the
reason, and a candidate naming one is left out (``candidates_rejected/``, counted in
``details.candidates_rejected``).

Held out (MERIT's protocol): ``imports.test_queries`` (MERIT's ``queries-test.json``) gives the
``test`` rows, ``imports.queries`` the training ones (``imports.split``), in one run; with
``test_candidates`` beside ``candidates`` both map image paths to ids. Without a test file,
``imports.test_fraction`` > 0 sends that fraction of the items to ``test`` (a seeded hash of the query
id). When the run has a catalog stage every item is checked against it and rejected, with its position,
when it names a product the catalog lacks, when a training item names a held-out (``test``) product,
or when a held-out item's positive is not a held-out product.

Units: ``rows_in`` counts items read, ``rows_out`` items imported, ``rows_rejected`` items rejected;
``details.triplets`` counts the rows written.
"""

from __future__ import annotations

import posixpath
from collections import Counter
from dataclasses import replace

import pyarrow as pa

from coral import schemas as S
from coral import storage
from coral.catalog import formats, lookup
from coral.catalog.products import hashed_split
from coral.config import Config, ImportConfig, Resources
from coral.errors import ConfigError
from coral.manifest import StageResult
from coral.merit import compose
from coral.paths import PathError, confine
from coral.stages.base import StageContext

CANDIDATES = pa.schema([(S.ID, pa.string()), (S.TITLE, pa.string()), (S.IMAGE, pa.string())])


def read_items(uri: str, config: Config, what: str) -> list:
    return storage.read_json_items(storage.resolve(uri, config.storage), f"imports.{what}")


def folder(uri: str, config: Config) -> str:
    """The folder of a file: what the image paths it writes are relative to."""
    return posixpath.dirname(storage.resolve(uri, config.storage).uri)


def path_reason(fmt: str, item: dict, root: str, allowed: tuple[str, ...]) -> str | None:
    """Why an item's image paths cannot be used (the first that leaves ``root`` and ``allowed``), or None."""
    for path in formats.image_paths(fmt, item):
        try:
            confine(path, root, allowed)
        except PathError as e:
            return f"image path: {e}: [{path!r}]"
    return None


def to_rows(cfg: ImportConfig, item: dict, position: int, id_of, prefix: str = "") -> list[dict]:
    """An item's rows; an item without an id of its own is named by ``prefix`` and its position."""
    if cfg.format == "merit":
        rows = [formats.from_merit_query(item, id_of, cfg.split)]
    elif cfg.format == "released":
        rows = [formats.from_released_query(item, f"{prefix}{position}" if prefix else position, cfg.split)]
    elif cfg.format == "query_pos_neg":
        rows = [formats.from_query_pos_neg(item, f"qpn-{prefix}{position:09d}", id_of, cfg.split)]
    else:
        rows = formats.from_megapairs(item, f"megapairs-{prefix}{position:09d}", id_of, cfg.split)
    if cfg.test_fraction > 0 and rows:  # one split per item (MegaPairs: its rows), by its first query id
        split = hashed_split(cfg.seed, rows[0][S.QUERY_ID], cfg.test_fraction, cfg.split)
        rows = [{**r, S.SPLIT: split} for r in rows]
    return rows


class ImportStage:
    name = "import_triplets"

    def inputs(self, config: Config) -> tuple[str, ...]:
        # with a catalog in the run, every id an item names is checked against it
        return ("catalog",) if "catalog" in config.run.stages else ()

    def section(self, config: Config) -> ImportConfig:
        return config.imports

    def output(self, config: Config) -> pa.Schema:
        return S.TRIPLETS

    def resources(self, config: Config) -> dict[str, Resources]:
        return {}  # reads and checks files in the driver

    def validate(self, config: Config) -> None:
        if not config.imports.queries:
            raise ConfigError("imports.queries: the file to import is not set")
        if config.imports.test_queries and config.imports.test_fraction > 0:
            raise ConfigError(
                "imports.test_fraction: the held-out queries come from imports.test_queries; set one, not both"
            )

    def run(self, ctx: StageContext) -> StageResult:
        cfg = ctx.config.imports
        candidates, outside = [], []
        for key in ("candidates", "test_candidates"):
            uri = getattr(cfg, key)
            root = folder(uri, ctx.config) if uri else ""
            for n, obj in enumerate(read_items(uri, ctx.config, key) if uri else [], 1):
                try:
                    candidate = formats.from_merit_candidate(obj)
                except (KeyError, IndexError, TypeError, ValueError) as e:
                    raise ConfigError(f"imports.{key}: item {n} of {uri}: {e!r}") from None
                reason = path_reason("candidate", obj, root, cfg.allowed_image_roots)
                if reason:
                    outside.append({S.ID: candidate[S.ID], S.REASON: reason})
                else:
                    candidates.append(candidate)
        by_path = {c[S.IMAGE]: c[S.ID] for c in candidates}
        id_of = (lambda path: by_path.get(path, path)) if candidates else str  # noqa: E731
        catalog = catalog_splits(ctx) if "catalog" in self.inputs(ctx.config) else None
        files = [("queries", cfg.queries, cfg.split, "item", "")]
        if cfg.test_queries:
            files.append(("test_queries", cfg.test_queries, "test", "test item", "test-"))
        rows, rejected, read = [], [], 0
        for key, uri, split, label, prefix in files:
            items, root = read_items(uri, ctx.config, key), folder(uri, ctx.config)
            read += len(items)
            for n, item in enumerate(items):
                try:
                    got = to_rows(replace(cfg, split=split), item, n, id_of, prefix)
                except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
                    rejected.append({S.ID: f"{label} {n}", S.REASON: f"unreadable: {type(e).__name__}: {e}"})
                    continue
                reason = path_reason(cfg.format, item, root, cfg.allowed_image_roots)
                if reason:
                    rejected.append({S.ID: f"{label} {n}", S.REASON: reason})
                    continue
                reasons = [compose.rule_filter(r) or held_out_reason(r, catalog) for r in got]
                if any(reasons):
                    rejected.append({S.ID: f"{label} {n}", S.REASON: next(r for r in reasons if r)})
                    continue
                rows += got
        ids = [r[S.QUERY_ID] for r in rows]
        if len(set(ids)) != len(ids):
            repeated = sorted({i for i in ids if ids.count(i) > 1})[:3]
            raise ConfigError(
                f"imports: query ids repeat across {cfg.queries} and its test file, e.g. {repeated}"
            )
        stage = ctx.stage_dir(self.name)
        storage.write_parquet(
            ctx.data(self.name).child("part-00000.parquet"), pa.Table.from_pylist(rows, schema=S.TRIPLETS)
        )
        if candidates:
            storage.write_parquet(
                stage.child("candidates", "part-00000.parquet"),
                pa.Table.from_pylist(candidates, schema=CANDIDATES),
            )
        storage.write_rejected(ctx.rejected(self.name), rejected)
        storage.write_rejected(stage.child("candidates_rejected"), outside)
        reasons = dict(Counter(short(r[S.REASON]) for r in rejected))
        root = storage.resolve(cfg.queries, ctx.config.storage).uri
        details = {
            "triplets": len(rows),
            "splits": dict(Counter(r[S.SPLIT] for r in rows)),
            "candidates": len(candidates),
            "candidates_rejected": dict(Counter(short(r[S.REASON]) for r in outside)),
            "checked_against_catalog": catalog is not None,
            "image_root": posixpath.dirname(root),
        }
        return StageResult(read, read - len(rejected), reasons, details=details)


def catalog_splits(ctx: StageContext) -> dict[str, str]:
    """Product id -> split, from the run's catalog."""
    t = lookup.read(ctx.root, [S.ID, S.SPLIT])
    return dict(zip(t[S.ID].to_pylist(), t[S.SPLIT].to_pylist(), strict=True))


def held_out_reason(row: dict, catalog: dict[str, str] | None) -> str | None:
    """Why a row cannot be used with this catalog: it names products the catalog lacks; a training row
    names held-out products (they must never reach training); a held-out row's positive is not in the
    held-out pool (it could never be retrieved)."""
    if catalog is None:
        return None
    named = [*row[S.QUERY_IMAGE_IDS], *row[S.POSITIVE_IDS], *row[S.HARD_NEGATIVE_IDS]]
    missing = [i for i in dict.fromkeys(named) if i not in catalog]
    if missing:
        return f"ids not in the catalog: {missing[:3]}"
    if row[S.SPLIT] == "test":
        outside = [i for i in row[S.POSITIVE_IDS] if catalog[i] != "test"]
        return f"positives not in the held-out pool: {outside[:3]}" if outside else None
    held = [i for i in dict.fromkeys(named) if catalog[i] == "test"]
    return f"a training query names held-out products: {held[:3]}" if held else None


def short(reason: str) -> str:
    """A rejection reason without the ids it names, to count alike reasons together."""
    return reason.split(": [")[0]
