"""Serve benchmarks and the load-and-faults run, on loopback only, bounded in time.

The served run: catalog (300 products) -> index of the test products embedded with the tiny Qwen2-VL
(kind coral); queries are "a <product> but ..." with one product part, so every request runs the
processor on an image and the model on text + image. Serve runs throughput-optimized (the default,
``ray.serve_throughput_optimized``); clients post straight to the ingress replica (``deploy.direct_url``)
and the latency run also goes through Serve's proxy. Load comes from ``http_load`` (asyncio, keep-alive),
which takes little of the two cores the server runs on.

- Added latency: sequential requests over HTTP (-> ingress -> encoder, which searches this small index
  itself: ``serve.index_in_encoder`` "auto") vs an in-process call doing the same work (processor, model
  on the encoder replica's threads, FAISS search), interleaved in rounds of ten: p50 and p99 of each
  path, and of the difference. Goal: <= 5 ms added at p50 on this 2-core machine, on the default path.
  Also timed: the same app with an index deployment (``serve.index_in_encoder: false``: one hop more),
  deployed alongside, and the default app through Serve's proxy.
- Batching: requests/s at 16 concurrent clients with the encoder's batching on (``serve.batch_size`` 16)
  vs off (1), both apps up at once and loaded in turn (four bursts each). Goal: >= 2x. Measured with the
  tiny Qwen2-VL and with a random one 512 wide x 4 layers, each beside what batching buys the same work
  in this process (the ceiling).
- Load and faults: 60 s at 16 concurrent clients with two encoder replicas; at 30 s one encoder replica
  is killed. Goals: no error without the fault; >= 99% of requests succeed with it; the replica is back
  (two alive) within 30 s.
"""

from __future__ import annotations

import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np

from benchmarks import http_load
from benchmarks.common import PeakRSS, write_result
from coral import graph, storage
from coral import schemas as S
from coral.config import Config, load_config
from coral.models.tiny import build_all, build_qwen
from coral.serve import app, deploy

