"""The ``annotate`` section and the text-generation engine each of its steps (and merit's) runs on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from coral.config.resources import Resources
from coral.typed import check


@dataclass(frozen=True)
class EngineConfig(Resources):
    """A text generator for one annotation step; its actors' number and placement: ``Resources``.

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

    def __post_init__(self):
        super().__post_init__()
        check(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
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
