"""The typed config of one graph run: frozen dataclasses loaded from YAML plus ``a.b.c=value`` overrides.

Each stage receives only its own section. Adding a stage means adding its section here and registering
the stage in ``coral.stages``; the driver needs no change.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from coral.errors import ConfigError
from coral.metrics import FAMILIES, metric_names
from coral.typed import check, from_dict, is_secret, to_dict


@dataclass(frozen=True)
class RunConfig:
    """Where the run lives and which stages it has, in order."""

    name: str = "demo"
    run_root: str = "runs/demo"  # local path, file:// or s3://bucket/prefix
    stages: tuple[str, ...] = ("catalog", "embed")
    # one run per run_root: its lease (run_root/_lease.json) is refreshed every lease_ttl_s / 8 and taken
    # over by another run only once its heartbeat is older than this (coral.lease)
    lease_ttl_s: float = 120.0

    def __post_init__(self):
        check(bool(self.run_root), "run_root must not be empty")
        check(len(self.stages) > 0, "stages must name at least one stage")
        check(self.lease_ttl_s > 0, f"lease_ttl_s must be > 0, got {self.lease_ttl_s}")


@dataclass(frozen=True)
class StorageConfig:
    """Object-storage access. Unset values fall back to the usual AWS_* environment variables."""

    endpoint_url: str | None = None  # e.g. http://127.0.0.1:9000 for an S3-compatible server
    region: str | None = None
    # secrets: in no repr, manifest (redacted), log line or error message
    access_key_id: str | None = field(default=None, repr=False, metadata={"secret": True})
    secret_access_key: str | None = field(default=None, repr=False, metadata={"secret": True})
    connect_timeout_s: float = 3.0
    request_timeout_s: float = 10.0
    max_attempts: int = 5  # tries per request, the first included (boto3 and pyarrow alike)

    def __post_init__(self):
        check(
            (self.access_key_id is None) == (self.secret_access_key is None),
            "access_key_id and secret_access_key must be set together (or neither, to use the environment)",
        )
        check(self.max_attempts >= 1, f"max_attempts must be >= 1, got {self.max_attempts}")


@dataclass(frozen=True)
class RayConfig:
    """How the driver reaches Ray. ``address`` (or RAY_ADDRESS) joins a cluster; otherwise a local Ray starts.

    ``num_cpus`` is the *logical* CPU count of a local Ray: on a 2-core machine an actor pool plus its read
    tasks (or train workers plus ingest) deadlock at the physical count, so the default oversubscribes.
    """

    address: str | None = None
    num_cpus: int = 4
    include_dashboard: bool = True  # Ray Train V2 logs state-API errors without it
    temp_dir: str | None = None
    # a local Ray's Serve runs throughput-optimized (RAY_SERVE_THROUGHPUT_OPTIMIZED): gRPC between
    # replicas, user code on the replica's event loop, HTTP straight into ingress replicas beside the proxy.
    # A cluster sets it where Ray starts (cluster.yaml, the KubeRay manifests); the environment wins.
    serve_throughput_optimized: bool = True

    def __post_init__(self):
        check(self.num_cpus >= 1, f"num_cpus must be >= 1, got {self.num_cpus}")


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
        from coral.catalog.vocab import LANGUAGES

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
class EncoderConfig:
    """One encoder run as a Ray Data actor pool; image kinds read ``image``, text kinds read ``caption``."""

    name: str = "clip_image"  # output column is f"emb_{name}"
    kind: Literal["clip_image", "clip_text", "dinov2", "sentence_transformers"] = "clip_image"
    model: str = "models/tiny/clip"  # local dir or hub id (a hub id is the only thing that downloads)
    pooling: Literal["cls", "mean"] = "cls"  # dinov2: CLS token or mean of patch tokens
    # resources: changing them does not change the output, so it does not rerun the stage
    batch_size: int = field(default=32, metadata={"rerun": False})
    num_actors: int = field(default=1, metadata={"rerun": False})
    num_cpus: float = field(default=1.0, metadata={"rerun": False})
    num_gpus: float = field(default=0.0, metadata={"rerun": False})  # fractional GPUs share one device
    resources: dict[str, float] = field(default_factory=dict, metadata={"rerun": False})  # custom, per actor
    accelerator_type: str = field(default="", metadata={"rerun": False})  # e.g. A10G, L4, A100 (cluster.yaml)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    def __post_init__(self):
        check(bool(re.fullmatch(r"[a-z0-9_]+", self.name)), f"name must match [a-z0-9_]+, got {self.name!r}")
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        check(self.num_actors >= 1, f"num_actors must be >= 1, got {self.num_actors}")


def _default_encoders() -> tuple[EncoderConfig, ...]:
    return (
        EncoderConfig(name="clip_image", kind="clip_image", model="models/tiny/clip"),
        EncoderConfig(name="dinov2", kind="dinov2", model="models/tiny/dinov2"),
        EncoderConfig(name="caption", kind="clip_text", model="models/tiny/clip"),
    )


@dataclass(frozen=True)
class ImagesSourceConfig:
    """A folder or s3:// prefix of images, with an optional captions file (JSONL or Parquet: id or path, caption)."""

    uri: str = ""
    captions: str | None = None
    extensions: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")


