"""The retriever as a Ray Serve application: an HTTP ingress (FastAPI), a query encoder that batches
concurrent requests (``@serve.batch``), and the index, built from one run's index and the checkpoint
that built it. The index is an index deployment, or, when small (``index_layout``), searched by each
encoder replica itself.

``application(config)`` checks the pair first: the checkpoint (the one ``index.json`` records, or
``serve.checkpoint``) must have the content hash and embedding size the index was built with, else it
raises ``IndexMismatch`` naming both and nothing starts. ``build(args)`` is the same for Serve's own
tools (``serve run`` / ``serve deploy`` of the YAML that ``serve_config`` writes).

Routes: ``POST /v1/search``, ``POST /v1/embed``, ``GET /v1/info``, ``GET /healthz``; OpenAPI at
``/docs`` and ``/openapi.json``. Request checks are in ``coral.serve.api``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray import serve

from coral import checkpoint, manifest, net, ray_runtime, storage
from coral import schemas as S
from coral.config import Config, DeploymentConfig, IndexStageConfig, ServeConfig, StorageConfig
from coral.errors import ConfigError
from coral.serve import api
from coral.serve.pacing import BatchWait
from coral.serve.retry import retried

log = logging.getLogger(__name__)

app = FastAPI(
    title="Coral retriever",
    description="Interleaved text + image queries against a FAISS index of the candidate pool.",
    version="1",
)
bearer = HTTPBearer(auto_error=False, description="needed when the server sets a token")


class BodyLimit:
    """ASGI middleware: a body over ``app.state.limits.max_body_bytes`` gets 413 before it is parsed."""

    def __init__(self, inner):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        limits = getattr(app.state, "limits", None)
        if scope["type"] != "http" or limits is None:
            return await self.inner(scope, receive, send)
        length = dict(scope.get("headers", ())).get(b"content-length", b"0")
        too_big = JSONResponse(
            {"detail": f"request body over {limits.max_body_bytes} bytes"}, status_code=413
        )
        if not length.isdigit() or int(length) > limits.max_body_bytes:
            return await too_big(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limits.max_body_bytes:  # a chunked body: FastAPI turns this into the response
                from fastapi import HTTPException

                raise HTTPException(413, f"request body over {limits.max_body_bytes} bytes")
            return message

        return await self.inner(scope, counted, send)


app.add_middleware(BodyLimit)


@app.exception_handler(api.ApiError)
async def _api_error(_: Request, e: api.ApiError) -> JSONResponse:
    return JSONResponse({"detail": e.message}, status_code=e.status)


@app.exception_handler(RequestValidationError)
async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
    status, message = api.validation_message(e.errors())
    return JSONResponse({"detail": message}, status_code=status)


def configure(limits: api.Limits, token_digest: str | None) -> None:
    """Set the limits and token the middleware and the auth dependency read. A module function, so that it
    runs on this module's ``app`` even from a deployment class that Serve serialised by value."""
    app.state.limits, app.state.token_digest = limits, token_digest


