"""The ``train`` section and each retriever kind's recipe (``RECIPES``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from coral.typed import check

# Each retriever kind's training recipe: what ``TrainConfig`` fields left unset become.
RECIPES: dict[str, dict[str, Any]] = {
    # MegaPairs appendix B: every CLIP parameter trained, lr 5e-6 decayed linearly, each query with its
    # positive and 4 hard negatives; temperature 0.02 (section 3.3)
    "mmret_clip": {
        "lr": 5e-6,
        "temperature": 0.02,
        "hard_negatives": 4,
        "lora_rank": 0,
        "max_image_tokens": 0,
    },
    # MegaPairs appendix B: LoRA rank 32 on the ViT and the LLM, lr 5e-6 decayed linearly, 3 hard negatives,
    # images at 512 x 512: on Qwen (28 px a visual token) 18 x 18 = 324 tokens (this project's translation)
    "mmret_mllm": {
        "lr": 5e-6,
        "temperature": 0.02,
        "hard_negatives": 3,
        "lora_rank": 32,
        "max_image_tokens": 324,
    },
    # Coral publishes only that full fine-tuning beat LoRA; MERIT infers with at most 576 image tokens. lr
    # 1e-5, MMRet's temperature and 3 hard negatives are this project's choices
    "coral": {"lr": 1e-5, "temperature": 0.02, "hard_negatives": 3, "lora_rank": 0, "max_image_tokens": 576},
}


# Not ``Resources``: Ray Train sizes a run by its ScalingConfig (``num_workers``, ``cpus_per_worker``,
# ``use_gpu``), the YAML keys users already write, and device and dtype follow from ``use_gpu`` and the
# DeepSpeed JSON; inheriting would add num_actors/num_cpus/num_gpus/device/dtype keys that do nothing.
@dataclass(frozen=True)
class TrainConfig:
    """Ray Train + DeepSpeed training of a retriever on the triplets of ``data`` (their ``train`` rows).

    ``model``: ``mmret_clip`` (CLIP / SigLIP score fusion), ``mmret_mllm`` (last-token embedding of a
    Qwen2-VL / Qwen2.5-VL) or ``coral`` (the same plus vision reconstruction and masked language modelling
    on the query and its positive). ``compare``: more models trained on the same data, steps and seed
    after the first, each with its base (``{model: mmret_mllm}``); their held-out figures go in the
    manifest beside the first's, the first is the one exported to ``train/model``. DeepSpeed's ZeRO stage
    and bf16 come from the JSON file ``deepspeed``; the optimizer is torch AdamW (no DeepSpeed optimizer
    that JIT-compiles on CPU). ``lora_rank`` > 0 trains LoRA adapters (peft) on ``lora_target_modules``
    and exports the merged weights; 0 is full fine-tuning. ``steps`` counts optimizer steps, each of
    ``gradient_accumulation`` micro-batches of ``batch_size`` queries per worker.

    ``lr``, ``temperature``, ``hard_negatives``, ``lora_rank`` and ``max_image_tokens`` left unset take the
    model kind's recipe (``RECIPES``: its paper's numbers, else this project's choice, each marked there).
    The learning rate warms up linearly over ``warmup_ratio`` of the steps, then decays (``lr_schedule``:
    linear to 0 as MMRet, cosine, or constant). ``max_image_tokens`` caps Qwen's visual tokens per image
    (0: the processor's own budget)."""

    model: Literal["mmret_clip", "mmret_mllm", "coral"] = "coral"
    base: str = "models/tiny/qwen2_vl"  # dir or hub id, through the one loader
    data: tuple[str, ...] = ("merit",)  # stages whose TRIPLETS to train on
    steps: int = 300
    batch_size: int = 8  # queries per worker per step
    hard_negatives: int | None = None  # None: the recipe's
    lr: float | None = None
    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: float = 0.05  # this project's choice: MMRet states no warmup
    weight_decay: float = 0.0
    temperature: float | None = None
    max_image_tokens: int | None = None
    vision_recon_weight: float = 0.1
    mlm_weight: float = 0.1
    vision_mask_ratio: float = 0.5
    text_mask_ratio: float = 0.15
    deepspeed: str = "zero2.json"  # a JSON file, or one shipped (coral.shipped): zero2, zero2_bf16, zero3
    gradient_accumulation: int = 1
    gradient_checkpointing: bool = False
    lora_rank: int | None = None
    lora_alpha: int = 32
    # the language model's attention and Qwen2-VL / 2.5-VL's vision blocks (attn.qkv, attn.proj): MMRet puts
    # LoRA on both; names match a module's dotted name or its end
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "attn.qkv", "attn.proj")
    compare: tuple[dict[str, str], ...] = ()
    checkpoint_every: int = 100
    log_every: int = field(default=10, metadata={"rerun": False})  # curves: TensorBoard, Ray Train, MLflow
    mlflow_tracking_uri: str = field(default="", metadata={"rerun": False})  # "": no MLflow
    mlflow_experiment: str = field(default="coral", metadata={"rerun": False})
    keep_checkpoints: int = field(
        default=2, metadata={"rerun": False}
    )  # the newest kept (Ray Train num_to_keep)
    validation_queries: int = 200  # held-out (test split) queries scored at start, every checkpoint and end
    num_workers: int = field(default=2, metadata={"rerun": False})
    cpus_per_worker: float = field(default=1.0, metadata={"rerun": False})
    resources: dict[str, float] = field(default_factory=dict, metadata={"rerun": False})  # custom, per worker
    # Ray Data actors running the processor; 0: each training worker runs it on the rows it streams (on a
    # small machine one process fewer to start, the processor's work on the workers' cores)
    data_workers: int = field(default=1, metadata={"rerun": False})
    use_gpu: bool = field(default=False, metadata={"rerun": False})
    accelerator_type: str = field(default="", metadata={"rerun": False})  # e.g. A10G, L4, A100 (cluster.yaml)
    max_failures: int = field(default=2, metadata={"rerun": False})
    seed: int = 0

    def __post_init__(self):
        for key, value in RECIPES[self.model].items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        check(self.steps >= 1 and self.batch_size >= 1, "steps and batch_size must be >= 1")
        check(self.lr > 0 and self.temperature > 0, "lr and temperature must be > 0")
        check(0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)")
        check(self.max_image_tokens >= 0, "max_image_tokens must be >= 0 (0: the processor's budget)")
        check(
            self.hard_negatives >= 0
            and min(self.checkpoint_every, self.keep_checkpoints, self.log_every) >= 1,
            "hard_negatives >= 0, checkpoint_every, keep_checkpoints and log_every >= 1",
        )
        check(
            0 <= self.vision_mask_ratio < 1 and 0 <= self.text_mask_ratio < 1, "mask ratios must be in [0, 1)"
        )
        check(
            self.gradient_accumulation >= 1 and self.data_workers >= 0,
            "gradient_accumulation >= 1, data_workers >= 0",
        )
        check(self.lora_rank >= 0, "lora_rank must be >= 0 (0: full fine-tuning)")
        for other in self.compare:
            check(
                isinstance(other, dict) and set(other) <= {"model", "base"} and "model" in other,
                f"compare entries look like {{model: mmret_mllm, base: ...}}, got {other!r}",
            )
            check(
                other["model"] in ("mmret_clip", "mmret_mllm", "coral"),
                f"compare: unknown model {other['model']!r}",
            )
