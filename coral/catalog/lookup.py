"""One catalog lookup, id -> product (title, image), for every stage and for Serve.

The catalog stage's table (``{run_root}/catalog/data/``) is read here and nowhere else: ``read`` with the
columns a caller needs, only ``ids`` when given (pushed down to Parquet as a filter, so a replica that
needs its pool's 1,000 images does not read a catalog of millions). Images stay encoded until a caller
asks for one (``Products.images``), then decode with ``rgb``, as every place that embeds decodes them.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.dataset as pads
from PIL import Image

from coral import schemas as S
from coral import storage
from coral.manifest import DATA
from coral.storage import Location

PRODUCT = (S.ID, S.TITLE, S.IMAGE)


@dataclass
class Products:
    """What a candidate needs: its title (may be empty) and its image, by id."""

    titles: dict[str, str]
    images: Callable[[str], Image.Image]  # id -> RGB PIL image


def rgb(data: bytes) -> Image.Image:
    """An image file's bytes -> an RGB PIL image (the offline stages and the endpoint alike)."""
    return Image.open(io.BytesIO(data)).convert("RGB")


def location(run_root: Location) -> Location:
    """Where the catalog stage's table is (for a streamed read by Ray Data)."""
    return run_root.child("catalog", DATA)


def read(run_root: Location, columns: Iterable[str] = PRODUCT, ids: Iterable[str] | None = None) -> pa.Table:
    """The catalog's ``columns``; only the rows of ``ids`` when given."""
    src = location(run_root)
    if ids is None:
        return storage.read_table(src, columns=list(columns))
    return storage.read_dataset(src, columns=list(columns), filter=pads.field(S.ID).isin(sorted(set(ids))))


def columns(table: pa.Table, names: Iterable[str] = PRODUCT) -> dict[str, list]:
    """``table``'s columns as plain lists (what Ray ships to actors without Arrow in the way)."""
    return {k: table[k].to_pylist() for k in names}


def images_by_id(table: pa.Table) -> dict[str, bytes]:
    return dict(zip(table[S.ID].to_pylist(), table[S.IMAGE].to_pylist(), strict=True))


def products_from(catalog: dict, cached: int = 4096) -> Products:
    """Titles and lazily decoded images (the last ``cached`` kept) of a catalog given as columns."""
    raw = dict(zip(catalog[S.ID], catalog[S.IMAGE], strict=True))

    @functools.lru_cache(maxsize=cached)
    def image(pid: str) -> Image.Image:
        return rgb(raw[pid])

    return Products(dict(zip(catalog[S.ID], catalog[S.TITLE], strict=True)), image)


def products(run_root: Location, ids: Iterable[str] | None = None, cached: int = 4096) -> Products:
    """``read`` then ``products_from``: the products of ``ids`` (or all), ready to embed."""
    return products_from(columns(read(run_root, PRODUCT, ids)), cached)
