"""The catalog from the user's own products file (``catalog.source=products``).

The file is a JSON list or JSON lines; each item is either

- MERIT's candidate (``formats.from_merit_candidate``): ``{"id", "conversations": [{"from": "human",
  "value": "Represent the given product: <image>\\n{title}"}], "image": path}``, or
- a plain product: ``{"id", "title", "image": path}`` and optionally ``class`` ("product"), ``language``
  ("en"), ``attributes`` (a dict; the keys of ``S.ATTRIBUTE_KEYS`` are kept, the rest dropped and
  counted), ``split``, ``caption`` (the title) and ``group_id`` (the id).

Image paths are relative to the products file's folder and must resolve under it, or under one of
``catalog.allowed_image_roots`` (``coral.paths.confine``: no ``..`` out, no absolute path or symlink out,
no other URI scheme or bucket); they are read through ``coral.storage``, and the catalog keeps the file's
bytes (re-encoded as PNG only when a plain RGB decode would change them: alpha, 16-bit, palette, other
formats). A product without a split is
``test`` with chance ``test_fraction`` (a seeded hash of its id, so the same id always lands the same
way), else ``train``. Rejected, with a reason, and left out: an item that cannot be read, an empty id,
a repeated id (the first is kept), an image path that leaves its folder, an image that is missing, cannot
be read (a storage or permission error) or cannot be decoded.

Ids are the candidates' ids as ``import_triplets`` reads them (the same parser), so the triplets imported
with the same candidates file name the catalog's products.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
from collections import Counter
from collections.abc import Mapping

import pyarrow as pa

from coral import schemas as S
from coral import storage
from coral.catalog import formats
from coral.config import StorageConfig
from coral.images import decode_image
from coral.paths import PathError, confine
from coral.storage import Location

DEFAULT_CLASS, DEFAULT_LANGUAGE = "product", "en"
ITEM, IMAGE_PATH = "item", "image"
# rejected products: the id (``item {n}`` when it has none), why, the image path as written, the position
REJECTED = pa.schema(
    [(S.ID, pa.string()), (S.REASON, pa.string()), (IMAGE_PATH, pa.string()), (ITEM, pa.int64())]
)
PER_TASK = 1000  # products per Ray task, at most
_PLAIN_FORMATS = {"PNG", "JPEG"}
_PLAIN_MODES = {"RGB", "L"}


def hashed_fraction(seed: int, key: str) -> float:
    """A number in [0, 1) fixed by (seed, key): ``hashed_fraction(s, k) < f`` picks a fraction f of keys."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def hashed_split(seed: int, key: str, test_fraction: float, otherwise: str = "train") -> str:
    return "test" if test_fraction > 0 and hashed_fraction(seed, key) < test_fraction else otherwise


def read_items(uri: str, cfg: StorageConfig | None = None) -> tuple[list, Location]:
    """(the file's items, the folder image paths are relative to)."""
    loc = storage.resolve(uri, cfg)
    root = Location(posixpath.dirname(loc.uri), loc.fs, posixpath.dirname(loc.path))
    return storage.read_json_items(loc, "catalog.products"), root


def _text(obj: Mapping, key: str, default: str) -> str:
    value = obj.get(key)
    return default if value is None or str(value).strip() == "" else str(value)


def parse_product(obj: Mapping, seed: int = 0, test_fraction: float = 0.0) -> dict:
    """One item -> a product entry: the catalog row without its image bytes, plus ``image`` (the path as
    written). Raises KeyError/TypeError/ValueError for an item it cannot read; the id may be empty."""
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected an object, got {type(obj).__name__}")
    raw_id = obj["id"]
    pid = "" if raw_id is None else str(raw_id).strip()
    if "conversations" in obj:  # MERIT's candidate: the import stage's parser
        got = formats.from_merit_candidate(obj)
        title, image = got[S.TITLE], got[S.IMAGE]
    else:
        title, image = obj["title"], obj["image"]
        if not isinstance(title, str):
            raise TypeError(f"title must be a string, got {type(title).__name__}")
    if not isinstance(image, str) or not image.strip():
        raise ValueError("no image path")
    attributes = obj.get("attributes") or {}
    if not isinstance(attributes, Mapping):
        raise TypeError(f"attributes must be an object, got {type(attributes).__name__}")
    return {
        S.ID: pid,
        S.GROUP_ID: _text(obj, "group_id", pid),
        S.CLASS: _text(obj, "class", DEFAULT_CLASS),
        S.ATTRIBUTES: {
            k: None if attributes.get(k) is None else str(attributes[k]) for k in S.ATTRIBUTE_KEYS
        },
        S.VARIANT_ATTRIBUTE: "",
        S.TITLE: title,
        S.LANGUAGE: _text(obj, "language", DEFAULT_LANGUAGE),
        S.CAPTION: _text(obj, "caption", title),
        S.IMAGE: image,
        S.SPLIT: _text(obj, "split", "") or hashed_split(seed, pid, test_fraction),
        "dropped_attributes": sorted(str(k) for k in attributes if k not in S.ATTRIBUTE_KEYS),
    }


