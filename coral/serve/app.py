"""The retriever as a Ray Serve application: an HTTP ingress (FastAPI), a query encoder that batches
concurrent requests (``@serve.batch``), and the index, built from one run's index and the checkpoint
that built it. The index is an index deployment, or, when small (``index_layout``), searched by each
encoder replica itself.

``application(config)`` checks the pair first: the checkpoint (the one ``index.json`` records, or
``serve.checkpoint``) must have the content hash and embedding size the index was built with, else it
raises ``IndexMismatch`` naming both and nothing starts. ``build(args)`` is the same for Serve's own
tools (``serve run`` / ``serve deploy`` of the YAML that ``serve_config`` writes).

Routes: ``POST /v1/search`` (one query or several), ``POST /v1/embed``, ``POST /v1/embeddings``
(OpenAI's embeddings API), ``GET /v1/info``, ``GET /healthz``; OpenAPI at ``/docs`` and
``/openapi.json``; docs/serving.md. This module assembles the application; the deployments are in
``coral.serve.deployments``, what their replicas check as they start in ``coral.serve.binding``, the HTTP
layer (middleware, token) in ``coral.serve.http``, the request checks in ``coral.serve.api`` and
``coral.serve.embeddings``, the metrics in ``coral.serve.metrics``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from coral import checkpoint, manifest, ray_runtime, storage
from coral.config import Config, DeploymentConfig, ServeConfig, load_config
from coral.errors import ConfigError
from coral.serve import api
from coral.serve.binding import IndexTable, binding, bound_checkpoint, check_binding
from coral.serve.deployments import Encoder, Index, Ingress, ReplicaSettings
from coral.serve.http import token_of

# ``build`` is Serve's import path (``coral.serve.app:build`` in Serve configs and cluster manifests); the
# others stay importable from here, where they were before the deployments and HTTP layer moved out
__all__ = [
    "IndexTable",
    "application",
    "binding",
    "build",
    "check_binding",
    "index_layout",
    "token_of",
]


def _options(d: DeploymentConfig) -> dict[str, Any]:
    resources = ray_runtime.remote_args(d)
    scale = {"autoscaling_config": dict(d.autoscaling)} if d.autoscaling else {"num_replicas": d.replicas}
    return {**scale, "ray_actor_options": resources, "max_ongoing_requests": d.max_ongoing_requests}


def index_layout(cfg: ServeConfig, index_dir: storage.Location) -> tuple[bool, str]:
    """Whether each encoder replica searches the index itself (``serve.index_in_encoder``), and why.

    "auto" keeps a small index in the encoder: the search costs the same in either process, and the
    hop to another replica and back adds 2.4-3.2 ms a query on two CPU cores. The index deployment
    earns that hop for an index too large to copy into every encoder replica (over
    ``index_in_encoder_max_mb``), or one that ``serve.index`` gives a GPU, replicas or autoscaling of
    its own."""
    if cfg.index_in_encoder != "auto":
        return bool(cfg.index_in_encoder), f"serve.index_in_encoder: {str(cfg.index_in_encoder).lower()}"
    d = cfg.index
    if d.num_gpus > 0 or d.replicas > 1 or d.autoscaling:
        return False, "auto: serve.index asks for a GPU, several replicas or autoscaling"
    mb = storage.size(index_dir.child("index.faiss")) / 2**20
    if mb > cfg.index_in_encoder_max_mb:
        return False, f"auto: the index is {mb:.1f} MiB, over serve.index_in_encoder_max_mb"
    return True, f"auto: the index is {mb:.1f} MiB, within serve.index_in_encoder_max_mb"


def application(config: Config):
    """The bound Serve application of ``config``'s run; raises IndexMismatch for a mismatched pair, and
    ConfigError for a public host without a token."""
    cfg = config.serve
    token = token_of(cfg)
    root = storage.resolve(config.run.run_root, config.storage)
    index_dir = root.child("index")
    meta = checkpoint.read_index_meta(index_dir)
    done = manifest.read_complete(index_dir)
    if done is None:
        raise ConfigError(f"the index stage is not complete at {index_dir.uri}; run it first")
    checkpoint.check_index_digest(meta, checkpoint.index_file_digest(index_dir), index_dir.uri)
    ckpt = bound_checkpoint(config, meta, index_dir)
    bound = binding(meta, ckpt)
    in_encoder, layout = index_layout(cfg, index_dir)
    info = {
        "checkpoint": {"uri": ckpt.uri, "kind": ckpt.kind, "hash": ckpt.hash},
        "index": {
            "id": done["hash"],
            "uri": index_dir.uri,
            "spec": meta["spec"],
            "count": meta["count"],
            "sha256": meta.get("index_sha256"),
            "in_encoder": in_encoder,
            "layout": layout,
        },
        "dim": ckpt.dim,
        "limits": {k: getattr(cfg, k) for k in api.Limits.__dataclass_fields__},
        "batching": {"max_batch_size": cfg.batch_size, "batch_wait_s": cfg.batch_wait_s},
        "authenticated": token is not None,
    }
    # the serve checkpoint as resolved here; replicas hash it again against ``bound``
    served = replace(config, serve=replace(cfg, checkpoint=ckpt.uri))
    where = {
        "index_uri": index_dir.uri,
        "storage_cfg": config.storage,
        "index_cfg": config.index,
        "bound": bound,
    }
    index = where if in_encoder else Index.options(**_options(cfg.index)).bind(**where)
    encoder = Encoder.options(**_options(cfg.encoder)).bind(served, bound, ReplicaSettings.of(cfg), index)
    return Ingress.options(**_options(cfg.ingress)).bind(
        encoder, served, api.token_digest(token) if token else None, info
    )


def build(args: dict):
    """Serve's application builder (``import_path: coral.serve.app:build``): ``args`` = {"config": the
    workflow YAML, "overrides": ["key.path=value", ...]}."""
    return application(load_config(args.get("config"), list(args.get("overrides", ()))))
