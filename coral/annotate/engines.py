"""Text generation engines behind one interface: ``generate(prompts) -> list[Generation]``.

``HFEngine`` runs transformers ``generate`` (batched, left padding, the model's chat template; a Qwen-VL
model takes the images, a text model takes the text; on a text model, prompt heads marked as shared are
computed once per actor, see ``coral.annotate.prefix``). ``OpenAIEngine`` calls any OpenAI-compatible
``/chat/completions`` endpoint with a request rate limit, timeouts, and retries with exponential backoff
and jitter. vLLM runs through ``ray.data.llm`` instead (see ``coral.annotate.vllm``), since it owns its
own batching. A failed request is a Generation with an ``error``, never an exception, so a stage can
reject the row and go on.
"""

from __future__ import annotations

import base64
import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from coral import net
from coral.annotate import prefix
from coral.config import EngineConfig
from coral.device import pick, to_model
from coral.errors import ConfigError
from coral.images import decode_image
from coral.models import loader

VLM_TYPES = ("qwen2_vl", "qwen2_5_vl")
RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


@dataclass
class Generation:
    text: str | None
    error: str | None = None
    attempts: int = 1


def image_parts(prompt: list[dict]) -> list[bytes]:
    return [p["image"] for m in prompt for p in m["content"] if p["type"] == "image"]


def mime(data: bytes) -> str:
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:3] == b"GIF":
        return "image/gif"
    return "image/png"


def openai_messages(prompt: list[dict]) -> list[dict]:
    """Our prompt -> OpenAI chat messages, images inlined as data URLs."""
    out = []
    for m in prompt:
        parts = []
        for p in m["content"]:
            if p["type"] == "text":
                parts.append({"type": "text", "text": p["text"]})
            else:
                url = f"data:{mime(p['image'])};base64,{base64.b64encode(p['image']).decode()}"
                parts.append({"type": "image_url", "image_url": {"url": url}})
        out.append({"role": m["role"], "content": parts})
    return out


