"""The ``index`` section: the candidate pool embedded with a checkpoint and its FAISS index."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from coral.config.mine import IndexConfig
from coral.config.resources import Resources
from coral.typed import check


@dataclass(frozen=True)
class IndexStageConfig(Resources):
    """The candidate pool embedded with a checkpoint (by ``Resources``' actors) and a FAISS index bound to
    that checkpoint.

    ``model``: ``train`` (the train stage's export, its retriever kind from the train section) or a dir,
    ``s3://`` URI or hub id of a retriever of kind ``kind``. ``candidates``: the catalog's ``test``
    products (the held-out pool), or ``all``. ``index``: the FAISS index kind (``auto``: exact up to
    ``flat_max`` vectors, IVF above; GPU when faiss-gpu sees one)."""

    model: str = "train"
    kind: Literal["mmret_clip", "mmret_mllm", "coral"] = "coral"  # when model is not "train"
    candidates: Literal["test", "all"] = "test"
    index: IndexConfig = field(default_factory=IndexConfig)
    batch_size: int = 32

    def __post_init__(self):
        super().__post_init__()
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
