"""An OpenAI-compatible chat-completions server over a tiny local model, with scheduled faults, for tests.

    python -m tests.servers.openai_server --model models/tiny/qwen2_vl --port 8011 \\
        --faults "500:3,429:5,timeout:7,malformed:11,empty:13"

It binds 127.0.0.1 only. Clients under test talk real HTTP to a real ``generate``; the model is random, so
tests assert on structure, never on content. Qwen2-VL / Qwen2.5-VL dirs get the images (through the
project's image-only processor); any other causal LM gets the text parts, and its images are only decoded
(to prove they are valid) and counted in ``usage.image_count``.

Fault spec: comma-separated ``KIND:K`` rules; request number n (1-based, counted over authorised
POST /v1/chat/completions) takes the first rule, in listed order, with ``n % K == 0``. KIND is

- an HTTP status 400-599: that status with an OpenAI error body (429 also sends ``Retry-After: 0``);
- ``timeout``: sleep ``--timeout-sleep`` seconds (30) before answering normally;
- ``malformed``: 200 with a body that is not JSON;
- ``empty``: 200 with a well-formed completion whose ``message.content`` is null.

GET /v1/stats (no token needed) returns the count per outcome and the outcome of every request number.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from fastapi import Request  # module level: FastAPI resolves the string annotations of endpoints here

REPO = Path(__file__).resolve().parents[2]
MAX_NEW_TOKENS = 64
NAMED_FAULTS = ("timeout", "malformed", "empty")
VL_TYPES = ("qwen2_vl", "qwen2_5_vl")
TOKEN_ENV = "OPENAI_SERVER_TOKEN"


@dataclass(frozen=True)
class Fault:
    kind: str  # "500", "429", ..., "timeout", "malformed", "empty"
    every: int


def parse_faults(spec: str | None) -> tuple[Fault, ...]:
    """``"500:3,timeout:7"`` -> rules in listed order; ValueError names the bad rule."""
    rules = []
    for item in filter(None, (s.strip() for s in (spec or "").split(","))):
        kind, sep, every = item.partition(":")
        ok_kind = kind in NAMED_FAULTS or (kind.isdigit() and 400 <= int(kind) <= 599)
        if not sep or not ok_kind or not every.isdigit() or int(every) < 1:
            raise ValueError(
                f"bad fault rule {item!r}: want KIND:K with K >= 1 and KIND an HTTP status 400-599 "
                f"or one of {NAMED_FAULTS}"
            )
        rules.append(Fault(kind, int(every)))
    return tuple(rules)


def fault_for(n: int, faults: tuple[Fault, ...]) -> str | None:
    return next((f.kind for f in faults if n % f.every == 0), None)


class Ledger:
    """Numbers requests and records their outcomes; shared by the event loop and the generation threads."""

    def __init__(self, faults: tuple[Fault, ...]):
        self.faults, self._lock, self._n = faults, threading.Lock(), 0
        self.counts: dict[str, int] = {}
        self.log: list[dict[str, Any]] = []

    def take(self) -> tuple[int, str | None]:
        with self._lock:
            self._n += 1
            return self._n, fault_for(self._n, self.faults)

    def record(self, n: int | None, outcome: str) -> None:
        with self._lock:
            self.counts[outcome] = self.counts.get(outcome, 0) + 1
            if n is not None:
                self.log.append({"n": n, "outcome": outcome})

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"requests": self._n, "outcomes": dict(self.counts), "log": sorted(self.log, key=_n)}


def _n(entry: dict[str, Any]) -> int:
    return entry["n"]


class BadRequest(ValueError):
    pass


def decode_data_url(url: str):
    """``data:image/...;base64,...`` -> RGB PIL image; only data URLs, since the server has no network."""
    from coral.images import decode_image

    head, sep, payload = url.partition(",")
    if not (url.startswith("data:image/") and sep and head.endswith(";base64")):
        raise BadRequest("image_url.url must be a data:image/...;base64, URL")
    try:
        data = base64.b64decode(payload, validate=True)
        return decode_image(data, max_pixels=4096 * 4096)
    except (binascii.Error, ValueError) as e:
        raise BadRequest(f"invalid image: {e}") from None


def parse_messages(messages: Any) -> tuple[list[dict[str, Any]], list]:
    """OpenAI messages -> (template messages with ``{"type": "image"}`` placeholders, decoded images)."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list")
    out, images = [], []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise BadRequest("each message needs a role of system, user or assistant")
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": m["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise BadRequest("message content must be a string or a list of parts")
        parts = []
        for p in content:
            kind = p.get("type") if isinstance(p, dict) else None
            if kind == "text" and isinstance(p.get("text"), str):
                parts.append({"type": "text", "text": p["text"]})
            elif kind == "image_url" and isinstance(p.get("image_url"), dict):
                images.append(decode_data_url(str(p["image_url"].get("url", ""))))
                parts.append({"type": "image"})
            else:
                raise BadRequest(f"unsupported content part: {str(p)[:80]}")
        out.append({"role": m["role"], "content": parts})
    return out, images