@dataclass(frozen=True)
class EmbedConfig:
    """Every configured encoder over every image; the MegaPairs default is CLIP image, DINOv2, CLIP text."""

    source: Literal["catalog", "images"] = "catalog"
    images: ImagesSourceConfig = field(default_factory=ImagesSourceConfig)
    encoders: tuple[EncoderConfig, ...] = field(default_factory=_default_encoders)
    max_image_pixels: int = 50_000_000  # larger images are rejected (decompression bombs)

    def __post_init__(self):
        names = [e.name for e in self.encoders]
        check(len(names) > 0, "encoders must name at least one encoder")
        check(len(set(names)) == len(names), f"encoder names must be unique, got {names}")
        check(self.source != "images" or bool(self.images.uri), "source 'images' needs images.uri")


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


@dataclass(frozen=True)
class EngineConfig:
    """A text generator for one annotation step.

    ``hf``: transformers ``generate`` in a Ray Data actor pool (any chat-template VLM or LLM, hub id or dir);
    ``vllm``: ``ray.data.llm`` with a vLLM engine (``pip install .[vllm]``, GPU); ``openai``: any
    OpenAI-compatible chat endpoint, the key read from the environment variable ``api_key_env``."""

    kind: Literal["hf", "vllm", "openai"] = "hf"
    model: str = "models/tiny/qwen2_vl"  # hf/vllm: dir or hub id; openai: the served model's name
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    base_url: str = ""  # openai: e.g. http://127.0.0.1:8000/v1
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = field(default=60.0, metadata={"rerun": False})
    max_retries: int = field(default=4, metadata={"rerun": False})
    backoff_s: float = field(default=1.0, metadata={"rerun": False})  # doubled per retry, with jitter
    requests_per_s: float = field(default=0.0, metadata={"rerun": False})  # per actor; 0: no limit
    concurrency: int = field(default=8, metadata={"rerun": False})  # openai: requests in flight per actor
    vllm: dict[str, Any] = field(default_factory=dict)  # extra vLLM engine kwargs (max_model_len, ...)
    batch_size: int = field(default=8, metadata={"rerun": False})
    # hf: key/value states of this many shared prompt heads kept per actor (0: off); text LLMs only
    prefix_cache: int = field(default=32, metadata={"rerun": False})
    num_actors: int = field(default=1, metadata={"rerun": False})
    num_cpus: float = field(default=1.0, metadata={"rerun": False})
    num_gpus: float = field(default=0.0, metadata={"rerun": False})
    accelerator_type: str = field(default="", metadata={"rerun": False})  # e.g. A10G, L4, A100 (cluster.yaml)
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={"rerun": False})
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    def __post_init__(self):
        check(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        check(self.batch_size >= 1 and self.num_actors >= 1, "batch_size and num_actors must be >= 1")
        check(self.prefix_cache >= 0, f"prefix_cache must be >= 0, got {self.prefix_cache}")
        check(self.max_retries >= 0 and self.concurrency >= 1, "max_retries >= 0 and concurrency >= 1")
        check(self.kind != "openai" or bool(self.base_url), "kind 'openai' needs base_url")


@dataclass(frozen=True)
class AnnotateConfig:
    """MegaPairs annotation of mined pairs: a VLM describes each pair (``describe``), an LLM writes
    retrieval instructions from the description (``instruct``); outputs are validated, failures rejected
    with the raw text. Bounds are in words."""

    describe: EngineConfig = field(default_factory=EngineConfig)
    instruct: EngineConfig = field(default_factory=EngineConfig)
    word_num: tuple[int, int] = (60, 100)  # the description length asked for, drawn per request
    demonstrations: int = 5  # per instruction prompt, drawn at random from the pool in coral/annotate/data
    # 0: a fresh draw per pair; N: N fixed draws, one picked per pair, so that engines with a prefix cache
    # compute each instruction prompt's head (about 1,000 tokens) once instead of per pair
    demonstration_sets: int = 32
    min_instructions: int = 3  # fewer valid ones: the pair is rejected
    max_instructions: int = 5
    description_words: tuple[int, int] = (20, 200)
    instruction_words: tuple[int, int] = (3, 40)
    english_only: bool = True  # reject text that is not mostly Latin-script words
    max_pairs: int = 0  # per split (train, test, ...): the first mined pairs of each; 0: every mined pair
    seed: int = 0

    def __post_init__(self):
        for name in ("word_num", "description_words", "instruction_words"):
            lo, hi = getattr(self, name)
            check(1 <= lo <= hi, f"{name}: needs 1 <= low <= high, got ({lo}, {hi})")
        check(
            1 <= self.min_instructions <= self.max_instructions,
            "needs 1 <= min_instructions <= max_instructions",
        )
        check(
            min(self.demonstrations, self.demonstration_sets, self.max_pairs) >= 0,
            "demonstrations, demonstration_sets and max_pairs must be >= 0",
        )


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


@dataclass(frozen=True)
class ImportConfig:
    """Training triplets from released datasets: MERIT's conversation JSON (``merit``, with its candidates
    file to map image paths to product ids), MERIT's released queries (``released``), or MegaPairs' JSON
    lines (``megapairs``). Image ids are the paths as written, relative to the queries file's folder; a
    path that resolves outside that folder (``..``, absolute, a symlink out, another URI scheme) and outside
    ``allowed_image_roots`` (absolute local folders or ``s3://bucket[/prefix]``; default none) rejects its
    item with the reason (``coral.paths``)."""

    format: Literal["merit", "released", "megapairs"] = "merit"
    queries: str = ""  # a JSON list or JSON lines file, local or s3://
    candidates: str | None = None  # merit: the candidates file (id, title, image path)
    test_queries: str = ""  # the held-out queries' file (MERIT: queries-test.json): their split is test
    test_candidates: str | None = None  # merit: the held-out candidates file, for its image paths
    allowed_image_roots: tuple[str, ...] = ()  # image paths may also resolve under these (local or s3://)
    split: str = "train"
    test_fraction: float = 0.0  # > 0: each query goes to test with this chance (seeded hash of its id)
    seed: int = 0  # the hash's seed

    def __post_init__(self):
        check(0.0 <= self.test_fraction <= 1.0, f"test_fraction must be in [0, 1], got {self.test_fraction}")
        check_image_roots(self.allowed_image_roots)


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
    deepspeed: str = "cluster/deepspeed/zero2.json"
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
    validation_queries: int = 200  # held-out (test split) queries scored at start and end
    num_workers: int = field(default=2, metadata={"rerun": False})
    cpus_per_worker: float = field(default=1.0, metadata={"rerun": False})
    resources: dict[str, float] = field(default_factory=dict, metadata={"rerun": False})  # custom, per worker
    data_workers: int = field(default=1, metadata={"rerun": False})  # Ray Data actors running the processor
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
            self.gradient_accumulation >= 1 and self.data_workers >= 1,
            "gradient_accumulation, data_workers >= 1",
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


@dataclass(frozen=True)
class IndexStageConfig:
    """The candidate pool embedded with a checkpoint and a FAISS index bound to that checkpoint.

    ``model``: ``train`` (the train stage's export, its retriever kind from the train section) or a dir,
    ``s3://`` URI or hub id of a retriever of kind ``kind``. ``candidates``: the catalog's ``test``
    products (the held-out pool), or ``all``. ``index``: the FAISS index kind (``auto``: exact up to
    ``flat_max`` vectors, IVF above; GPU when faiss-gpu sees one)."""

    model: str = "train"
    kind: Literal["mmret_clip", "mmret_mllm", "coral"] = "coral"  # when model is not "train"
    candidates: Literal["test", "all"] = "test"
    index: IndexConfig = field(default_factory=IndexConfig)
    batch_size: int = 32
    num_actors: int = field(default=1, metadata={"rerun": False})
    num_cpus: float = field(default=1.0, metadata={"rerun": False})
    num_gpus: float = field(default=0.0, metadata={"rerun": False})
    accelerator_type: str = field(default="", metadata={"rerun": False})  # e.g. A10G, L4, A100 (cluster.yaml)
    device: str = field(default="auto", metadata={"rerun": False})
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    def __post_init__(self):
        check(self.batch_size >= 1 and self.num_actors >= 1, "index.batch_size and num_actors must be >= 1")


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


@dataclass(frozen=True)
class DeploymentConfig:
    """One Serve deployment's scale: fixed ``replicas``, or ``autoscaling`` (Serve's keys: min_replicas,
    max_replicas, target_ongoing_requests, ...) when given; Ray resources per replica."""

    replicas: int = 1
    autoscaling: dict[str, Any] = field(default_factory=dict)
    num_cpus: float = 1.0
    num_gpus: float = 0.0  # fractional shares a GPU between replicas
    accelerator_type: str = ""  # e.g. L4: replicas only on nodes with that GPU
    max_ongoing_requests: int = 32

    def __post_init__(self):
        check(self.replicas >= 1 and self.max_ongoing_requests >= 1, "replicas, max_ongoing_requests >= 1")
        check(self.num_cpus >= 0 and self.num_gpus >= 0, "num_cpus and num_gpus must be >= 0")


@dataclass(frozen=True)
class ServeConfig:
    """The retriever behind HTTP (Ray Serve): the run's index and the checkpoint that built it.

    Safe by default: binds ``host`` 127.0.0.1; when the environment variable ``token_env`` is set, every
    route but ``/healthz`` needs ``Authorization: Bearer <its value>``, and on any host but a loopback
    address the app refuses to start without it, unless ``allow_unauthenticated: true`` says so on
    purpose; bodies, parts, image bytes, an image's pixels and a request's (``max_request_pixels``, from
    the images' headers, before any is decoded) are bounded; images come only inline (base64), never as
    URLs. ``batch_size`` and
    ``batch_wait_s``: the query encoder's request batching (1 turns it off); while a batch runs, the
    next one waits until it is predicted to end, else up to ``batch_wait_s`` while requests come
    together; a lone request goes at once (``coral.serve.pacing``).
    ``index_in_encoder``: true: each encoder replica holds the index and searches it itself, and no
    index deployment starts (``serve.index`` unused): one hop fewer a search; false: the index
    deployment (``serve.index``) holds it; "auto" (the default): in the encoder when the index file is
    at most ``index_in_encoder_max_mb`` (each encoder replica holds a copy) and ``serve.index`` asks for
    no GPU, more than one replica or autoscaling, else the deployment (``coral.serve.app.index_layout``).
    ``forever``: keep serving after the stage (``--serve-forever``) instead of shutting down once the
    examples have run."""

    checkpoint: str = ""  # "": the one index.json records; another copy is served only if it matches
    host: str = "127.0.0.1"
    port: int = 8000
    app_name: str = "coral"
    route_prefix: str = "/"
    token_env: str = "CORAL_SERVE_TOKEN"
    allow_unauthenticated: bool = False  # serve a non-loopback host without a token, on purpose
    batch_size: int = 16
    batch_wait_s: float = 0.005
    encoder: DeploymentConfig = field(default_factory=DeploymentConfig)
    index: DeploymentConfig = field(default_factory=lambda: DeploymentConfig(num_cpus=0.25))
    index_in_encoder: bool | Literal["auto"] = "auto"
    index_in_encoder_max_mb: float = 512.0  # "auto": larger indexes get their own deployment
    # room beyond the searches a client may send at once: /healthz and /v1/info are never queued behind
    # them (the work each search brings is bounded by the encoder's max_ongoing_requests and the limits)
    ingress: DeploymentConfig = field(
        default_factory=lambda: DeploymentConfig(num_cpus=0.25, max_ongoing_requests=128)
    )
    max_body_bytes: int = 8 * 2**20
    max_parts: int = 16
    max_text_chars: int = 4000
    max_image_bytes: int = 4 * 2**20
    max_pixels: int = 4096 * 4096  # one image's
    max_request_pixels: int = 4096 * 4096  # a request's images' in all (about 50 MB as RGB)
    max_top_k: int = 100
    examples: int = 3  # held-out queries sent over HTTP by the stage, printed with their top results
    access_log: bool = False  # Serve's line per request and replica (proxy, ingress, encoder, index): CPU
    forever: bool = False
    device: str = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    def __post_init__(self):
        check(1 <= self.port <= 65535, f"serve.port must be in 1..65535, got {self.port}")
        check(self.batch_size >= 1 and self.batch_wait_s >= 0, "serve.batch_size >= 1, batch_wait_s >= 0")
        limits = (self.max_body_bytes, self.max_parts, self.max_text_chars, self.max_image_bytes)
        check(
            min(*limits, self.max_pixels, self.max_request_pixels, self.max_top_k) >= 1,
            "serve limits must be >= 1",
        )
        check(self.route_prefix.startswith("/"), "serve.route_prefix must start with /")
        check(
            self.index_in_encoder in (True, False, "auto") and self.index_in_encoder_max_mb >= 0,
            "serve.index_in_encoder must be true, false or auto; serve.index_in_encoder_max_mb >= 0",
        )


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    catalog: CatalogConfig = field(default_factory=CatalogConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    mine: MineConfig = field(default_factory=MineConfig)
    annotate: AnnotateConfig = field(default_factory=AnnotateConfig)
    merit: MeritConfig = field(default_factory=MeritConfig)
    imports: ImportConfig = field(default_factory=ImportConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    index: IndexStageConfig = field(default_factory=IndexStageConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as YAML, so 3 is an int and [1, 2] a list).

    Secret fields keep the raw string (YAML would turn 0123 into an int or drop text after #), and no
    error message repeats a value."""
    key, sep, raw = text.partition("=")
    keys = key.split(".")
    if not sep or not key or any(not part for part in keys):
        raise ConfigError(f"override '{key[:60]}': expected key.path=value")
    if is_secret(Config, keys):
        return keys, raw
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        raise ConfigError(f"override '{key}': the value is not valid YAML") from None
    return keys, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    data = copy.deepcopy(raw)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{k}' is not a section")
            node = child
        node[keys[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping from a file; errors name the file."""
    source = str(path)
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{source}: config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{source}: cannot read the config file: {type(e).__name__}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(raw).__name__}")
    return raw


def merge(base: dict, overlay: dict) -> dict:
    """``overlay`` over ``base``: mappings merge key by key, any other value (a list too) replaces, and
    ``null`` removes the key (its default applies)."""
    out = copy.deepcopy(base)
    for k, v in overlay.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict):
            out[k] = merge(out[k] if isinstance(out.get(k), dict) else {}, v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    overlays: list[str | Path] | tuple[str | Path, ...] = (),
) -> Config:
    """Load a YAML file (or only defaults when path is None), merge each overlay file over it (``merge``),
    then apply the overrides; ``{name}`` in ``run.run_root`` becomes ``run.name``. Errors name the file."""
    source = str(path) if path is not None else "<defaults>"
    raw: Any = read_yaml(path) if path is not None else {}
    for overlay in overlays:
        raw = merge(raw, read_yaml(overlay))
    if overlays:
        source += " with " + ", ".join(map(str, overlays))
    try:
        raw = apply_overrides(raw, list(overrides))
        run = raw.get("run")
        if isinstance(run, dict) and "{name}" in str(run.get("run_root", "")):
            run["run_root"] = str(run["run_root"]).replace("{name}", str(run.get("name", RunConfig.name)))
        return from_dict(Config, raw)
    except ConfigError as e:
        where = source + (" (with command-line overrides)" if overrides else "")
        raise ConfigError(f"{where}: {e}") from None


def section_dict(section: Any) -> dict:
    """A config section as plain data with secrets redacted: what manifests record."""
    return to_dict(section, redact=True)


def section_hash_dict(section: Any) -> dict:
    """The part of a section that decides whether a stage reruns (resource settings left out)."""
    return to_dict(section, redact=True, for_hash=True)
