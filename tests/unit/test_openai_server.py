"""The test OpenAI server: real HTTP on 127.0.0.1 over a tiny random Qwen2-VL, then its fault schedule."""

from __future__ import annotations

import base64
import io

import httpx
import pytest
from PIL import Image

from tests.servers.openai_server import fault_for, parse_faults, start_server, stop_server

TOKEN = "test-token-not-secret"
FAULTS = "500:3,429:5,timeout:7,malformed:11,empty:13"


@pytest.fixture(scope="module")
def model_dir(tiny_models):
    """The session's tiny Qwen2-VL: built once for the whole run, not again here."""
    return tiny_models["qwen2_vl"]


@pytest.fixture(scope="module")
def server(model_dir):
    """A fault-free server that wants a bearer token; yields its base URL (ending in /v1)."""
    base, proc = start_server(model_dir, token=TOKEN)
    yield base
    stop_server(proc)


def data_url(color=(200, 30, 30), size=(40, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat(base: str, content, token: str | None = TOKEN, timeout: float = 10.0, **extra) -> httpx.Response:
    body = {"model": "qwen2_vl", "messages": [{"role": "user", "content": content}], **extra}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(f"{base}/chat/completions", json=body, headers=headers, timeout=timeout)


def assert_completion(body: dict, max_tokens: int) -> None:
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-") and isinstance(body["created"], int)
    assert body["model"] == "qwen2_vl"
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] in ("stop", "length")
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 and 1 <= usage["completion_tokens"] <= max_tokens
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_fault_spec_grammar():
    rules = parse_faults(FAULTS)
    assert [(f.kind, f.every) for f in rules][:2] == [("500", 3), ("429", 5)]
    assert [fault_for(n, rules) for n in (1, 3, 5, 7, 11, 13, 15, 21)] == [
        None,
        "500",
        "429",
        "timeout",
        "malformed",
        "empty",
        "500",  # 15: 500 is listed before 429, first match wins
        "500",
    ]
    assert parse_faults(None) == parse_faults("") == ()
    for bad in ("500", "teapot:3", "500:0", "200:2", "timeout:x"):
        with pytest.raises(ValueError, match="bad fault rule"):
            parse_faults(bad)


@pytest.mark.timeout(120)
def test_text_and_image_completions_have_the_openai_shape(server):
    models = httpx.get(f"{server}/models", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["qwen2_vl"]

    text = chat(server, "Describe:", max_tokens=8)
    assert text.status_code == 200, text.text
    assert_completion(text.json(), max_tokens=8)
    assert text.json()["usage"]["image_count"] == 0

    parts = [{"type": "text", "text": "Describe:"}, {"type": "image_url", "image_url": {"url": data_url()}}]
    image = chat(server, parts, max_completion_tokens=200, temperature=0.8, seed=7)
    assert image.status_code == 200, image.text
    assert_completion(image.json(), max_tokens=64)  # capped server-side
    assert image.json()["usage"]["image_count"] == 1
    # same text plus the image: <|vision_start|>, one <|image_pad|> per merged patch, <|vision_end|>
    assert image.json()["usage"]["prompt_tokens"] >= text.json()["usage"]["prompt_tokens"] + 3
    again = chat(server, parts, max_completion_tokens=200, temperature=0.8, seed=7).json()
    assert again["choices"][0]["message"] == image.json()["choices"][0]["message"]  # seeded sampling


@pytest.mark.timeout(120)
def test_wrong_or_missing_token_gets_401_and_bad_bodies_get_400(server):
    for token in ("wrong", None):
        r = chat(server, "hi", token=token)
        assert r.status_code == 401 and "error" in r.json()
    assert httpx.get(f"{server}/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    remote = [{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]
    broken = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]
    for content in (remote, broken, [{"type": "audio"}]):
        r = chat(server, content)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    outcomes = httpx.get(f"{server}/stats").json()["outcomes"]
    assert outcomes["unauthorized"] == 2 and outcomes["bad_request"] == 3


@pytest.mark.timeout(120)
def test_faults_arrive_at_their_scheduled_request_numbers(model_dir):
    base, proc = start_server(model_dir, faults=FAULTS)
    try:
        seen = {}
        for n in range(1, 15):
            try:
                r = chat(base, "hi", token=None, timeout=2.0, max_tokens=4)
            except httpx.ReadTimeout:
                seen[n] = "timeout"
                continue
            if r.status_code != 200:
                seen[n] = str(r.status_code)
                if r.status_code == 429:
                    assert r.headers["retry-after"] == "0"
                continue
            try:
                body = r.json()
            except ValueError:
                seen[n] = "malformed"
                continue
            seen[n] = "empty" if body["choices"][0]["message"]["content"] is None else "ok"
            if seen[n] == "ok":
                assert_completion(body, max_tokens=4)
        expected = {3: "500", 5: "429", 6: "500", 7: "timeout", 9: "500", 10: "429", 11: "malformed"}
        expected |= {12: "500", 13: "empty", 14: "timeout"}
        assert seen == {n: expected.get(n, "ok") for n in range(1, 15)}
        stats = httpx.get(f"{base}/stats").json()
        assert stats["requests"] == 14
        assert {e["n"]: e["outcome"] for e in stats["log"]} == seen
        assert stats["outcomes"] == {"ok": 4, "500": 4, "429": 2, "timeout": 2, "malformed": 1, "empty": 1}
    finally:
        stop_server(proc)