class ChatModel:
    """The model, its tokenizer (and processor for VL dirs) and one lock: ``generate`` runs one at a time."""

    def __init__(self, model_dir: str):
        from coral.models import loader

        self.kind = loader.model_type(model_dir)
        self.lock = threading.Lock()
        if self.kind in VL_TYPES:
            self.processor = loader.load_processor(model_dir)
            self.tokenizer = self.processor.tokenizer
            self.model = loader.load_model(model_dir)
        else:
            from transformers import AutoModelForCausalLM

            self.processor, self.tokenizer = None, loader.load_tokenizer(model_dir)
            self.model = AutoModelForCausalLM.from_pretrained(loader.resolve(model_dir)).eval()
        if not self.tokenizer.chat_template:
            raise ValueError(f"{model_dir}: the tokenizer has no chat template")

    def complete(self, messages, images, max_new_tokens: int, temperature: float, seed: int | None):
        """-> (text, prompt_tokens, completion_tokens, finish_reason)."""
        import torch

        if self.processor is not None:
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            batch = self.processor(text=[text], images=images or None, return_tensors="pt")
        else:  # a text model: images were validated and counted, the template sees the text parts only
            flat = [
                m if isinstance(m["content"], str) else {**m, "content": _text_of(m["content"])}
                for m in messages
            ]
            text = self.tokenizer.apply_chat_template(flat, add_generation_prompt=True, tokenize=False)
            batch = self.tokenizer([text], return_tensors="pt")
        sample = temperature > 0
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=sample)
        if sample:
            kwargs["temperature"] = temperature
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        with self.lock, torch.inference_mode():
            if seed is None:
                seed = time.time_ns() % 2**31 if sample else 0
            torch.manual_seed(seed)
            out = self.model.generate(**batch, **kwargs, pad_token_id=self.tokenizer.pad_token_id)
        prompt = batch["input_ids"].shape[1]
        new = out[0, prompt:].tolist()
        stopped = bool(new) and new[-1] in eos
        finish = "length" if len(new) >= max_new_tokens and not stopped else "stop"
        return self.tokenizer.decode(new, skip_special_tokens=True), prompt, len(new), finish


def _text_of(parts: list[dict[str, Any]]) -> str:
    return "".join(p.get("text", "") for p in parts)


