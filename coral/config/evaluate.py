"""The ``evaluate`` section: held-out queries searched in the index, metrics, gate and baseline."""

from __future__ import annotations

from dataclasses import dataclass, field

from coral.metrics import FAMILIES, metric_names
from coral.typed import check


@dataclass(frozen=True)
class EvaluateConfig:
    """Held-out queries (``splits`` of the ``train.data`` stages' triplets) searched in the index; the
    untrained base model (``train.base``) scored the same way as a baseline (``baseline``). ``gate``:
    optional bars on the trained model's metrics (``{R@1: 0.3}``); below one, the graph stops with a
    non-zero exit code. ``bootstrap``: resamples for the 95% intervals."""

    splits: tuple[str, ...] = ("test",)  # or OOD labels such as ood_language_th (with merit.ood)
    baseline: bool = True
    max_queries: int = 0  # 0: every held-out query
    gate: dict[str, float] = field(default_factory=dict)
    bootstrap: int = 1000
    top_k: int = 10
    # merit: R@1/5/10 + MRR@10; recall: Recall@K (CIRR, FashionIQ); circo: mAP@k; mmeb: P@1 over each
    # query's own candidates (its positive and hard negatives)
    metrics: tuple[str, ...] = ("merit",)
    recall_k: tuple[int, ...] = (1, 5, 10, 50)
    map_k: tuple[int, ...] = (5, 10, 25, 50)

    def __post_init__(self):
        check(
            bool(self.metrics)
            and set(self.metrics) <= set(FAMILIES)
            and len(set(self.metrics)) == len(self.metrics),
            f"evaluate.metrics: one or more of {list(FAMILIES)}, each once, got {list(self.metrics)}",
        )
        check(min(self.recall_k + self.map_k) >= 1, "evaluate.recall_k and map_k must be >= 1")
        known = metric_names(self.metrics, self.recall_k, self.map_k)
        check(
            set(self.gate) <= set(known),
            f"evaluate.gate: metrics must be among {known} (evaluate.metrics), got {sorted(self.gate)}",
        )
        check(self.top_k >= 10, "evaluate.top_k must be >= 10 (MERIT's metrics look at the top 10)")
