"""Where products come from: the ``catalog`` section (synthetic or the user's products) and ``imports``
(released datasets' triplets), with the image-root check both share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from coral.typed import check

# the languages titles are written in; coral.catalog.vocab's dictionaries give one name per language, in this order
LANGUAGES = ("en", "id", "ms", "vi", "th")


def check_image_roots(roots: tuple[str, ...]) -> None:
    """``allowed_image_roots``: each an absolute local folder (or ``file://`` one) or ``s3://bucket[/prefix]``."""
    for r in roots:
        local = r[len("file://") :] if r.startswith("file://") else r
        s3 = r.startswith("s3://") and r[len("s3://") :].strip("/") != ""
        check(
            s3 or ("://" not in local and local.startswith("/")),
            f"allowed_image_roots: '{r}' is neither an absolute local folder nor s3://bucket[/prefix]",
        )


@dataclass(frozen=True)
class CatalogConfig:
    """The product catalog: ``synthetic`` (the embedded default's MERIT-like data) or ``products``, the
    user's own file (``products``: MERIT's candidates JSON or JSON lines of ``{id, title, image, ...}``,
    image paths relative to its folder; ``coral.catalog.products``), and optionally ``test_products``, a
    second such file of held-out products (MERIT's test candidates: the evaluation's pool). ``seed`` and ``test_fraction`` apply
    to both (products: to those without a ``split``, by a seeded hash of the id); the other fields shape
    the synthetic catalog only. An image path must resolve under its file's folder (no ``..`` out, no
    symlink out, no other URI scheme) or under one of ``allowed_image_roots`` (absolute local folders or
    ``s3://bucket[/prefix]``; default none); any other is rejected with the reason (``coral.paths``)."""

    source: Literal["synthetic", "products"] = "synthetic"
    products: str = ""  # source=products: the products file, local or s3://
    test_products: str = ""  # source=products: a second file whose products are all held out (``test``)
    allowed_image_roots: tuple[str, ...] = ()  # image paths may also resolve under these (local or s3://)
    seed: int = 0
    num_groups: int = 40
    variants_per_group: int = 3
    image_size: int = 64
    test_fraction: float = 0.25
    languages: tuple[str, ...] = ("en", "id", "ms", "vi", "th")
    num_tasks: int = field(default=4, metadata={"rerun": False})  # Ray tasks, one Parquet file each

    def __post_init__(self):
        check(self.num_groups >= 1, f"num_groups must be >= 1, got {self.num_groups}")
        check(self.variants_per_group >= 2, f"variants_per_group must be >= 2, got {self.variants_per_group}")
        check(16 <= self.image_size <= 1024, f"image_size must be in 16..1024, got {self.image_size}")
        if self.source == "products":  # 1: every product without a split is a held-out candidate
            check(
                0.0 <= self.test_fraction <= 1.0, f"test_fraction must be in [0, 1], got {self.test_fraction}"
            )
        else:
            check(
                0.0 <= self.test_fraction < 1.0, f"test_fraction must be in [0, 1), got {self.test_fraction}"
            )
        check(self.num_tasks >= 1, f"num_tasks must be >= 1, got {self.num_tasks}")
        check_image_roots(self.allowed_image_roots)
        bad = [lang for lang in self.languages if lang not in LANGUAGES]
        check(
            not bad and self.languages,
            f"languages must be a non-empty subset of {list(LANGUAGES)}, got {bad}",
        )


@dataclass(frozen=True)
class ImportConfig:
    """Training triplets from released datasets: MERIT's conversation JSON (``merit``, with its candidates
    file to map image paths to product ids), MERIT's released queries (``released``), MegaPairs' JSON
    lines (``megapairs``), or ``{query, pos, neg}`` JSON lines (``query_pos_neg``: FlagEmbedding's and
    Tevatron's training triplets, candidates named by ``pos_image``/``neg_image``, mapped to product ids
    through ``candidates`` as MERIT's). Image ids are the paths as written, relative to the queries file's folder; a
    path that resolves outside that folder (``..``, absolute, a symlink out, another URI scheme) and outside
    ``allowed_image_roots`` (absolute local folders or ``s3://bucket[/prefix]``; default none) rejects its
    item with the reason (``coral.paths``)."""

    format: Literal["merit", "released", "megapairs", "query_pos_neg"] = "merit"
    queries: str = ""  # a JSON list or JSON lines file, local or s3://
    candidates: str | None = None  # merit, query_pos_neg: the candidates file (id, title, image path)
    test_queries: str = ""  # the held-out queries' file (MERIT: queries-test.json): their split is test
    test_candidates: str | None = None  # merit: the held-out candidates file, for its image paths
    allowed_image_roots: tuple[str, ...] = ()  # image paths may also resolve under these (local or s3://)
    split: str = "train"
    test_fraction: float = 0.0  # > 0: each query goes to test with this chance (seeded hash of its id)
    seed: int = 0  # the hash's seed

    def __post_init__(self):
        check(0.0 <= self.test_fraction <= 1.0, f"test_fraction must be in [0, 1], got {self.test_fraction}")
        check_image_roots(self.allowed_image_roots)