def _error(
    status: int, message: str, kind: str, headers: dict[str, str] | None = None, code: str | None = None
):
    from fastapi.responses import JSONResponse

    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def build_app(model_dir: str, faults: tuple[Fault, ...] = (), timeout_sleep_s: float = 30.0):
    from fastapi import FastAPI
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import Response

    chat, ledger = ChatModel(model_dir), Ledger(faults)
    name, created = Path(model_dir).name, int(time.time())
    token = os.environ.get(TOKEN_ENV)
    app = FastAPI(title="coral test OpenAI server")

    def authorised(request: Request) -> bool:
        return not token or request.headers.get("authorization") == f"Bearer {token}"

    @app.get("/v1/models")
    async def models(request: Request):
        if not authorised(request):
            return _error(401, "invalid or missing bearer token", "invalid_request_error")
        card = {"id": name, "object": "model", "created": created, "owned_by": "coral-tests"}
        return {"object": "list", "data": [card]}

    @app.get("/v1/stats")
    async def stats():
        return {**ledger.stats(), "faults": [f"{f.kind}:{f.every}" for f in faults]}

    @app.post("/v1/chat/completions")
    async def completions(request: Request):
        if not authorised(request):
            ledger.record(None, "unauthorized")
            return _error(401, "invalid or missing bearer token", "invalid_request_error")
        n, fault = ledger.take()
        if fault and fault.isdigit():
            ledger.record(n, fault)
            status, message = int(fault), f"scheduled fault {fault} on request {n}"
            if status == 429:
                return _error(status, message, "requests", {"Retry-After": "0"}, "rate_limit_exceeded")
            return _error(status, message, "server_error" if status >= 500 else "invalid_request_error")
        if fault == "malformed":
            ledger.record(n, fault)
            return Response('{"id": "chatcmpl-broken", "choices": [{"mess', media_type="application/json")
        if fault == "timeout":
            ledger.record(n, fault)
            await asyncio.sleep(timeout_sleep_s)
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise BadRequest("the body must be a JSON object")
            messages, images = parse_messages(body.get("messages"))
            limit = body.get("max_completion_tokens", body.get("max_tokens")) or MAX_NEW_TOKENS
            max_new = max(1, min(int(limit), MAX_NEW_TOKENS))
            temperature, seed = float(body.get("temperature") or 0.0), body.get("seed")
            seed = None if seed is None else int(seed)
        except (BadRequest, ValueError, TypeError) as e:
            ledger.record(n, "bad_request")
            return _error(400, str(e), "invalid_request_error")
        if fault == "empty":
            ledger.record(n, fault)
            text, prompt, done, finish = None, 0, 0, "stop"
        else:
            text, prompt, done, finish = await run_in_threadpool(
                chat.complete, messages, images, max_new, temperature, seed
            )
            if fault is None:
                ledger.record(n, "ok")
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": name,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            ],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": done,
                "total_tokens": prompt + done,
                "image_count": len(images),
            },
        }

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a local model dir (see coral.testing.tiny)")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1", choices=["127.0.0.1"], help="loopback only")
    ap.add_argument("--faults", default=None, help='e.g. "500:3,429:5,timeout:7,malformed:11,empty:13"')
    ap.add_argument("--timeout-sleep", type=float, default=30.0, help="seconds a timeout fault sleeps")
    args = ap.parse_args(argv)
    app = build_app(args.model, parse_faults(args.faults), args.timeout_sleep)
    # A timeout fault may still be sleeping at shutdown; do not wait it out.
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    model_dir: str | Path,
    faults: str | None = None,
    timeout_s: float = 60,
    token: str | None = None,
    timeout_sleep_s: float = 30.0,
) -> tuple[str, subprocess.Popen]:
    """Launch the server as a subprocess on a free 127.0.0.1 port; return (base URL ending in /v1, process)
    once GET /v1/models answers 200. ``token`` sets OPENAI_SERVER_TOKEN for the server (else inherited)."""
    parse_faults(faults)  # fail here, not in the child
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if token is not None:
        env[TOKEN_ENV] = token
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "tests.servers.openai_server",
        "--model",
        str(model_dir),
        "--port",
        str(port),
    ]
    cmd += ["--timeout-sleep", str(timeout_sleep_s)] + (["--faults", faults] if faults else [])
    log = tempfile.NamedTemporaryFile(prefix="openai_server-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    proc.log_path = log.name  # type: ignore[attr-defined]
    log.close()
    base = f"http://127.0.0.1:{port}/v1"
    headers = {"Authorization": f"Bearer {env[TOKEN_ENV]}"} if env.get(TOKEN_ENV) else {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = _tail(proc)
            stop_server(proc)
            raise RuntimeError(f"openai_server exited with {proc.returncode}:\n{tail}")
        try:
            if httpx.get(f"{base}/models", headers=headers, timeout=1.0).status_code == 200:
                return base, proc
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    tail = _tail(proc)
    stop_server(proc)
    raise RuntimeError(f"openai_server not ready after {timeout_s}s:\n{tail}")


def _tail(proc: subprocess.Popen, chars: int = 4000) -> str:
    path = getattr(proc, "log_path", None)
    return Path(path).read_text(errors="replace")[-chars:] if path and Path(path).exists() else ""


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM, wait up to 10 s, then SIGKILL; removes the server's log file."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    path = getattr(process, "log_path", None)
    if path:
        Path(path).unlink(missing_ok=True)


if __name__ == "__main__":
    main()
