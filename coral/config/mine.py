"""The ``mine`` section (MegaPairs mining) and the FAISS index settings it shares with ``index``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from coral.typed import check


@dataclass(frozen=True)
class IndexConfig:
    """Which FAISS index answers the kNN queries; ``auto`` is exact below ``flat_max`` vectors, IVF above."""

    kind: Literal["auto", "flat", "ivf_flat", "ivf_pq", "hnsw"] = "auto"
    flat_max: int = 200_000
    nlist: int = 0  # IVF lists; 0 = n // list_size
    list_size: int = 256  # vectors per IVF list when nlist is 0
    nprobe: int = 8
    pq_m: int = 32  # IVF-PQ sub-quantisers (must divide the dimension)
    pq_bits: int = 8  # bits per sub-quantiser code
    refine: int = (
        0  # IVF-PQ: re-rank the top k x refine codes with the exact vectors (0: off; keeps them in memory)
    )
    hnsw_m: int = 32
    ef_construction: int = 200  # HNSW graph quality: faiss's default 40 loses recall on clustered data
    ef_search: int = 128
    train_size: int = 100_000  # vectors sampled to train IVF
    use_gpu: Literal["auto", "never"] = "auto"  # auto: faiss-gpu and a visible GPU


@dataclass(frozen=True)
class MineConfig:
    """MegaPairs mining: per encoder top-k, keep pairs inside the similarity band, the rest are negatives."""

    k: int = 20
    band: tuple[float, float] = (0.8, 0.96)
    bands: dict[str, tuple[float, float]] = field(default_factory=dict)  # per-encoder override
    encoders: tuple[str, ...] = ()  # which embedding columns to mine; empty = all
    splits: tuple[str, ...] = ("train", "test")  # each mined among itself: held-out pairs are for evaluation
    hard_negatives: int = 5  # per pair, the query image first
    max_pairs_per_query: int = 5
    index: IndexConfig = field(default_factory=IndexConfig)
    query_tasks: int = field(default=4, metadata={"rerun": False})
    seed: int = 0

    def __post_init__(self):
        for name, (lo, hi) in {"band": self.band, **self.bands}.items():
            check(-1.0 <= lo < hi <= 1.0, f"{name}: a band needs -1 <= low < high <= 1, got ({lo}, {hi})")
        check(self.k >= 2, f"k must be >= 2, got {self.k}")
        check(
            self.hard_negatives >= 0 and self.max_pairs_per_query >= 1, "hard_negatives >= 0, max_pairs >= 1"
        )
        check(self.query_tasks >= 1, f"query_tasks must be >= 1, got {self.query_tasks}")
        ix = self.index
        check(
            min(ix.nprobe, ix.list_size, ix.train_size, ix.hnsw_m, ix.ef_search) >= 1,
            "index: sizes must be >= 1",
        )

    def band_for(self, encoder: str) -> tuple[float, float]:
        return tuple(self.bands.get(encoder, self.band))
