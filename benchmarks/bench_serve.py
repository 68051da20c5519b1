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
  vs off (1), both apps up at once and loaded in turn: 3 runs, each a burst on then a burst off. Goal:
  >= 2x in every run. Measured with the
  tiny Qwen2-VL and with a random one 512 wide x 4 layers, each beside what batching buys the same work
  in this process (the ceiling).
- Load and faults: 60 s at 16 concurrent clients with two encoder replicas; at 30 s one encoder replica
  is killed. Goals: no error without the fault; >= 99% of requests succeed with it; the replica is back
  (two alive) within 30 s.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace

import numpy as np

from benchmarks.common import PeakRSS, median, start_ray, write_result
from benchmarks.serve_load import BURSTS, CLIENTS, IDLE_S, SEQUENTIAL, alternating, load, ms, sequential
from benchmarks.serve_setup import (
    KILL_AT_S,
    InProcess,
    entry,
    kill_one_encoder,
    on_and_off,
    prepare,
    with_serve,
)
from coral import storage
from coral.serve import app, deploy

BURST_S, LOAD_S = 24.0, 60.0  # per app, over its BURSTS bursts
CEILING = "in this process, {batch} queries embedded and searched as one batch vs one at a time (the ceiling)"
PATHS = {
    "direct": "the default app (serve.index_in_encoder auto: the index in the encoder here): HTTP "
    "straight into the ingress replica -> encoder, which searches the index itself",
    "proxy": "the default app through Serve's proxy: HTTP -> proxy -> ingress -> encoder",
    "index_deployment": "serve.index_in_encoder false: HTTP straight into the ingress replica -> "
    "encoder -> index deployment",
}
LARGER = dict(hidden=512, layers=4)  # an encoder whose cost is not dwarfed by Serve's per-request overhead


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
    batching_result = write_batching(
        "serve_batching_throughput",
        batching,
        f"encoder batching on (batch {cfg.serve.batch_size}, wait {cfg.serve.batch_wait_s * 1000:.0f} ms)",
        {"value": ceiling, "what": CEILING.format(batch=cfg.serve.batch_size)},
    )
    larger_result = write_batching(
        "serve_batching_throughput_larger",
        larger_batching,
        f"batching on, encoder a random Qwen2-VL {LARGER['hidden']} wide x {LARGER['layers']} layers",
        {"value": larger_ceiling, "what": CEILING.format(batch=larger.serve.batch_size)},
        model=LARGER,
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


def write_batching(name: str, batching: dict, what: str, ceiling: dict, **extra) -> dict:
    """Batching on vs off: the median burst of each, and each run's own ratio (goal: every run)."""
    on, off = batching["on"], batching["off"]
    runs = list(zip(on["bursts_requests_per_s"], off["bursts_requests_per_s"], strict=True))
    return write_result(
        name,
        value=median(a for a, _ in runs),
        unit=f"requests/s at {CLIENTS} concurrent clients, {what}; the median of {BURSTS} runs",
        baseline={
            "what": "the same app with batching off (batch 1), up alongside",
            "value": median(b for _, b in runs),
        },
        goal={"bar": 2.0, "direction": "higher", "meaning": "batching on >= 2x off in every run"},
        goal_on="every_run",
        run_ratios=[a / b if b else 0.0 for a, b in runs],
        seconds=BURST_S,
        bursts=BURSTS,
        on=on,
        off=off,
        in_process_batch_gain=ceiling,
        **extra,
    )


def main() -> None:
    serve_bench()


if __name__ == "__main__":
    start_ray()
    main()
