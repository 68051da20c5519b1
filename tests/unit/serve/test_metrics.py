"""The app's metrics without Ray: the route label, and the ingress middleware that counts every response,
refusals by the body limit, the token check and validation included."""

from __future__ import annotations

import asyncio

import pytest

from coral.serve import api, http
from coral.serve.metrics import EncoderMetrics, HttpMetrics, route_of
from tests.unit.serve.test_api import LIMITS


def test_a_route_label_is_a_known_route_without_the_prefix_or_other():
    assert route_of({"path": "/v1/search", "root_path": ""}) == "/v1/search"
    assert route_of({"path": "/split/v1/embeddings", "root_path": "/split"}) == "/v1/embeddings"
    assert route_of({"path": "/v1/embeddings"}) == "/v1/embeddings"
    assert route_of({"path": "/wp-admin/x.php", "root_path": ""}) == "other"  # no label per probe


def test_recording_works_without_ray_and_a_zero_count_is_skipped():
    """Ray's counters refuse an increment of 0: a batch without refusals must not send one."""
    EncoderMetrics().batch([0.001, 0.002], 0.05, {"searched": 2, "embedded": 0, "refused": 0})
    EncoderMetrics().in_flight(3)
    HttpMetrics().request("/v1/search", 422, 0.01)


class Recorder:
    def __init__(self):
        self.seen: list[tuple[str, int]] = []

    def request(self, route: str, status: int, seconds: float) -> None:
        assert seconds >= 0
        self.seen.append((route, status))


async def answer(scope, receive, send, status=200):
    await receive()
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


def call(app, path: str, body: bytes = b"{}") -> None:
    scope = {
        "type": "http",
        "path": path,
        "root_path": "",
        "headers": [(b"content-length", str(len(body)).encode())],
    }

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(_):
        pass

    asyncio.run(app(scope, receive, send))


def test_the_middleware_counts_answers_and_refusals_outside_the_body_limit(monkeypatch):
    recorder = Recorder()
    monkeypatch.setattr(http.app.state, "metrics", recorder, raising=False)
    monkeypatch.setattr(http.app.state, "limits", LIMITS, raising=False)  # 1000 bytes a body
    app = http.Measured(http.BodyLimit(answer))
    call(app, "/v1/search")
    call(app, "/v1/embeddings", b"x" * 2000)  # refused by the body limit before the app
    call(http.Measured(lambda *a: answer(*a, status=401)), "/v1/info")

    async def broken(scope, receive, send):
        raise api.ApiError(500, "boom")

    with pytest.raises(api.ApiError):
        call(http.Measured(broken), "/nope")
    assert recorder.seen == [("/v1/search", 200), ("/v1/embeddings", 413), ("/v1/info", 401), ("other", 500)]


def test_without_metrics_the_middleware_only_passes_through(monkeypatch):
    monkeypatch.setattr(http.app.state, "metrics", None, raising=False)
    call(http.Measured(answer), "/v1/search")  # no replica configured it: nothing recorded, no error
