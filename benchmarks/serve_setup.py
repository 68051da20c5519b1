"""A served run for the serve benchmarks, on loopback: the run and its index (``prepare``), the same work
as a served query in this process (``InProcess``), the apps up and down (``with_serve``, ``on_and_off``)
and the fault (``kill_one_encoder``)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray
import torch
from ray import serve

from benchmarks.common import free_port
from coral import graph, storage
from coral import schemas as S
from coral.catalog import lookup
from coral.config import Config, load_config
from coral.search import index as search_index
from coral.search import knn
from coral.search.embedder import Embedder
from coral.serve import deploy
from coral.testing import corpus
from coral.testing.tiny import build_all, build_qwen

KILL_AT_S = 30.0  # into the load, when kill_one_encoder's fault strikes
WORDS = ["but in red", "in leather", "smaller", "from the same brand", "with a pattern", "in blue"]


def prepare(
    tmp: str, model: dict | None = None, base: str | None = None, extra: tuple[str, ...] = ()
) -> tuple[Config, list[dict]]:
    """A run with an index of the catalog's test products; ``model``: the random Qwen2-VL's size (the
    tiny one when None), or ``base``: a Qwen2-VL dir already built; ``extra``: more config overrides
    (devices, GPUs)."""
    if base is not None:
        run = f"{tmp}/run_{Path(base).name}"
    elif model is None:
        base, run = (
            str(build_all(f"{tmp}/tiny", ("qwen2_vl",), corpus=corpus.project())["qwen2_vl"]),
            f"{tmp}/run",
        )
    else:
        base, run = f"{tmp}/qwen_{model['hidden']}", f"{tmp}/run_{model['hidden']}"
        build_qwen(Path(base), "2", **model, corpus=corpus.project())
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
        root = storage.resolve(cfg.run.run_root)
        self.threads = max(1, int(cfg.serve.encoder.num_cpus))
        self.embedder = Embedder(cfg.index.model, "coral", None, cfg.serve.device, cfg.serve.dtype)
        self.index, _, _ = search_index.load(root.child("index"), cfg.index)
        src = root.child("catalog", "data")
        catalog = pads.dataset(src.path, format="parquet").to_table(columns=[S.ID, S.TITLE, S.IMAGE])
        self.products = lookup.products_from({k: catalog[k].to_pylist() for k in (S.ID, S.TITLE, S.IMAGE)})

    def features(self, q: dict) -> dict:
        text = "".join(p["text"] if p["type"] == "text" else S.IMAGE_SLOT for p in q["parts"])
        images = [self.products.images(p["id"]) for p in q["parts"] if p["type"] == "product"]
        return self.embedder.retriever.query(text, images)

    def run(self, chunk: list[dict]) -> None:
        """Embed ``chunk`` as one batch and search the index for it."""
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
        threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


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
    prefix = f"SERVE_REPLICA::{app}#Encoder#"
    return [
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)
    ]


def running_encoders(app: str) -> int:
    states = serve.status().applications[app].deployments["Encoder"].replica_states
    return sum(n for state, n in states.items() if str(state).upper().endswith("RUNNING"))


def kill_one_encoder(app: str):
    """At KILL_AT_S into the load, kill one encoder replica; time until two are running again."""

    def fault(t0: float) -> dict:
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
