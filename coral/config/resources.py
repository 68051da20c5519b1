"""The Ray resources of a section whose work runs in a pool of Ray actors, declared and checked once.

A section with such a pool inherits ``Resources`` (``class EncoderConfig(Resources)``), so its YAML keys
stay flat (``embed.encoders[0].num_gpus``) and every such section is an instance of ``Resources``:
``EncoderConfig``, ``EngineConfig`` and ``IndexStageConfig``. ``TrainConfig`` (Ray Train's own scaling
keys), ``DeploymentConfig`` (Serve replicas) and ``ServeConfig`` are not; their comments say why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from coral.typed import check


@dataclass(frozen=True, kw_only=True)
class Resources:
    """``num_actors`` Ray actors, each asking for ``num_cpus`` CPUs and ``num_gpus`` GPUs (fractional
    ones share a device) on a node with ``accelerator_type`` when set (e.g. A10G, L4, A100: cluster.yaml);
    the model inside runs on ``device`` (``auto``: cuda when torch sees a GPU) in ``dtype``. All but
    ``dtype`` are placement and never rerun a stage; ``dtype`` changes the numbers, so it does."""

    num_actors: int = field(default=1, metadata={"rerun": False})
    num_cpus: float = field(default=1.0, metadata={"rerun": False})
    num_gpus: float = field(default=0.0, metadata={"rerun": False})
    accelerator_type: str = field(default="", metadata={"rerun": False})
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={"rerun": False})
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    def __post_init__(self):
        check(self.num_actors >= 1, f"num_actors must be >= 1, got {self.num_actors}")
        check(self.num_cpus >= 0, f"num_cpus must be >= 0, got {self.num_cpus}")
        check(self.num_gpus >= 0, f"num_gpus must be >= 0, got {self.num_gpus}")
