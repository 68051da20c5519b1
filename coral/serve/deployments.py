"""The Serve deployments of the retriever: the query ``Encoder`` (batches concurrent requests with
``@serve.batch``), the ``Index`` (an ``IndexTable``: the FAISS index and its candidate table) and the HTTP
``Ingress``. What their replicas check and read when they start (the checkpoint/index binding the app was
built with, the candidate pool) is in ``coral.serve.binding``; their metrics in ``coral.serve.metrics``.

``coral.serve.app`` chooses where the index lives and binds these into the application.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from fastapi import Depends
from ray import serve
from ray.serve._private import constants as serve_constants

from coral import storage
from coral.catalog import lookup
from coral.config import Config, IndexStageConfig, ServeConfig, StorageConfig
from coral.models import image_features, vision_cache
from coral.search.embedder import Embedder
from coral.serve import api, embeddings, grouping
from coral.serve.binding import IndexTable, check_binding, pool_ids, pool_products
from coral.serve.http import app, authorized, configure
from coral.serve.metrics import EncoderMetrics, HttpMetrics
from coral.serve.pacing import BatchWait
from coral.serve.retry import retried

log = logging.getLogger(__name__)

# Serve pickles each deployment class BY VALUE when it is decorated (``@serve.deployment`` runs before the
# class has its name in this module, so it cannot be pickled by reference), and a method then sees only the
# module-level names that existed at that moment: a helper defined below the classes is a NameError in the
# replica. Keep every function and class the deployments use above them, or import it.


@dataclass(frozen=True)
class ReplicaSettings:
    """What an encoder replica runs with, from the serve section, made once when the app is assembled."""

    threads: int  # torch's intra-op threads: the replica's CPU share, as the offline stages do
    device: str
    dtype: str
    batch_size: int
    batch_wait_s: float

    @classmethod
    def of(cls, cfg: ServeConfig) -> ReplicaSettings:
        return cls(
            threads=max(1, int(cfg.encoder.num_cpus)),
            device=cfg.device,
            dtype=cfg.dtype,
            batch_size=cfg.batch_size,
            batch_wait_s=cfg.batch_wait_s,
        )


def over_serve_transport(handle):
    """``handle`` on the transport this replica's Serve is set to: gRPC when Serve runs throughput-optimized
    (``ray.serve_throughput_optimized``). A handle otherwise keeps the transport of the process that built
    the app, which Ray Serve fixes when it is first imported: a driver that imported it before the setting
    was made (``ray_runtime.connect``) would send every call between replicas as a Ray actor call, about
    twice the cost of a gRPC hop here."""
    return handle.options(_by_reference=not serve_constants.RAY_SERVE_USE_GRPC_BY_DEFAULT)


async def to_queries(parts: list[list], *args) -> list[api.Query]:
    """``api.to_queries``: in a worker thread when an input carries an image (base64 and image headers are
    CPU work: the event loop keeps answering meanwhile, ``/healthz`` included); text and product ids are
    checked at once, without the thread's hop."""
    if api.carries_images(parts):
        return await asyncio.to_thread(api.to_queries, parts, *args)
    return api.to_queries(parts, *args)


