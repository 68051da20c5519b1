"""A small HTTP/1.1 load generator on asyncio streams: keep-alive connections, one coroutine a client.

The Serve benchmarks run client and server on the same two cores, so the client's own CPU is taken from
the server. A thread per client with a full HTTP library spends a millisecond or more of CPU a request
on the GIL and its own layers; this spends a fraction of that, so what is measured is the server.
Loopback only; every request has a timeout and every loop a deadline.
"""

from __future__ import annotations

import asyncio
import json
import time
from urllib.parse import urlsplit


class HttpError(Exception):
    pass


class Connection:
    """One keep-alive connection; reconnects after any failure."""

    def __init__(self, url: str, timeout_s: float = 30.0):
        parts = urlsplit(url)
        if parts.hostname not in ("127.0.0.1", "localhost"):
            raise ValueError(f"load only over loopback, got {url}")
        self.host, self.port, self.prefix = parts.hostname, parts.port or 80, parts.path.rstrip("/")
        self.timeout_s, self.reader, self.writer = timeout_s, None, None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
        self.reader = self.writer = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        try:
            return await asyncio.wait_for(self._post(path, body), self.timeout_s)
        except BaseException:
            await self.close()
            raise

    async def _post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (
            f"POST {self.prefix}{path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        status_line = await self.reader.readline()
        if not status_line:
            raise HttpError("connection closed")
        status = int(status_line.split(b" ", 2)[1])
        length, chunked, close = None, False, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding" and "chunked" in value:
                chunked = True
            elif name == "connection" and value == "close":
                close = True
        if chunked:
            data = b""
            while size := int((await self.reader.readline()).split(b";")[0], 16):
                data += await self.reader.readexactly(size)
                await self.reader.readline()
            await self.reader.readline()
        else:
            data = await self.reader.readexactly(length or 0)
        if close:
            await self.close()
        return status, data


def encode(bodies: list[dict]) -> list[bytes]:
    return [json.dumps(b).encode() for b in bodies]


async def _run(url: str, path: str, bodies: list[bytes], clients: int, seconds: float, count: int | None):
    deadline = time.monotonic() + seconds
    latencies, errors = [], []

    async def client(k: int) -> None:
        conn, i = Connection(url), k
        try:
            while time.monotonic() < deadline and (count is None or len(latencies) < count):
                t = time.perf_counter()
                try:
                    status, _ = await conn.post(path, bodies[i % len(bodies)])
                    if status == 200:
                        latencies.append(time.perf_counter() - t)
                    else:
                        errors.append(f"HTTP {status}")
                except (TimeoutError, OSError, HttpError, asyncio.IncompleteReadError, ValueError) as e:
                    errors.append(type(e).__name__)
                    await asyncio.sleep(0.01)  # a refused connection does not spin
                i += clients
        finally:
            await conn.close()

    started = time.monotonic()
    await asyncio.gather(*(client(k) for k in range(clients)))
    return latencies, errors, time.monotonic() - started


def run(
    url: str, path: str, bodies: list[bytes], clients: int, seconds: float, count: int | None = None
) -> tuple[list[float], list[str], float]:
    """``clients`` concurrent keep-alive clients posting ``bodies`` in turn to ``url + path`` until
    ``seconds`` pass (or ``count`` requests succeed): (latencies of the 200s in s, errors, elapsed s)."""
    return asyncio.run(_run(url, path, bodies, clients, seconds, count))
