"""Serve benchmarks and the load-and-faults run, on loopback only, bounded in time.

The served run: catalog (300 products) -> index of the test products embedded with the tiny Qwen2-VL
(kind coral); queries are "a <product> but ..." with one product part, so every request runs the
processor on an image and the model on text + image.

- Added latency: sequential requests over HTTP (proxy -> ingress -> encoder -> index) vs an in-process
  call doing the same work (processor, model, FAISS search) in this process: p50 and p99 of each, and of
  the difference. Goal: <= 5 ms added at p50 on this 2-core machine.
- Batching: requests/s at 16 concurrent clients with the encoder's batching on (``serve.batch_size`` 16)
  vs off (1), same replicas. Goal: >= 2x. Measured twice: with the tiny Qwen2-VL (3 ms a query, less
  than Serve's own cost per request on 2 cores) and with a random one 512 wide x 4 layers.
- Load and faults: 60 s at 16 concurrent clients with two encoder replicas; at 30 s one encoder replica
  is killed. Goals: no error without the fault; >= 99% of requests succeed with it; the replica is back
  (two alive) within 30 s.
"""

from __future__ import annotations

import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from benchmarks.common import PeakRSS, write_result
from coral import graph
from coral import schemas as S
from coral.config import Config, load_config
from coral.models.tiny import build_all, build_qwen
from coral.serve import deploy