def rejection(pid: str, reason: str, image: object = None, item: int | None = None) -> dict:
    return {S.ID: pid, S.REASON: reason, IMAGE_PATH: image if isinstance(image, str) else None, ITEM: item}


def parse_products(
    items: list, seed: int = 0, test_fraction: float = 0.0, seen: dict | None = None
) -> tuple[list[dict], list[dict], dict]:
    """(entries with their ``item`` position, rejected rows, details): unreadable items, empty ids and
    repeated ids (after the first; the row's ``item`` says which) are rejected. Details count the
    attribute keys dropped. ``seen``: ids already taken (by an earlier file), updated in place."""
    entries, rejected = [], []
    seen = {} if seen is None else seen
    dropped: Counter[str] = Counter()
    for n, obj in enumerate(items):
        image = obj.get("image") if isinstance(obj, Mapping) else None
        try:
            entry = parse_product(obj, seed, test_fraction)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            rejected.append(rejection(f"item {n}", f"unreadable: {type(e).__name__}: {e}", image, n))
            continue
        pid = entry[S.ID]
        if not pid:
            rejected.append(rejection(f"item {n}", "empty id", image, n))
        elif pid in seen:
            rejected.append(rejection(pid, "duplicate id", image, n))
        else:
            seen[pid] = n
            dropped.update(entry.pop("dropped_attributes"))
            entries.append({**entry, ITEM: n})
    return entries, rejected, {"dropped_attributes": dict(sorted(dropped.items()))}


def shards(entries: list, num_tasks: int) -> list[list]:
    """Contiguous shards: ``num_tasks`` of them (fewer when there are fewer entries), more when one would
    hold over ``PER_TASK``."""
    n = min(max(num_tasks, -(-len(entries) // PER_TASK)), len(entries))
    if n == 0:
        return []
    bounds = [round(i * len(entries) / n) for i in range(n + 1)]
    return [entries[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def image_location(
    root: Location, path: str, cfg: StorageConfig | None = None, allowed: tuple[str, ...] = ()
) -> Location:
    """An image path as written, relative to ``root`` (the products file's folder); PathError unless it
    resolves under ``root`` or an ``allowed`` prefix (``coral.paths.confine``)."""
    uri = confine(path, root.uri, allowed)
    if uri.startswith("s3://") == root.is_s3:  # the same kind of storage: the same filesystem
        return Location(uri, root.fs, uri[len("s3://") :] if root.is_s3 else uri)
    return storage.resolve(uri, cfg)


def image_bytes(data: bytes, max_pixels: int = 50_000_000) -> bytes:
    """The bytes the catalog keeps, or ValueError with the reason the image cannot be used."""
    from PIL import Image

    rgb = decode_image(data, max_pixels)
    with Image.open(io.BytesIO(data)) as raw:
        if raw.format in _PLAIN_FORMATS and raw.mode in _PLAIN_MODES:
            return data
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    return buf.getvalue()


def read_image(loc: Location) -> bytes:
    """The image's bytes; ValueError("image not found") when it is not there, ValueError("image
    unreadable: ...") on any other storage or permission error, so one row fails, not the stage."""
    try:
        return storage.read_bytes(loc)
    except (OSError, pa.ArrowException) as e:
        try:
            missing = isinstance(e, FileNotFoundError) or not storage.exists(loc)
        except (OSError, pa.ArrowException):
            missing = False
        if missing:
            raise ValueError("image not found") from None
        raise ValueError(f"image unreadable: {type(e).__name__}") from None


def product_rows(
    entries: list[dict], root: Location, cfg: StorageConfig | None = None, allowed: tuple[str, ...] = ()
) -> tuple[list[dict], list[dict]]:
    """(catalog rows with the image bytes, rejected rows) for parsed entries; image paths must resolve
    under ``root`` or an ``allowed`` prefix."""
    rows, rejected = [], []
    for entry in entries:
        path = entry[S.IMAGE]
        try:
            loc = image_location(root, path, cfg, allowed)
        except PathError as e:
            rejected.append(rejection(entry[S.ID], f"image path: {e}", path, entry[ITEM]))
            continue
        try:
            data = image_bytes(read_image(loc))
        except ValueError as e:
            reason = "empty image file" if str(e) == "empty file" else str(e)
            rejected.append(rejection(entry[S.ID], reason, path, entry[ITEM]))
            continue
        rows.append({**{k: entry[k] for k in S.CATALOG.names}, S.IMAGE: data})
    return rows, rejected


def table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=S.CATALOG)
