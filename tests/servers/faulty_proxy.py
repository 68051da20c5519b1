"""An S3 endpoint that misbehaves, for tests: a threaded HTTP proxy on 127.0.0.1 in front of a real one
(moto) that, seeded, answers a share of requests with ``503 SlowDown`` and resets connections.

    proxy = FaultyProxy("http://127.0.0.1:5000", rate=0.15, seed=7).start()   # proxy.url, proxy.stats
    ...
    proxy.stop()

Faults, drawn per request:

- ``slowdown``: the request is read, then answered ``503`` with S3's ``SlowDown`` error body;
- ``reset`` (share ``reset_share`` of the faults): the connection is reset mid-request (headers read, body
  not), so the server never sees it;
- ``lost`` (share ``lost_share``): the request reaches the server, then the connection is reset instead of
  the reply, so the client does not know it was applied (its retry must be idempotent).

Which requests fail does not depend on timing or threads: the n-th request to a key (method, path and
query names, random ids left out) draws from a hash of (seed, key, n). A drawn fault repeats
``1..max_burst`` times in a row on that key, the way throttling persists a while, so a client that gives
up after one retry fails; then one request to that key goes through. ``script`` ("METHOD path-suffix" ->
outcomes) sets the first outcomes of the requests with that method whose key ends so, e.g. ``{"PUT /bucket/run/_lease.json":
["lost"]}``; ``proxy.events`` lists every request's key and outcome.
"""

from __future__ import annotations

import hashlib
import http.client
import re
import socket
import struct
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>faulty-proxy</RequestId></Error>"
)
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "te", "upgrade"}


class FaultyProxy:
    def __init__(
        self,
        upstream: str,
        rate: float = 0.15,
        seed: int = 0,
        max_burst: int = 3,
        reset_share: float = 0.3,
        lost_share: float = 0.1,
        script: dict[str, list[str]] | None = None,
    ):
        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.rate, self.seed, self.max_burst = rate, seed, max_burst
        self.reset_share, self.lost_share = reset_share, lost_share
        self.stats: Counter[str] = Counter()
        self.events: list[tuple[str, str]] = []  # (key, outcome) in arrival order
        self._visits: Counter[str] = Counter()
        self._queued: dict[str, list[str | None]] = {}  # the next outcomes on a key, in a burst
        self._script = {k: list(v) for k, v in (script or {}).items()}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.proxy = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FaultyProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    @staticmethod
    def key(method: str, path: str) -> str:
        """What a request is, for the draws: method, path and query names, without the random parts (an
        upload id, a uuid in a name), so a run draws the same faults each time."""
        path, _, query = path.partition("?")
        names = sorted(q.split("=", 1)[0] for q in query.split("&") if q)
        return f"{method} {re.sub(r'[0-9a-f]{12,}', '*', path)}" + ("?" + "&".join(names) if names else "")

    def draw(self, method: str, path: str) -> str | None:
        """The fault for this request (``slowdown``, ``reset``, ``lost``) or None to forward it."""
        key = self.key(method, path)
        with self._lock:
            self.stats["requests"] += 1
            scripted = [v for k, v in self._script.items() if _matches(key, k) and v]
            if scripted:
                kind = scripted[0].pop(0)
            elif self._queued.get(key):
                kind = self._queued[key].pop(0)
            else:
                self._visits[key] += 1
                h = hashlib.sha256(f"{self.seed}|{key}|{self._visits[key]}".encode()).digest()
                u, v = int.from_bytes(h[:8], "big") / 2**64, int.from_bytes(h[8:16], "big") / 2**64
                kind = None
                if u < self.rate:
                    kind = (
                        "lost"
                        if v < self.lost_share
                        else "reset"
                        if v < self.lost_share + self.reset_share
                        else "slowdown"
                    )
                    # the rest of the burst, then one request through: a burst never runs into the next
                    self._queued[key] = [kind] * (h[16] % self.max_burst) + [None]
            self.stats[kind or "forwarded"] += 1
            self.events.append((key, kind or "forwarded"))
            return kind


def _matches(key: str, rule: str) -> bool:
    """``rule`` is "METHOD path-suffix": the same method, and the key's path (with query names) ends so."""
    method, _, suffix = rule.partition(" ")
    return key.startswith(f"{method} ") and key.endswith(suffix)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    upstream: http.client.HTTPConnection | None = None

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass

    def do_GET(self):
        self._proxy()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    def _proxy(self) -> None:
        proxy: FaultyProxy = self.server.proxy  # type: ignore[attr-defined]
        fault = proxy.draw(self.command, self.path)
        if fault == "reset":
            return self._reset()
        body = self._read_body()
        if fault == "slowdown":
            return self._reply(503, [("Content-Type", "application/xml")], SLOWDOWN)
        status, headers, data = self._forward(proxy, body)
        if fault == "lost":
            return self._reset()
        self._reply(status, headers, data)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline().strip():  # trailers, then the blank line
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self, proxy: FaultyProxy, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        for attempt in range(2):  # a kept-alive upstream connection may have been closed by the server
            if self.upstream is None:
                self.upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
            try:
                self.upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for name, value in self.headers.items():
                    if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                        self.upstream.putheader(name, value)
                if body or "Content-Length" in self.headers or "Transfer-Encoding" in self.headers:
                    self.upstream.putheader("Content-Length", str(len(body)))
                self.upstream.endheaders(body or None)
                response = self.upstream.getresponse()
                data = response.read()
                headers = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP]
                return response.status, headers, data
            except (http.client.HTTPException, OSError):
                self.upstream.close()
                self.upstream = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _reply(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
        self.send_response_only(status)
        for name, value in headers:
            if name.lower() != "content-length" or self.command == "HEAD":
                self.send_header(name, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD" and data:
            self.wfile.write(data)

    def _reset(self) -> None:
        """Close with SO_LINGER 0: the client sees a connection reset, not a clean close."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.rfile.close()
            self.wfile.close()
            self.connection.close()
        except OSError:
            pass

    def handle(self) -> None:
        try:
            super().handle()
        except (OSError, ValueError):  # the connection this handler reset
            pass

    def finish(self) -> None:
        try:
            super().finish()
        except (OSError, ValueError):
            pass
        if self.upstream is not None:
            self.upstream.close()
