"""The ``merit`` section: MERIT product queries composed from the catalog's attributes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from coral.config.annotate import EngineConfig
from coral.typed import check


@dataclass(frozen=True)
class MeritConfig:
    """MERIT product queries composed from the catalog's attributes (REFERENCE.md section 4): 2-4
    conditions, exact positives (at least ``min_positives``), 0 < positive rate < ``max_rate``; per split,
    over that split's products."""

    queries: dict[str, int] = field(default_factory=lambda: {"train": 2000, "test": 500})
    cold_start: bool = True  # also one query per near-duplicate pair (one differing attribute)
    max_rate: float = 0.05
    min_positives: int = 2  # MERIT: a query needs at least 2 positives (cold-start queries need 1)
    max_positives: int = 3
    hard_negatives: int = 5
    # an image encoder of ``embed.encoders``: positives and hard negatives ranked by the mean cosine of its
    # vectors to the query products (MERIT step 4; the embed stage runs before merit); None: a seeded draw
    rerank_by: str | None = None
    # out of distribution (MERIT step 7): the axes held out of training, among language, attribute and
    # class, each holding out the values below; evaluate scores their held-out queries apart
    ood: tuple[str, ...] = ()
    ood_languages: tuple[str, ...] = ("th", "ms", "id")
    ood_attributes: tuple[str, ...] = ("brand", "pattern")
    ood_classes: tuple[str, ...] = ("table", "phone")
    export: bool = False  # also MERIT's JSON (queries, candidates, images) under merit/export/
    # optional model steps, each on its own engine (None: skipped)
    label: EngineConfig | None = None  # a VLM labels products from their class's attribute card
    label_products: Literal["missing", "all"] = "missing"  # which products it labels
    rewrite: EngineConfig | None = None  # a rewrite is kept only if every tag and slot survives
    judge: EngineConfig | None = None  # yes/no on completeness and accuracy; "no" drops the query
    num_tasks: int = field(default=4, metadata={"rerun": False})
    seed: int = 0

    def __post_init__(self):
        check(0 < self.max_rate <= 1, f"max_rate must be in (0, 1], got {self.max_rate}")
        check(self.max_positives >= 1 and self.hard_negatives >= 0, "max_positives >= 1, hard_negatives >= 0")
        check(self.min_positives >= 1, f"min_positives must be >= 1, got {self.min_positives}")
        check(
            self.max_positives >= self.min_positives,
            f"max_positives ({self.max_positives}) must be >= min_positives ({self.min_positives})",
        )
        check(all(n >= 0 for n in self.queries.values()), "queries: counts must be >= 0")
        axes = ("language", "attribute", "class")
        check(set(self.ood) <= set(axes), f"ood: axes must be among {list(axes)}, got {list(self.ood)}")
