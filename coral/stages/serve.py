"""serve: the run's retriever behind HTTP (Ray Serve), then a few held-out queries sent to it.

Deploys ``coral.serve.app`` bound to the index stage's index and the checkpoint that built it (a
mismatched pair refuses to start), waits for ``/healthz``, sends ``serve.examples`` held-out queries over
HTTP and prints each with its top results, and writes ``serve/serve_config.yaml`` for ``serve run`` /
``serve deploy``. Then it shuts the application down, or with ``serve.forever`` (``--serve-forever``)
keeps serving until interrupted. It runs every time it is selected: serving is an action, not data.
"""

from __future__ import annotations

import logging
import os
import time

import httpx
import pyarrow.compute as pc
import yaml

from coral import schemas as S
from coral import storage
from coral.catalog import lookup
from coral.config import Config, Resources, ServeConfig
from coral.manifest import StageResult
from coral.serve import client, deploy
from coral.serve.http import token_of
from coral.stages.base import StageContext

log = logging.getLogger(__name__)


def held_out(ctx: StageContext, n: int) -> list[dict]:
    """The first ``n`` held-out (test) queries of the train stage's data."""
    rows: list[dict] = []
    for stage in ctx.config.train.data:
        if len(rows) >= n or not ctx.is_complete(stage):
            continue
        src = ctx.data(stage)
        table = storage.read_table(src, columns=[S.QUERY_ID, S.QUERY_TEXT, S.QUERY_IMAGE_IDS, S.SPLIT])
        rows += table.filter(pc.equal(table[S.SPLIT], "test")).slice(0, n - len(rows)).to_pylist()
    return rows


def images_of(ctx: StageContext, ids: set[str]) -> dict[str, bytes]:
    return lookup.images_by_id(lookup.read(ctx.root, [S.ID, S.IMAGE], ids))


class ServeStage:
    name = "serve"
    always_runs = True

    def inputs(self, config: Config) -> tuple[str, ...]:
        return ("catalog", "index")

    def section(self, config: Config) -> ServeConfig:
        return config.serve

    def output(self, config: Config) -> None:
        return None  # an endpoint, and its probe's answers in the manifest

    def resources(self, config: Config) -> dict[str, Resources]:
        cfg, pools = config.serve, {}
        for name, d in (("encoder", cfg.encoder), ("index", cfg.index), ("ingress", cfg.ingress)):
            replicas = d.autoscaling.get("max_replicas", d.replicas) if d.autoscaling else d.replicas
            pools[name] = Resources(
                num_actors=replicas,
                num_cpus=d.num_cpus,
                num_gpus=d.num_gpus,
                accelerator_type=d.accelerator_type,
            )
        return pools

    def validate(self, config: Config) -> None:
        token_of(config.serve)  # a public host without a token fails before any stage runs

    def run(self, ctx: StageContext) -> StageResult:
        cfg = ctx.config.serve
        url = deploy.start(ctx.config)
        try:
            info = httpx.get(
                f"{url}/v1/info", headers=client.headers(os.environ.get(cfg.token_env)), timeout=30
            )
            info.raise_for_status()
            queries = held_out(ctx, cfg.examples)
            images = images_of(ctx, {i for q in queries for i in q[S.QUERY_IMAGE_IDS]})
            src = ctx.data("index")  # a product part names a product of the pool; other images go inline
            pool = set(storage.read_dataset(src, columns=[S.ID])[S.ID].to_pylist())
            examples = []
            with httpx.Client(timeout=60) as http:
                for q in queries:
                    parts = client.parts_for(q[S.QUERY_TEXT], q[S.QUERY_IMAGE_IDS], pool, images)
                    hits = client.search(http, url, parts, 3, os.environ.get(cfg.token_env))["results"]
                    examples.append({"query_id": q[S.QUERY_ID], "query": q[S.QUERY_TEXT], "top": hits})
            direct = deploy.direct_url(cfg)
            print(f"\nserving at {url} (OpenAPI docs: {url}/docs)")
            if direct:
                print(f"  and straight into the ingress replica at {direct} (one hop fewer)")
            index = info.json()["index"]
            place = "in each encoder replica" if index["in_encoder"] else "its own deployment"
            print(f"  the index: {place} ({index['layout']})")
            for e in examples:
                print(f"  {e['query'][:100]!r}")
                for h in e["top"]:
                    print(f"    {h['rank']}. {h['id']}  {h['score']:.3f}  {h['title'][:60]}")
            config_yaml = deploy.serve_config(cfg, None, [f"run.run_root={ctx.config.run.run_root}"])
            storage.write_bytes(
                ctx.stage_dir(self.name).child("serve_config.yaml"), yaml.safe_dump(config_yaml).encode()
            )
            if cfg.forever:
                print("serving until interrupted (Ctrl-C)")
                while True:
                    time.sleep(3600)
        finally:
            if not cfg.forever:
                deploy.stop(ctx.config)
        details = {"url": url, "direct_url": direct, "info": info.json(), "examples": examples}
        return StageResult(len(queries), len(examples), {}, details=details)