CLIENTS, SEQUENTIAL, BURST_S, LOAD_S, KILL_AT_S = 16, 300, 20.0, 60.0, 30.0
LARGER = dict(hidden=512, layers=4)  # an encoder whose cost is not dwarfed by Serve's per-request overhead
WORDS = ["but in red", "in leather", "smaller", "from the same brand", "with a pattern", "in blue"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(tmp: str, model: dict | None = None) -> tuple[Config, list[dict]]:
    """A run with an index of the catalog's test products; ``model``: the random Qwen2-VL's size (the
    tiny one when None)."""
    if model is None:
        base = str(build_all(f"{tmp}/tiny", ("qwen2_vl",))["qwen2_vl"])
    else:
        base = f"{tmp}/qwen_{model['hidden']}"
        build_qwen(Path(base), "2", **model)
    run = f"{tmp}/run" if model is None else f"{tmp}/run_{model['hidden']}"
    cfg = load_config(
        Path(__file__).resolve().parents[1] / "workflows" / "ci_small.yaml",
        [
            f"run.run_root={run}",
            "run.stages=[catalog, index]",
            "catalog.num_groups=100",
            f"index.model={base}",
            "index.kind=coral",
            f"serve.port={free_port()}",
            "serve.token_env=",
        ],
    )
    graph.run_graph(cfg)
    import pyarrow.parquet as pq

    pool = pq.read_table(Path(run) / "index" / "data", columns=[S.ID])[S.ID].to_pylist()
    queries = [
        {
            "parts": [
                {"type": "text", "text": "a "},
                {"type": "product", "id": pool[i % len(pool)]},
                {"type": "text", "text": f" {WORDS[i % len(WORDS)]}"},
            ],
            "top_k": 10,
        }
        for i in range(512)
    ]
    return cfg, queries


def in_process(cfg: Config, queries: list[dict]) -> list[float]:
    """Seconds per query for the same work in this process: features, model, FAISS search."""
    import pyarrow.dataset as pads

    from coral import storage
    from coral.embedder import Embedder
    from coral.mining import knn
    from coral.stages import index as index_stage
    from coral.train import step

    root = storage.resolve(cfg.run.run_root)
    embedder = Embedder(cfg.index.model, "coral")
    index, _, _ = index_stage.load(root.child("index"), cfg.index)
    src = root.child("catalog", "data")
    catalog = pads.dataset(src.path, format="parquet").to_table(columns=[S.ID, S.TITLE, S.IMAGE])
    products = step.products_from({k: catalog[k].to_pylist() for k in (S.ID, S.TITLE, S.IMAGE)})
    out = []
    for q in queries[:SEQUENTIAL]:
        t = time.perf_counter()
        text = "".join(p["text"] if p["type"] == "text" else S.IMAGE_SLOT for p in q["parts"])
        images = [products.images(p["id"]) for p in q["parts"] if p["type"] == "product"]
        vec = embedder([embedder.retriever.query(text, images)])
        knn.search(index, vec, q["top_k"])
        out.append(time.perf_counter() - t)
    return out


def sequential(url: str, queries: list[dict]) -> list[float]:
    import httpx

    out = []
    with httpx.Client(timeout=30) as http:
        for q in queries[:SEQUENTIAL]:
            t = time.perf_counter()
            http.post(f"{url}/v1/search", json=q).raise_for_status()
            out.append(time.perf_counter() - t)
    return out


def load(url: str, queries: list[dict], seconds: float, during=None) -> dict:
    """``CLIENTS`` threads posting queries for ``seconds``; ``during(t0)`` runs alongside (a fault)."""
    import httpx

    stop, lock = time.monotonic() + seconds, threading.Lock()
    latencies, errors = [], []

    def client(k: int) -> None:
        with httpx.Client(timeout=30) as http:
            i = k
            while time.monotonic() < stop:
                t = time.perf_counter()
                try:
                    r = http.post(f"{url}/v1/search", json=queries[i % len(queries)])
                    ok = r.status_code == 200
                    why = None if ok else f"HTTP {r.status_code}"
                except httpx.HTTPError as e:
                    ok, why = False, type(e).__name__
                with lock:
                    (latencies if ok else errors).append(time.perf_counter() - t if ok else why)
                i += CLIENTS

    threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
    started = time.monotonic()
    for t in threads:
        t.start()
    extra = during(started) if during else None
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    total = len(latencies) + len(errors)
    return {
        "requests": total,
        "errors": len(errors),
        "error_kinds": sorted(set(errors)),
        "success_rate": round(len(latencies) / total, 5) if total else None,
        "requests_per_s": round(len(latencies) / elapsed, 2),
        **ms(latencies),
        **({"fault": extra} if extra else {}),
    }


def ms(seconds: list[float], prefix: str = "") -> dict:
    a = np.asarray(seconds) * 1000
    return {
        f"{prefix}p50_ms": round(float(np.percentile(a, 50)), 2),
        f"{prefix}p99_ms": round(float(np.percentile(a, 99)), 2),
    }


def with_serve(cfg: Config, fn):
    url = deploy.start(cfg)
    try:
        return fn(url)
    finally:
        deploy.stop(cfg)


def encoder_replicas(app: str) -> list[str]:
    """Names of the encoder's replica actors (from the GCS: no dashboard needed)."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#Encoder#"
    return [
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)
    ]


def running_encoders(app: str) -> int:
    from ray import serve

    states = serve.status().applications[app].deployments["Encoder"].replica_states
    return sum(n for state, n in states.items() if str(state).upper().endswith("RUNNING"))


def kill_one_encoder(app: str):
    """At KILL_AT_S into the load, kill one encoder replica; time until two are running again."""

    def fault(t0: float) -> dict:
        import ray

        time.sleep(max(0.0, t0 + KILL_AT_S - time.monotonic()))
        victim = encoder_replicas(app)[0]
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        killed = time.monotonic()
        while time.monotonic() - killed < 60:
            others = [n for n in encoder_replicas(app) if n != victim]
            if len(others) >= 2 and running_encoders(app) >= 2:
                return {"killed": victim, "back_after_s": round(time.monotonic() - killed, 2)}
            time.sleep(0.25)
        return {"killed": victim, "back_after_s": None}

    return fault


def serve_bench() -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg, queries = prepare(tmp)
        local = in_process(cfg, queries)
        with PeakRSS() as mem:
            served = with_serve(cfg, lambda url: sequential(url, queries))
        on = with_serve(cfg, lambda url: load(url, queries, BURST_S))
        off = with_serve(
            replace(cfg, serve=replace(cfg.serve, batch_size=1)), lambda url: load(url, queries, BURST_S)
        )
        larger, larger_queries = prepare(tmp, LARGER)
        larger_on = with_serve(larger, lambda url: load(url, larger_queries, BURST_S))
        larger_off = with_serve(
            replace(larger, serve=replace(larger.serve, batch_size=1)),
            lambda url: load(url, larger_queries, BURST_S),
        )
        two = replace(cfg, serve=replace(cfg.serve, encoder=replace(cfg.serve.encoder, replicas=2)))
        calm = with_serve(two, lambda url: load(url, queries, LOAD_S))
        faulty = with_serve(
            two, lambda url: load(url, queries, LOAD_S, during=kill_one_encoder(cfg.serve.app_name))
        )
    added = [s - i for s, i in zip(sorted(served), sorted(local), strict=True)]  # quantile differences
    latency = write_result(
        "serve_added_latency",
        value=float(np.percentile(added, 50) * 1000),
        unit="ms added at p50 by the Serve path (HTTP -> proxy -> ingress -> encoder -> index), sequential",
        baseline={
            "what": "in-process call: processor, model and FAISS search in the benchmark process",
            "value": round(float(np.percentile(local, 50) * 1000), 3),
        },
        goal={"bar": 5.0, "direction": "lower", "meaning": "added p50 <= 5 ms"},
        goal_on="value",
        requests=SEQUENTIAL,
        served=ms(served),
        in_process=ms(local),
        added=ms(added),
        peak_rss_gib=mem.peak_gib,
    )
    batching = write_result(
        "serve_batching_throughput",
        value=on["requests_per_s"],
        unit=f"requests/s at {CLIENTS} concurrent clients, encoder batching on (batch {cfg.serve.batch_size}, wait {cfg.serve.batch_wait_s * 1000:.0f} ms)",
        baseline={"what": "the same app with batching off (batch 1)", "value": off["requests_per_s"]},
        goal={"bar": 2.0, "direction": "higher", "meaning": "batching on >= 2x off"},
        seconds=BURST_S,
        on=on,
        off=off,
    )
    larger_batching = write_result(
        "serve_batching_throughput_larger",
        value=larger_on["requests_per_s"],
        unit=f"requests/s at {CLIENTS} concurrent clients, batching on, encoder a random Qwen2-VL "
        f"{LARGER['hidden']} wide x {LARGER['layers']} layers",
        baseline={"what": "the same app with batching off (batch 1)", "value": larger_off["requests_per_s"]},
        goal={"bar": 2.0, "direction": "higher", "meaning": "batching on >= 2x off"},
        model=LARGER,
        seconds=BURST_S,
        on=larger_on,
        off=larger_off,
    )
    faults = write_result(
        "serve_load_and_faults",
        value=faulty["success_rate"],
        unit=f"share of requests that succeeded over {LOAD_S:.0f} s at {CLIENTS} clients, one of two encoder replicas killed at {KILL_AT_S:.0f} s",
        baseline={"what": "the same load without the fault", "value": calm["success_rate"]},
        goal={
            "bar": 0.99,
            "direction": "higher",
            "meaning": ">= 99% of the fault-free rate; replica back within 30 s",
        },
        calm=calm,
        with_fault=faulty,
    )
    return [latency, batching, larger_batching, faults]


def main() -> None:
    serve_bench()


if __name__ == "__main__":
    from benchmarks.run_all import start_ray

    start_ray()
    main()