@serve.deployment
class Encoder:
    """Query and candidate embeddings, and the search of queries: concurrent requests are embedded together
    (``@serve.batch``), a request's several inputs queued together into the same batch where they fit, and
    a batch's queries go to the index in one call. A request whose input the model cannot take gets
    ``api.Refused`` for that input. A request whose HTTP client goes away is cancelled by Serve down to
    here, and a cancelled request waiting for a batch is left out of it (``serve.batch`` drops cancelled
    requests when it forms the batch)."""

    def __init__(self, config: Config, bound: dict, settings: ReplicaSettings, index):
        """``bound``: the checkpoint and index the app was built with, checked again here (a replica may
        start long after, when autoscaling or a restart brings it up). ``index``: the index deployment's
        handle, or the arguments of an ``IndexTable`` to search in this process
        (``serve.index_in_encoder``)."""
        torch.set_num_threads(settings.threads)
        index_dir = storage.resolve(config.run.run_root, config.storage).child("index")
        ckpt = check_binding(config, index_dir, bound)
        self.embedder = Embedder(ckpt.uri, ckpt.kind, config.storage, settings.device, settings.dtype)
        # a product's image processed once, not once per query that names it
        self.image_features = image_features.install(self.embedder.retriever)
        # and its image through the vision tower once (a Qwen-VL model's)
        self.vision = vision_cache.install(self.embedder.model)
        # the pool's images, read here from storage: never deployment arguments held by the controller
        self.products = lookup.products_from(pool_products(config, index_dir))
        self.rgb = lookup.rgb
        local = isinstance(index, dict)
        self.table = IndexTable(**index) if local else None
        self.index = None if local else over_serve_transport(index)
        self.run_many.set_max_batch_size(settings.batch_size)
        self.pacing = BatchWait(settings.batch_wait_s)
        self.counts = {"batches": 0, "requests": 0, "refused": 0}  # what this replica ran (``/v1/info``)
        self.metrics = EncoderMetrics()  # here, in the replica's process: Ray exports them from it
        self.turn = asyncio.Lock()  # one run at a time

    def features(self, role: str, query: api.Query) -> dict:
        """Decoded here, one image at a time, in the worker thread that runs the batch."""
        images = self._images(query)
        retriever = self.embedder.retriever
        return (
            retriever.query(query.text, images)
            if role == "query"
            else retriever.candidate(query.text, images[0])
        )

    def _images(self, query: api.Query) -> list:
        return [self._product(i) if isinstance(i, str) else self.rgb(i) for i in query.images]

    def _features(self, items: list[tuple], out: list) -> dict[int, dict]:
        """Each input's features, by its place in the batch; an input the processor cannot take gets
        ``Refused`` in ``out``. A batch's queries go through the processor in one call where the
        retriever has one (``queries``); when that call fails, each alone, so that only the input at fault
        is refused."""
        features: dict[int, dict] = {}
        together = getattr(self.embedder.retriever, "queries", None)
        asked = [i for i, item in enumerate(items) if item[0] == "query"] if together else []
        if len(asked) > 1:
            try:
                inputs = [(items[i][1].text, self._images(items[i][1])) for i in asked]
                features = dict(zip(asked, together(inputs), strict=True))
            except Exception:
                features = {}
        for i, (role, query, _, _) in enumerate(items):
            if i not in features:
                try:
                    features[i] = self.features(role, query)
                except Exception as e:
                    out[i] = api.refused(e)
        return features

    def _product(self, pid: str):
        image = self.products.images(pid)
        if self.image_features is not None:
            self.image_features.keep(image)
        return image

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
        """The batch's embeddings (``Embedded``, or ``Refused``), the rows that want hits, and their hits
        when the index is here."""
        out: list = [None] * len(items)
        features = self._features(items, out)
        for i, v in zip(features, self._embed(list(features.values())), strict=True):
            out[i] = v
        wanted = [i for i, item in enumerate(items) if item[2] > 0 and isinstance(out[i], np.ndarray)]
        hits = (
            self.table.search_many(*self._queries(items, out, wanted))
            if self.table is not None and wanted
            else None
        )
        for i, f in features.items():  # an embedding comes with its input's tokens (``/v1/embeddings``)
            if items[i][2] == 0 and isinstance(out[i], np.ndarray):
                out[i] = api.Embedded(out[i], int(np.asarray(f.get("input_ids", ())).size))
        return out, wanted, hits

    @staticmethod
    def _queries(items, vectors, wanted) -> tuple[np.ndarray, list[int]]:
        return np.stack([vectors[i] for i in wanted]), [items[i][2] for i in wanted]

    async def run(self, items: list[tuple]) -> list:
        """(role, query, top_k, arrived) -> the embedding, or the top_k hits when top_k > 0, or
        ``Refused``. The model runs in a worker thread, so that the replica's event loop (where Serve runs
        this) keeps taking requests and the next batch fills meanwhile: even for a lone request, since one
        run on the loop would hide the requests that arrive during it, and each would look alone in turn.
        Runs take turns (a lone request's and a batch's would otherwise share the cores)."""
        async with self.turn:
            self.metrics.in_flight(self.pacing.in_flight)  # a gauge: read as each batch starts
            start = time.perf_counter()
            self.counts["batches"] += 1
            self.counts["requests"] += len(items)
            with self.pacing.running(len(items)):  # the next batch waits about as long as this runs
                out, wanted, hits = await asyncio.to_thread(self._work, items)
                if wanted and hits is None:
                    hits = await self.index.search_many.remote(*self._queries(items, out, wanted))
        refused = sum(isinstance(v, api.Refused) for v in out)
        self.counts["refused"] += refused
        self.metrics.batch(
            [start - item[3] for item in items],
            time.perf_counter() - start,
            {"searched": len(wanted), "embedded": len(items) - len(wanted) - refused, "refused": refused},
        )
        for i, h in zip(wanted, hits or [], strict=True):
            out[i] = h
        return out

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def run_many(self, items: list[tuple]) -> list:
        return await self.run(items)

    async def _all(self, items: list[tuple]) -> list:
        """One request's inputs (role, query, top_k): queued at once, so that they land in the same batch
        where they fit; a lone request of one input runs at once, without the batch queue."""
        now = time.perf_counter()
        items = [(*item, now) for item in items]
        wait = self.pacing.arrive(len(items))
        try:
            if len(items) == 1 and self.pacing.alone():  # nothing to batch with: no batch queue
                return await self.run(items)
            self.run_many.set_batch_wait_timeout_s(wait)  # read when the request opens a batch
            return list(await asyncio.gather(*(self.run_many(item) for item in items)))
        finally:
            self.pacing.leave(len(items))
            if not self.pacing.in_flight:  # idle: the gauge reads 0, not the last batch's count
                self.metrics.in_flight(0)

    async def embed(self, role: str, queries: list[api.Query]) -> list:
        """Each query's ``Embedded`` (or ``Refused``), in order."""
        return await self._all([(role, q, 0) for q in queries])

    async def search(self, queries: list[api.Query], ks: list[int]) -> list:
        """Each query's top ``ks[i]`` hits (or ``Refused``), in order."""
        return await self._all([("query", q, k) for q, k in zip(queries, ks, strict=True)])

    async def ran(self) -> dict:
        """Batches and inputs (queries, embeddings) this replica has run, and inputs it refused."""
        caches = {"image_features": self.image_features, "vision": self.vision}
        kept = {name: {"hits": c.hits, "misses": c.misses} for name, c in caches.items() if c is not None}
        return {**self.counts, **kept}


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
        configure(self.limits, token_digest, HttpMetrics())  # metrics made here, in the replica
        # concurrent searches go to the encoder in one call while enough calls are out (batching on)
        size, encoder = info["batching"]["max_batch_size"], config.serve.encoder
        calls = 2 * int(encoder.autoscaling.get("max_replicas", encoder.replicas))
        self.grouped = grouping.Grouped(self._search_many, calls, size) if size > 1 else None

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/v1/info", dependencies=[Depends(authorized)])
    async def info(self) -> dict:
        """The app's description, and what the encoder replica that answers has run so far."""
        return {**self.info_body, "encoder_ran": await retried(lambda: self.encoder.ran.remote())}

    @app.post(
        "/v1/search",
        dependencies=[Depends(authorized)],
        response_model=api.SearchResponse,
        response_model_exclude_none=True,
    )
    async def search(self, body: api.SearchRequest) -> dict:
        """One query (``parts``): its ``results``; several (``queries``): each one's, in order."""
        parts, ks, names = body.asked()
        for k in ks:
            api.check_top_k(k, self.limits)
        queries = await to_queries(parts, names, self.limits, self.pool)
        asked = (queries, ks)
        found = (
            await self.grouped(asked) if self.grouped is not None else (await self._search_many([asked]))[0]
        )
        hits = api.answers(found, names)
        answered = {
            "checkpoint": self.info_body["checkpoint"]["hash"],
            "index": self.info_body["index"]["id"],
        }
        if body.queries is None:
            return {"results": hits[0], **answered}
        return {"queries": [{"results": h} for h in hits], **answered}

    async def _search_many(self, asked: list[tuple[list[api.Query], list[int]]]) -> list[list]:
        """Several requests' queries embedded and searched in one call to the encoder (into its batch),
        sent again if its replica dies meanwhile: each request's answers (hits or ``Refused``)."""
        queries = [q for qs, _ in asked for q in qs]
        ks = [k for _, request_ks in asked for k in request_ks]
        out = await retried(lambda: self.encoder.search.remote(queries, ks))
        answers, start = [], 0
        for qs, _ in asked:
            answers.append(out[start : start + len(qs)])
            start += len(qs)
        return answers

    @app.post("/v1/embed", dependencies=[Depends(authorized)], response_model=api.EmbedResponse)
    async def embed(self, body: api.EmbedRequest) -> dict:
        to = api.to_query if body.role == "query" else api.to_candidate
        queries = await to_queries([body.parts], ["parts"], self.limits, self.pool, to)
        vector = api.answers(await retried(lambda: self.encoder.embed.remote(body.role, queries)), ["parts"])
        vector = vector[0].vector
        return {
            "embedding": vector.tolist(),
            "dim": len(vector),
            "checkpoint": self.info_body["checkpoint"]["hash"],
        }

    @app.post(
        "/v1/embeddings", dependencies=[Depends(authorized)], response_model=embeddings.EmbeddingsResponse
    )
    async def openai_embeddings(self, body: embeddings.EmbeddingsRequest) -> dict:
        """OpenAI's embeddings API (``coral.serve.embeddings``): one embedding an input, in order."""
        role = embeddings.role_of(body)
        embeddings.check_dimensions(body.dimensions, self.info_body["dim"])
        queries, names = await asyncio.to_thread(embeddings.to_queries, body, role, self.limits, self.pool)
        embedded = api.answers(await retried(lambda: self.encoder.embed.remote(role, queries)), names)
        return embeddings.response(embedded, self.info_body["checkpoint"]["hash"], body.encoding_format)