async def authorized(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    header = f"{credentials.scheme} {credentials.credentials}" if credentials else None
    api.authorize(header, getattr(app.state, "token_digest", None))


def over_serve_transport(handle):
    """``handle`` on the transport this replica's Serve is set to: gRPC when Serve runs throughput-optimized
    (``ray.serve_throughput_optimized``). A handle otherwise keeps the transport of the process that built
    the app, which Ray Serve fixes when it is first imported: a driver that imported it before the setting
    was made (``ray_runtime.connect``) would send every call between replicas as a Ray actor call, about
    twice the cost of a gRPC hop here."""
    from ray.serve._private.constants import RAY_SERVE_USE_GRPC_BY_DEFAULT

    return handle.options(_by_reference=not RAY_SERVE_USE_GRPC_BY_DEFAULT)


def pool_ids(index_dir: storage.Location) -> list[str]:
    """The candidate pool's product ids (the index's rows)."""

    data = index_dir.child("data")
    return storage.read_dataset(data, columns=[S.ID])[S.ID].to_pylist()


def pool_products(config: Config, index_dir: storage.Location) -> dict:
    """id, title and image columns of the candidate pool's products (for product parts)."""
    import pyarrow.dataset as pads

    ids = pool_ids(index_dir)
    src = storage.resolve(config.run.run_root, config.storage).child("catalog", manifest.DATA)
    catalog = storage.read_dataset(src, columns=[S.ID, S.TITLE, S.IMAGE], filter=pads.field(S.ID).isin(ids))
    return {k: catalog[k].to_pylist() for k in (S.ID, S.TITLE, S.IMAGE)}


def bound_checkpoint(config: Config, meta: dict, index_dir: storage.Location) -> checkpoint.Checkpoint:
    """The checkpoint to serve, checked against the index: refuses a pair that does not belong together."""
    built = meta["checkpoint"]
    uri = config.serve.checkpoint or built["uri"]
    ckpt = checkpoint.describe(uri, built["kind"], config.storage)
    checkpoint.check_bound(meta, ckpt, index_dir.uri)
    return ckpt


def binding(meta: dict, ckpt: checkpoint.Checkpoint) -> dict:
    """What a replica checks again when it starts: the checkpoint's content hash and the index file's."""
    return {"checkpoint": ckpt.hash, "index_sha256": meta.get("index_sha256")}


def same_index(meta: dict, bound: dict, where: str) -> None:
    """``index.json`` still names the index file and checkpoint the app was built with."""
    now = {"checkpoint": meta["checkpoint"]["hash"], "index_sha256": meta.get("index_sha256")}
    if now != bound:
        raise checkpoint.IndexMismatch(
            f"the index at {where} changed since this app was built (it was built with checkpoint "
            f"{bound['checkpoint']} and index file sha256 {bound['index_sha256']}; {checkpoint.INDEX_META} "
            f"now names {now['checkpoint']} and {now['index_sha256']}); redeploy the app"
        )


def check_binding(config: Config, index_dir: storage.Location, bound: dict) -> checkpoint.Checkpoint:
    """In a replica as it starts: the index is still the one the app was built with, and the checkpoint
    at the path is still the one that built it (hashed again, not trusted)."""
    meta = checkpoint.read_index_meta(index_dir)
    same_index(meta, bound, index_dir.uri)
    return bound_checkpoint(config, meta, index_dir)


@serve.deployment
class Encoder:
    """Query and candidate embeddings, and the search of queries: concurrent requests are embedded together
    (``@serve.batch``) and a batch's queries go to the index in one call. A request whose input the model
    cannot take gets ``api.Refused`` for itself alone. A request whose HTTP client goes away is cancelled
    by Serve down to here, and a cancelled request waiting for a batch is left out of it (``serve.batch``
    drops cancelled requests when it forms the batch)."""

    def __init__(self, config: Config, bound: dict, serve_cfg: dict, index):
        """``bound``: the checkpoint and index the app was built with, checked again here (a replica may
        start long after, when autoscaling or a restart brings it up). ``index``: the index deployment's
        handle, or the arguments of an ``IndexTable`` to search in this process
        (``serve.index_in_encoder``)."""
        import torch

        from coral.embedder import Embedder
        from coral.train import step

        torch.set_num_threads(serve_cfg["threads"])  # the replica's share, as the offline stages do
        index_dir = storage.resolve(config.run.run_root, config.storage).child("index")
        ckpt = check_binding(config, index_dir, bound)
        self.embedder = Embedder(ckpt.uri, ckpt.kind, config.storage, serve_cfg["device"], serve_cfg["dtype"])
        # the pool's images, read here from storage: never deployment arguments held by the controller
        self.products = step.products_from(pool_products(config, index_dir))
        self.rgb = step.rgb
        local = isinstance(index, dict)
        self.table = IndexTable(**index) if local else None
        self.index = None if local else over_serve_transport(index)
        self.run_many.set_max_batch_size(serve_cfg["batch_size"])
        self.pacing = BatchWait(serve_cfg["batch_wait_s"])
        self.counts = {"batches": 0, "requests": 0, "refused": 0}  # what this replica ran (``/v1/info``)
        self.turn = asyncio.Lock()  # one run at a time

    def features(self, role: str, query: api.Query) -> dict:
        """Decoded here, one image at a time, in the worker thread that runs the batch."""
        images = [self.products.images(i) if isinstance(i, str) else self.rgb(i) for i in query.images]
        retriever = self.embedder.retriever
        return (
            retriever.query(query.text, images)
            if role == "query"
            else retriever.candidate(query.text, images[0])
        )

    def _embed(self, features: list[dict]) -> list:
        """Embeddings of ``features`` in one batch; when the batch fails, each alone, so that one input
        the model cannot take costs only its own request."""
        try:
            return list(self.embedder(features)) if features else []
        except Exception as e:
            if len(features) == 1:
                log.warning("encoder: refused one input: %s", api.refused(e).message, exc_info=True)
                return [api.refused(e)]
            return [v for f in features for v in self._embed([f])]

    def _work(self, items: list[tuple]) -> tuple[list, list[int], list | None]:
        """The batch's embeddings (or ``Refused``), the rows that want hits, and their hits when the
        index is here."""
        out: list = [None] * len(items)
        features = {}
        for i, (role, query, _) in enumerate(items):
            try:
                features[i] = self.features(role, query)
            except Exception as e:
                out[i] = api.refused(e)
        for i, v in zip(features, self._embed(list(features.values())), strict=True):
            out[i] = v
        wanted = [i for i, (_, _, k) in enumerate(items) if k > 0 and isinstance(out[i], np.ndarray)]
        hits = (
            self.table.search_many(*self._queries(items, out, wanted))
            if self.table is not None and wanted
            else None
        )
        return out, wanted, hits

    @staticmethod
    def _queries(items, vectors, wanted) -> tuple[np.ndarray, list[int]]:
        return np.stack([vectors[i] for i in wanted]), [items[i][2] for i in wanted]

    async def run(self, items: list[tuple]) -> list:
        """(role, query, top_k) -> the embedding, or the top_k hits when top_k > 0, or ``Refused``. The
        model runs in a worker thread, so that the replica's event loop (where Serve runs this) keeps
        taking requests and the next batch fills meanwhile: even for a lone request, since one run on the
        loop would hide the requests that arrive during it, and each would look alone in turn. Runs take
        turns (a lone request's and a batch's would otherwise share the cores)."""
        async with self.turn:
            self.counts["batches"] += 1
            self.counts["requests"] += len(items)
            with self.pacing.running(len(items)):  # the next batch waits about as long as this runs
                out, wanted, hits = await asyncio.to_thread(self._work, items)
                if wanted and hits is None:
                    hits = await self.index.search_many.remote(*self._queries(items, out, wanted))
        self.counts["refused"] += sum(isinstance(v, api.Refused) for v in out)
        for i, h in zip(wanted, hits or [], strict=True):
            out[i] = h
        return out

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def run_many(self, items: list[tuple]) -> list:
        return await self.run(items)

    async def _one(self, item: tuple):
        wait = self.pacing.arrive()
        try:
            if self.pacing.alone():  # nothing to batch with: no batch queue
                return (await self.run([item]))[0]
            self.run_many.set_batch_wait_timeout_s(wait)  # read when the request opens a batch
            return await self.run_many(item)
        finally:
            self.pacing.leave()

    async def embed(self, role: str, query: api.Query):
        return await self._one((role, query, 0))

    async def search(self, query: api.Query, k: int):
        return await self._one(("query", query, k))

    async def ran(self) -> dict:
        """Batches and requests this replica has run, and requests it refused."""
        return dict(self.counts)


class IndexTable:
    """The FAISS index and its candidate table (row -> id, title). ``bound``: the checkpoint and index the
    app was built with; an index that is not that one any more refuses to load."""

    def __init__(self, index_uri: str, storage_cfg: StorageConfig, index_cfg: IndexStageConfig, bound: dict):
        from coral.stages import index as index_stage

        index_dir = storage.resolve(index_uri, storage_cfg)
        self.index, meta, table = index_stage.load(index_dir, index_cfg)  # checks index.faiss's SHA-256
        same_index(meta, bound, index_dir.uri)
        self.ids, self.titles = table[S.ID].to_pylist(), table[S.TITLE].to_pylist()

    def search_many(self, vectors: np.ndarray, ks: list[int]) -> list[list[dict]]:
        """One FAISS search for a batch of query vectors; row i keeps its own top ``ks[i]``."""
        from coral.mining import knn

        k = min(max(ks), len(self.ids))
        scores, rows = knn.search(self.index, np.ascontiguousarray(vectors, dtype=np.float32), k)
        return [
            [
                {"rank": r + 1, "id": self.ids[i], "score": float(s), "title": self.titles[i] or ""}
                for r, (i, s) in enumerate(zip(row[:want], score[:want], strict=True))
                if i >= 0
            ]
            for row, score, want in zip(rows, scores, ks, strict=True)
        ]


@serve.deployment
class Index:
    """The index as its own deployment: scaled and placed apart from the encoder (``index_layout``)."""

    def __init__(self, index_uri: str, storage_cfg: StorageConfig, index_cfg: IndexStageConfig, bound: dict):
        self.table = IndexTable(index_uri, storage_cfg, index_cfg, bound)

    async def search_many(self, vectors: np.ndarray, ks: list[int]) -> list[list[dict]]:
        """On the replica's event loop, not a thread: one search a batch, and this replica does nothing
        else."""
        return self.table.search_many(vectors, ks)


@serve.deployment
@serve.ingress(app)
class Ingress:
    def __init__(self, encoder, config: Config, token_digest: str | None, info: dict):
        self.encoder = over_serve_transport(encoder)
        # how this replica's calls to the encoder travel (the encoder's to the index go the same way)
        calls = "ray actor calls" if self.encoder.handle_options._by_reference else "grpc"
        self.info_body = {**info, "replica_calls": calls}
        self.limits = api.Limits(**info["limits"])
        # the ids a product part may name, read here from storage (not deployment arguments)
        self.pool = pool_ids(storage.resolve(config.run.run_root, config.storage).child("index"))
        configure(self.limits, token_digest)

    async def _parts(self, to, parts: list) -> api.Query:
        """The request's parts checked and turned into a query in a worker thread (base64 and image
        headers are CPU work): the event loop keeps answering, ``/healthz`` included."""
        return await asyncio.to_thread(to, parts, self.limits, self.pool)

    @staticmethod
    def _answer(result):
        if isinstance(result, api.Refused):  # this request alone: the rest of its batch got theirs
            raise api.ApiError(result.status, result.message)
        return result

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/v1/info", dependencies=[Depends(authorized)])
    async def info(self) -> dict:
        """The app's description, and what the encoder replica that answers has run so far."""
        return {**self.info_body, "encoder_ran": await retried(lambda: self.encoder.ran.remote())}

    @app.post("/v1/search", dependencies=[Depends(authorized)], response_model=api.SearchResponse)
    async def search(self, body: api.SearchRequest) -> dict:
        api.check_top_k(body.top_k, self.limits)
        query = await self._parts(api.to_query, body.parts)
        # embedded and searched in the encoder's batch; sent again if its replica dies meanwhile
        hits = self._answer(await retried(lambda: self.encoder.search.remote(query, body.top_k)))
        return {
            "results": hits,
            "checkpoint": self.info_body["checkpoint"]["hash"],
            "index": self.info_body["index"]["id"],
        }

    @app.post("/v1/embed", dependencies=[Depends(authorized)], response_model=api.EmbedResponse)
    async def embed(self, body: api.EmbedRequest) -> dict:
        query = await self._parts(api.to_query if body.role == "query" else api.to_candidate, body.parts)
        vector = self._answer(await retried(lambda: self.encoder.embed.remote(body.role, query)))
        return {
            "embedding": vector.tolist(),
            "dim": len(vector),
            "checkpoint": self.info_body["checkpoint"]["hash"],
        }


def _options(d: DeploymentConfig) -> dict[str, Any]:
    resources = ray_runtime.remote_args(d.num_cpus, d.num_gpus, d.accelerator_type)
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


def token_of(cfg: ServeConfig) -> str | None:
    """The bearer token from ``serve.token_env``; refuses (ConfigError) to serve a non-loopback host
    without one, unless ``serve.allow_unauthenticated`` says so on purpose."""
    import os

    token = (os.environ.get(cfg.token_env) or "").strip() if cfg.token_env else ""
    if token or net.is_loopback(cfg.host):
        return token or None
    if cfg.allow_unauthenticated:
        log.warning("serving %s without a token (serve.allow_unauthenticated: true)", cfg.host)
        return None
    where = f"the environment variable {cfg.token_env}" if cfg.token_env else "serve.token_env"
    raise ConfigError(
        f"serve.host={cfg.host} is not a loopback address and {where} is unset or empty: set a token "
        f"(serve.token_env names the variable), bind 127.0.0.1, or set serve.allow_unauthenticated: true "
        f"to serve without one on purpose"
    )


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
    serve_cfg = {
        "device": cfg.device,
        "dtype": cfg.dtype,
        "batch_size": cfg.batch_size,
        "batch_wait_s": cfg.batch_wait_s,
        "threads": max(1, int(cfg.encoder.num_cpus)),
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
    encoder = Encoder.options(**_options(cfg.encoder)).bind(served, bound, serve_cfg, index)
    return Ingress.options(**_options(cfg.ingress)).bind(
        encoder, served, api.token_digest(token) if token else None, info
    )


def build(args: dict):
    """Serve's application builder (``import_path: coral.serve.app:build``): ``args`` = {"config": the
    workflow YAML, "overrides": ["key.path=value", ...]}."""
    from coral.config import load_config

    return application(load_config(args.get("config"), list(args.get("overrides", ()))))
