"""Load on a served app for the serve benchmarks, over HTTP (``http_load``): single queries one at a
time interleaved with the same work in process (``sequential``), concurrent clients (``load``), bursts on
each app in turn (``alternating``), and latency quantiles (``ms``)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
from collections.abc import Callable

import numpy as np

from benchmarks import http_load
from benchmarks.common import RUNS

CLIENTS, SEQUENTIAL, ROUND = 16, 300, 10
BURSTS = RUNS  # a batching run: one burst with it on, then one with it off
IDLE_S = 0.005  # about how long the encoder replica sits idle between a sequential client's requests


def sequential(
    urls: dict[str, str], local: Callable[[dict], float], queries: list[dict], count: int = SEQUENTIAL
) -> dict[str, list[float]]:
    """``count`` queries one at a time down each path (each URL, and in process), interleaved in
    rounds of ``ROUND`` so that a change in the machine's speed falls on every path alike. The in-process
    call also runs after ``IDLE_S`` of sleep (``in_process_idle``): the served model starts after its
    process sat idle while the request crossed HTTP and a hop, and on this VM a core that slept runs
    the same call slower."""
    bodies = http_load.encode(queries)

    async def go() -> dict[str, list[float]]:
        conns = {name: http_load.Connection(url) for name, url in urls.items()}
        out: dict[str, list[float]] = {name: [] for name in [*urls, "in_process", "in_process_idle"]}
        try:
            for conn in conns.values():  # warm: connections, the encoder's first batches
                for i in range(10):
                    await conn.post("/v1/search", bodies[i])
            for r in range(count // ROUND):
                order = list(out)
                for name in order[r % len(order) :] + order[: r % len(order)]:
                    for j in range(ROUND):
                        i = r * ROUND + j
                        if name.startswith("in_process"):
                            if name == "in_process_idle":
                                time.sleep(IDLE_S)
                            out[name].append(local(queries[i % len(queries)]))
                            continue
                        t = time.perf_counter()
                        status, _ = await conns[name].post("/v1/search", bodies[i % len(bodies)])
                        if status != 200:
                            raise RuntimeError(f"{urls[name]}/v1/search answered {status}")
                        out[name].append(time.perf_counter() - t)
        finally:
            for conn in conns.values():
                await conn.close()
        return out

    return asyncio.run(go())


def load(url: str, queries: list[dict], seconds: float, during=None) -> dict:
    """``CLIENTS`` concurrent clients posting queries for ``seconds``; ``during(t0)`` runs alongside in a
    thread (a fault) and its result is reported."""
    extra: dict = {}
    runner = None
    if during:
        runner = threading.Thread(target=lambda: extra.update(during(time.monotonic())), daemon=True)
        runner.start()
    latencies, errors, elapsed = http_load.run(url, "/v1/search", http_load.encode(queries), CLIENTS, seconds)
    if runner:
        runner.join(timeout=90)
    total = len(latencies) + len(errors)
    return {
        "requests": total,
        "errors": len(errors),
        "error_kinds": sorted(set(errors)),
        "success_rate": round(len(latencies) / total, 5) if total else None,
        "requests_per_s": round(len(latencies) / elapsed, 2),
        "seconds": round(elapsed, 2),
        **ms(latencies),
        **({"fault": extra} if extra else {}),
    }


def alternating(urls: dict[str, str], queries: list[dict], seconds: float) -> dict[str, dict]:
    """Load on each URL in turn, ``BURSTS`` bursts each, ``seconds`` in all per URL: requests/s over the
    bursts and per burst (a drift in the machine's speed falls on both alike: burst i of each URL is
    run i, compared with each other)."""
    runs: dict[str, list[dict]] = {name: [] for name in urls}
    for _ in range(BURSTS):
        for name, url in urls.items():
            before = ran(url)
            part = load(url, queries, seconds / BURSTS)
            after = ran(url)
            batches = after["batches"] - before["batches"]
            part["mean_batch"] = (
                round((after["requests"] - before["requests"]) / batches, 2) if batches else None
            )
            runs[name].append(part)
    out = {}
    for name, parts in runs.items():
        ok = sum(p["requests"] - p["errors"] for p in parts)
        out[name] = {
            "requests": sum(p["requests"] for p in parts),
            "errors": sum(p["errors"] for p in parts),
            "error_kinds": sorted({k for p in parts for k in p["error_kinds"]}),
            "requests_per_s": round(ok / sum(p["seconds"] for p in parts), 2),
            "bursts_requests_per_s": [p["requests_per_s"] for p in parts],
            "p50_ms_of_bursts": [p["p50_ms"] for p in parts],
            "mean_batch_of_bursts": [p["mean_batch"] for p in parts],
        }
    return out


def ran(url: str) -> dict:
    """What the encoder replica behind ``url`` has run so far (``/v1/info``): batches and inputs."""
    with urllib.request.urlopen(f"{url}/v1/info", timeout=30) as r:
        return json.load(r)["encoder_ran"]


def ms(seconds: list[float], prefix: str = "") -> dict:
    a = np.asarray(seconds) * 1000
    return {
        f"{prefix}p50_ms": round(float(np.percentile(a, 50)), 2),
        f"{prefix}p99_ms": round(float(np.percentile(a, 99)), 2),
    }
