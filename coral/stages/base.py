"""What a stage is: a name, the stages it reads, the config section that defines it, and ``run``.

Stages hand off through storage: each writes Parquet under ``{run_root}/{stage}/data/`` and rejected
rows under ``{run_root}/{stage}/rejected/``; the driver writes the manifest and marker.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from coral import manifest, schemas, storage
from coral.config import Config, Resources
from coral.errors import UserInputError
from coral.storage import Location


@dataclass(frozen=True)
class StageContext:
    config: Config
    root: Location

    def stage_dir(self, stage: str) -> Location:
        return self.root.child(stage)

    def data(self, stage: str) -> Location:
        return self.root.child(stage, manifest.DATA)

    def rejected(self, stage: str) -> Location:
        return self.root.child(stage, manifest.REJECTED)

    def is_complete(self, stage: str) -> bool:
        return manifest.read_complete(self.stage_dir(stage)) is not None

    def manifest(self, stage: str) -> dict:
        m = manifest.read_complete(self.stage_dir(stage))
        if m is None:
            raise UserInputError(f"stage '{stage}' at {self.stage_dir(stage).uri} is not complete")
        return m


class Stage(Protocol):
    name: ClassVar[str]

    def inputs(self, config: Config) -> tuple[str, ...]:
        """The stages whose output this one reads (may depend on the config, e.g. the data source)."""

    def section(self, config: Config) -> Any:
        """The config section whose hash (with the inputs' hashes) decides whether to rerun."""

    def output(self, config: Config) -> pa.Schema | None:
        """The columns (at least) of what it writes under ``data/``, checked once it has run; None when it
        writes no table (a model, an endpoint)."""

    def resources(self, config: Config) -> dict[str, Resources]:
        """What it asks Ray for, by pool (an actor pool, Ray Train's workers, tasks, Serve replicas): the
        same ``Resources`` it hands ``ray_runtime.actor_pool``; logged when it starts."""

    def validate(self, config: Config) -> None:
        """Cheap checks run before any stage starts (model paths, kinds); raise ConfigError."""

    def run(self, ctx: StageContext) -> manifest.StageResult:
        """Do the work, write data and rejected rows, and say what happened."""


def as_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A column of equal-length float lists (embeddings) -> (n, d) float32, without a Python object per
    value; ValueError when a row is null or the lengths differ."""
    flat = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(flat) == 0:
        return np.zeros((0, 0), np.float32)
    lengths = pc.list_value_length(flat).to_numpy(zero_copy_only=False)
    if flat.null_count or lengths.min() != lengths.max():
        raise ValueError("not one vector of one length per row")
    return np.asarray(pc.list_flatten(flat), dtype=np.float32).reshape(len(flat), -1)


def count_rows(loc: Location) -> int:
    """Rows in every Parquet file under ``loc`` (footer metadata only, no data read)."""

    def rows(path: str) -> int:
        with loc.fs.open_input_file(path) as f:
            return pq.ParquetFile(f).metadata.num_rows

    return sum(storage.read_retried(loc, lambda p=p: rows(p)) for p in storage.list_files(loc, ".parquet"))


def count_rejected(loc: Location) -> dict[str, int]:
    """Rejected rows under ``loc`` counted by reason."""
    counts: Counter[str] = Counter()
    for path in storage.list_files(loc, ".parquet"):
        table = storage.read_retried(
            loc, lambda p=path: pq.read_table(p, filesystem=loc.fs, columns=[schemas.REASON])
        )
        counts.update(table.column(schemas.REASON).to_pylist())
    return dict(counts)


def _same_type(declared: pa.DataType, written: pa.DataType) -> bool:
    """Equal, or lists (variable, large or fixed size: the size is the model's) of the same values."""
    lists = (pa.types.is_list, pa.types.is_large_list, pa.types.is_fixed_size_list)
    if any(f(declared) for f in lists) and any(f(written) for f in lists):
        return _same_type(declared.value_type, written.value_type)
    return declared == written


def check_output(loc: Location, declared: pa.Schema | None) -> None:
    """Every Parquet file under ``loc`` has the declared columns, of their types (footers only)."""
    if declared is None:
        return
    for path in storage.list_files(loc, ".parquet"):
        with loc.fs.open_input_file(path) as f:
            written = pq.ParquetFile(f).schema_arrow
        for field in declared:
            i = written.get_field_index(field.name)
            if i < 0 or not _same_type(field.type, written.field(i).type):
                got = "no such column" if i < 0 else str(written.field(i).type)
                raise RuntimeError(f"{path}: column '{field.name}' should be {field.type}, found {got}")