class HFEngine:
    """transformers ``generate`` over a batch of prompts; the model loads once (per Ray actor)."""

    def __init__(self, cfg: EngineConfig):
        import torch

        self.cfg, self.torch = cfg, torch
        self.device = pick(cfg.device)
        self.vlm = loader.model_type(cfg.model) in VLM_TYPES
        if self.vlm:
            self.processor = loader.load_processor(cfg.model)
            self.tokenizer = self.processor.tokenizer
            self.model = loader.load_model(cfg.model, self.device, cfg.dtype)
        else:
            self.processor = self.tokenizer = loader.load_tokenizer(cfg.model)
            self.model = loader.load_causal_lm(cfg.model, self.device, cfg.dtype)
        self.tokenizer.padding_side = "left"  # generation continues from the right end of every row
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.prefixes = None
        self.reserve = prefix.supported(self.model)  # full attention only: a window would trim the cache
        if cfg.prefix_cache and not self.vlm and self.reserve:
            self.prefixes = prefix.PrefixCache(self.model, cfg.prefix_cache)
            self.model.set_attn_implementation(prefix.register())  # SDPA but for batches with shared heads

    def _template(self, prompt: list[dict]) -> str:
        if self.vlm:
            msgs = [
                {
                    "role": m["role"],
                    "content": [{"type": "image"} if p["type"] == "image" else p for p in m["content"]],
                }
                for m in prompt
            ]
        else:  # a text model: the text parts, joined
            msgs = [
                {
                    "role": m["role"],
                    "content": "\n".join(p["text"] for p in m["content"] if p["type"] == "text"),
                }
                for m in prompt
            ]
        return self.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)

    def _split(self, prompt: list[dict]) -> tuple[str, str] | None:
        """The templated prompt cut after its last shared-head part (before the part's trailing white space,
        which would tokenize with what follows), or None without one."""
        heads = [p["text"] for m in prompt for p in m["content"] if p.get("prefix")]
        if not heads:
            return None
        full = self._template(prompt)
        start = full.find(heads[-1])
        end = start + len(heads[-1].rstrip())
        return None if start < 0 else (full[:end], full[end:])

    def _generate(self, cache=None, **inputs):
        sample = self.cfg.temperature > 0
        if cache is None and self.reserve:
            cache = prefix.reserved_cache(self.model, self.cfg.max_new_tokens)
        if cache is not None:
            inputs["past_key_values"] = cache
        with self.torch.inference_mode():
            out = self.model.generate(
                **inputs,
                max_new_tokens=self.cfg.max_new_tokens,
                do_sample=sample,
                temperature=self.cfg.temperature if sample else None,
                top_p=None,
                top_k=None,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        new = out[:, inputs["input_ids"].shape[1] :]
        return [Generation(t) for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    def _generate_cached(self, splits: list[tuple[str, str]]) -> list[Generation]:
        encode = self.tokenizer([t for s in splits for t in s], add_special_tokens=False)["input_ids"]
        heads, tails = [tuple(h) for h in encode[0::2]], encode[1::2]
        ids, mask, groups = prefix.assemble(heads, tails, self.tokenizer.pad_token_id)
        states = {h: self.prefixes.get(h) for h, _ in groups}
        cache = prefix.prefill_tails(self.model, heads, tails, states, self.cfg.max_new_tokens)
        rows = [r.to(self.device) for _, r in groups]
        with prefix.sharing(self.model, [states[h] for h, _ in groups], rows):
            inputs = to_model({"input_ids": ids, "attention_mask": mask}, self.model)
            return self._generate(cache, **inputs)

    def generate(self, prompts: list[list[dict]]) -> list[Generation]:
        if not prompts:
            return []
        if self.prefixes is not None:
            splits = [self._split(p) for p in prompts]
            if all(splits):
                return self._generate_cached(splits)
        texts = [self._template(p) for p in prompts]
        kwargs = {"text": texts, "return_tensors": "pt", "padding": True}
        if self.vlm:
            images = [decode_image(b) for p in prompts for b in image_parts(p)]
            if images:
                kwargs["images"] = images
        batch = (
            self.processor(**kwargs) if self.vlm else self.tokenizer(texts, return_tensors="pt", padding=True)
        )
        return self._generate(**to_model(batch, self.model))


class RateLimiter:
    """At most ``per_s`` request starts per second (0: no limit), shared by the threads of one actor."""

    def __init__(self, per_s: float):
        self.interval = 1.0 / per_s if per_s > 0 else 0.0
        self.next = 0.0
        self.lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next)
            self.next = start + self.interval
        time.sleep(max(0.0, start - now))


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is answered as the error it is: following it would send the key to wherever it points."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class OpenAIEngine:
    """Chat completions from an OpenAI-compatible endpoint, ``concurrency`` requests in flight."""

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self.key = os.environ.get(cfg.api_key_env, "")
        if self.key and not net.key_stays_private(self.url):
            raise ConfigError(
                f"base_url {cfg.base_url}: plain http to a host that is not this machine's own would send "
                f"the key from {cfg.api_key_env} in the clear; use https, or a loopback address"
            )
        self.limiter = RateLimiter(cfg.requests_per_s)
        self.pool = ThreadPoolExecutor(max_workers=cfg.concurrency)
        self.opener = urllib.request.build_opener(_NoRedirects)

    def generate(self, prompts: list[list[dict]]) -> list[Generation]:
        return list(self.pool.map(self.complete, prompts))

    def _post(self, body: bytes) -> tuple[int, bytes, float | None]:
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with self.opener.open(req, timeout=self.cfg.timeout_s) as resp:
                return resp.status, resp.read(), None
        except urllib.error.HTTPError as e:
            retry_after = e.headers.get("Retry-After") if e.headers else None
            try:
                wait = float(retry_after) if retry_after is not None else None
            except ValueError:
                wait = None
            return e.code, e.read() or b"", wait

    def complete(self, prompt: list[dict]) -> Generation:
        body = {
            "model": self.cfg.model,
            "messages": openai_messages(prompt),
            "max_tokens": self.cfg.max_new_tokens,
            "temperature": self.cfg.temperature,
        }
        data = json.dumps(body).encode()
        error, wait = "no attempt", None
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                time.sleep(self._backoff(attempt, wait))
            self.limiter.wait()
            wait = None
            try:
                status, payload, wait = self._post(data)
            except (TimeoutError, urllib.error.URLError, ConnectionError, OSError) as e:
                reason = getattr(e, "reason", e)
                error = f"request failed: {type(reason).__name__}"
                continue
            if status != 200:
                error = f"HTTP {status}"
                if status in RETRY_STATUS:
                    continue
                return Generation(None, error, attempt + 1)
            try:
                text = json.loads(payload)["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError):
                error = "malformed response body"
                continue
            if not isinstance(text, str):
                error = "response without text content"
                continue
            return Generation(text, None, attempt + 1)
        return Generation(
            None, f"{error} after {self.cfg.max_retries + 1} attempts", self.cfg.max_retries + 1
        )

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, 60.0)
        return self.cfg.backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)


def make_engine(cfg: EngineConfig):
    if cfg.kind == "hf":
        return HFEngine(cfg)
    if cfg.kind == "openai":
        return OpenAIEngine(cfg)
    raise ValueError(
        f"engine kind {cfg.kind!r} runs through ray.data.llm, not in an actor (coral.annotate.vllm)"
    )