CLIENTS, SEQUENTIAL, ROUND, BURST_S, BURSTS, LOAD_S, KILL_AT_S = 16, 300, 10, 20.0, 4, 60.0, 30.0
IDLE_S = 0.005  # about how long the encoder replica sits idle between a sequential client's requests
CEILING = "in this process, {batch} queries embedded and searched as one batch vs one at a time (the ceiling)"
PATHS = {
    "direct": "the default app (serve.index_in_encoder auto: the index in the encoder here): HTTP "
    "straight into the ingress replica -> encoder, which searches the index itself",
    "proxy": "the default app through Serve's proxy: HTTP -> proxy -> ingress -> encoder",
    "index_deployment": "serve.index_in_encoder false: HTTP straight into the ingress replica -> "
    "encoder -> index deployment",
}
LARGER = dict(hidden=512, layers=4)  # an encoder whose cost is not dwarfed by Serve's per-request overhead
WORDS = ["but in red", "in leather", "smaller", "from the same brand", "with a pattern", "in blue"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(
    tmp: str, model: dict | None = None, base: str | None = None, extra: tuple[str, ...] = ()
) -> tuple[Config, list[dict]]:
    """A run with an index of the catalog's test products; ``model``: the random Qwen2-VL's size (the
    tiny one when None), or ``base``: a Qwen2-VL dir already built; ``extra``: more config overrides
    (devices, GPUs)."""
    if base is not None:
        run = f"{tmp}/run_{Path(base).name}"
    elif model is None:
        base, run = str(build_all(f"{tmp}/tiny", ("qwen2_vl",))["qwen2_vl"]), f"{tmp}/run"
    else:
        base, run = f"{tmp}/qwen_{model['hidden']}", f"{tmp}/run_{model['hidden']}"
        build_qwen(Path(base), "2", **model)
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
            *extra,
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


class InProcess:
    """The same work as one served query, in this process: features, model and FAISS search, on as many
    threads as the encoder replica has (``serve.encoder.num_cpus``)."""

    def __init__(self, cfg: Config):
        import pyarrow.dataset as pads

        from coral import storage
        from coral.embedder import Embedder
        from coral.stages import index as index_stage
        from coral.train import step

        root = storage.resolve(cfg.run.run_root)
        self.threads = max(1, int(cfg.serve.encoder.num_cpus))
        self.embedder = Embedder(cfg.index.model, "coral", None, cfg.serve.device, cfg.serve.dtype)
        self.index, _, _ = index_stage.load(root.child("index"), cfg.index)
        src = root.child("catalog", "data")
        catalog = pads.dataset(src.path, format="parquet").to_table(columns=[S.ID, S.TITLE, S.IMAGE])
        self.products = step.products_from({k: catalog[k].to_pylist() for k in (S.ID, S.TITLE, S.IMAGE)})

    def features(self, q: dict) -> dict:
        text = "".join(p["text"] if p["type"] == "text" else S.IMAGE_SLOT for p in q["parts"])
        images = [self.products.images(p["id"]) for p in q["parts"] if p["type"] == "product"]
        return self.embedder.retriever.query(text, images)

    def run(self, chunk: list[dict]) -> None:
        """Embed ``chunk`` as one batch and search the index for it."""
        from coral.mining import knn

        knn.search(self.index, self.embedder([self.features(q) for q in chunk]), chunk[0]["top_k"])

    def __call__(self, q: dict) -> float:
        """Seconds for query ``q``."""
        with self.threaded():
            t = time.perf_counter()
            self.run([q])
            return time.perf_counter() - t

    def batch_gain(self, queries: list[dict], batch: int, rounds: int = 5) -> float:
        """What batching buys the encoder's own work here: time for ``batch`` queries one at a time over
        the time for them as one batch (features, model and search alike), best of ``rounds`` each. The
        ceiling of what batching can buy the served app, whose per-request costs are not batched."""
        chunk = queries[:batch]
        one, together = [], []
        with self.threaded():
            for _ in range(rounds):
                t = time.perf_counter()
                for q in chunk:
                    self.run([q])
                one.append(time.perf_counter() - t)
                t = time.perf_counter()
                self.run(chunk)
                together.append(time.perf_counter() - t)
        return round(min(one) / min(together), 2)

    @contextmanager
    def threaded(self):
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def sequential(
    urls: dict[str, str], local: InProcess, queries: list[dict], count: int = SEQUENTIAL
) -> dict[str, list[float]]:
    """``count`` queries one at a time down each path (each URL, and in process), interleaved in
    rounds of ``ROUND`` so that a change in the machine's speed falls on every path alike. The in-process
    call also runs after ``IDLE_S`` of sleep (``in_process_idle``): the served model starts after its
    process sat idle while the request crossed HTTP and a hop, and on this VM a core that slept runs
    the same call slower."""
    import asyncio

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
    bursts (a drift in the machine's speed falls on both alike)."""
    runs: dict[str, list[dict]] = {name: [] for name in urls}
    for _ in range(BURSTS):
        for name, url in urls.items():
            runs[name].append(load(url, queries, seconds / BURSTS))
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
        }
    return out


def ms(seconds: list[float], prefix: str = "") -> dict:
    a = np.asarray(seconds) * 1000
    return {
        f"{prefix}p50_ms": round(float(np.percentile(a, 50)), 2),
        f"{prefix}p99_ms": round(float(np.percentile(a, 99)), 2),
    }


def entry(cfg: Config) -> str:
    """Where clients send requests: straight into the ingress replica when Serve runs direct ingress
    (the default, ``ray.serve_throughput_optimized``), else through Serve's proxy."""
    return deploy.direct_url(cfg.serve) or deploy.url_of(cfg.serve)


def with_serve(cfg: Config, fn):
    deploy.start(cfg)
    try:
        return fn(entry(cfg))
    finally:
        deploy.stop(cfg)


def on_and_off(cfg: Config, fn):
    """``fn({"on": url, "off": url})`` with two apps up at once: batching on (the config's) and off."""
    off = replace(cfg, serve=replace(cfg.serve, app_name="coral_off", route_prefix="/off", batch_size=1))
    deploy.start(cfg)
    try:
        deploy.start(off)
        try:
            return fn({"on": entry(cfg), "off": entry(off)})
        finally:
            deploy.stop(off, shutdown=False)
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
        local = InProcess(cfg)

        def paths(_: str) -> dict[str, list[float]]:
            direct = deploy.direct_url(cfg.serve)
            urls = {"direct": direct} if direct else {}
            split = replace(
                cfg,
                serve=replace(
                    cfg.serve, app_name="coral_split", route_prefix="/split", index_in_encoder=False
                ),
            )
            deploy.start(split)
            try:
                urls["index_deployment"] = entry(split)
                return sequential({**urls, "proxy": deploy.url_of(cfg.serve)}, local, queries)
            finally:
                deploy.stop(split, shutdown=False)

        layout = app.index_layout(cfg.serve, storage.resolve(cfg.run.run_root, cfg.storage).child("index"))[1]
        with PeakRSS() as mem:
            times = with_serve(cfg, paths)
        batching = on_and_off(cfg, lambda urls: alternating(urls, queries, BURST_S))
        ceiling = local.batch_gain(queries, cfg.serve.batch_size)
        larger, larger_queries = prepare(tmp, LARGER)
        larger_batching = on_and_off(larger, lambda urls: alternating(urls, larger_queries, BURST_S))
        larger_ceiling = InProcess(larger).batch_gain(larger_queries, larger.serve.batch_size)
        two = replace(cfg, serve=replace(cfg.serve, encoder=replace(cfg.serve.encoder, replicas=2)))
        calm = with_serve(two, lambda url: load(url, queries, LOAD_S))
        faulty = with_serve(
            two, lambda url: load(url, queries, LOAD_S, during=kill_one_encoder(cfg.serve.app_name))
        )
    base, idle = times.pop("in_process"), times.pop("in_process_idle")
    added = {  # quantile differences against the in-process call
        name: [s - i for s, i in zip(sorted(t), sorted(base), strict=True)] for name, t in times.items()
    }
    path = "direct" if "direct" in times else "proxy"
    latency = write_result(
        "serve_added_latency",
        value=float(np.percentile(added[path], 50) * 1000),
        unit=f"ms added at p50 by the Serve path ({PATHS[path]}), sequential, interleaved with the baseline",
        baseline={
            "what": "in-process call: processor, model (threads as the encoder replica) and FAISS search",
            "value": round(float(np.percentile(base, 50) * 1000), 3),
        },
        goal={"bar": 5.0, "direction": "lower", "meaning": "added p50 <= 5 ms"},
        goal_on="value",
        requests=SEQUENTIAL,
        path=path,
        layout=layout,
        in_process=ms(base),
        in_process_after_idle={
            "what": f"the in-process call after {IDLE_S * 1000:.0f} ms of sleep: what idling costs the "
            "call on this machine, part of the added latency that is not Serve's work",
            **ms(idle),
            "added_p50_ms_over_it": round(
                float(np.percentile(times[path], 50) - np.percentile(idle, 50)) * 1000, 2
            ),
        },
        **{name: {"what": PATHS[name], **ms(times[name]), **ms(added[name], "added_")} for name in times},
        peak_rss_gib=mem.peak_gib,
    )
    on, off = batching["on"], batching["off"]
    batching_result = write_result(
        "serve_batching_throughput",
        value=on["requests_per_s"],
        unit=f"requests/s at {CLIENTS} concurrent clients, encoder batching on (batch {cfg.serve.batch_size}, "
        f"wait {cfg.serve.batch_wait_s * 1000:.0f} ms)",
        baseline={
            "what": "the same app with batching off (batch 1), up alongside",
            "value": off["requests_per_s"],
        },
        goal={"bar": 2.0, "direction": "higher", "meaning": "batching on >= 2x off"},
        seconds=BURST_S,
        bursts=BURSTS,
        on=on,
        off=off,
        in_process_batch_gain={"value": ceiling, "what": CEILING.format(batch=cfg.serve.batch_size)},
    )
    lon, loff = larger_batching["on"], larger_batching["off"]
    larger_result = write_result(
        "serve_batching_throughput_larger",
        value=lon["requests_per_s"],
        unit=f"requests/s at {CLIENTS} concurrent clients, batching on, encoder a random Qwen2-VL "
        f"{LARGER['hidden']} wide x {LARGER['layers']} layers",
        baseline={
            "what": "the same app with batching off (batch 1), up alongside",
            "value": loff["requests_per_s"],
        },
        goal={"bar": 2.0, "direction": "higher", "meaning": "batching on >= 2x off"},
        model=LARGER,
        seconds=BURST_S,
        bursts=BURSTS,
        on=lon,
        off=loff,
        in_process_batch_gain={
            "value": larger_ceiling,
            "what": CEILING.format(batch=larger.serve.batch_size),
        },
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
    return [latency, batching_result, larger_result, faults]


def main() -> None:
    serve_bench()


if __name__ == "__main__":
    from benchmarks.run_all import start_ray

    start_ray()
    main()
