"""The Serve deployments of the retriever: the query ``Encoder`` (batches concurrent requests with
``@serve.batch``), the ``Index`` (an ``IndexTable``: the FAISS index and its candidate table) and the HTTP
``Ingress``, and what their replicas check and read when they start: the checkpoint/index binding the app
was built with, and the candidate pool, read from storage rather than carried in deployment arguments.

``coral.serve.app`` chooses where the index lives and binds these into the application.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import numpy as np
import torch
from fastapi import Depends
from ray import serve
from ray.serve._private import constants as serve_constants

from coral import checkpoint, storage
from coral import schemas as S
from coral.catalog import lookup
from coral.config import Config, IndexStageConfig, ServeConfig, StorageConfig
from coral.search import index as search_index
from coral.search import knn
from coral.search.embedder import Embedder
from coral.serve import api
from coral.serve.http import app, authorized, configure
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


def pool_ids(index_dir: storage.Location) -> list[str]:
    """The candidate pool's product ids (the index's rows)."""
    data = index_dir.child("data")
    return storage.read_dataset(data, columns=[S.ID])[S.ID].to_pylist()


def pool_products(config: Config, index_dir: storage.Location) -> dict:
    """id, title and image columns of the candidate pool's products (for product parts)."""
    run_root = storage.resolve(config.run.run_root, config.storage)
    return lookup.columns(lookup.read(run_root, ids=pool_ids(index_dir)))


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


class IndexTable:
    """The FAISS index and its candidate table (row -> id, title). ``bound``: the checkpoint and index the
    app was built with; an index that is not that one any more refuses to load."""

    def __init__(self, index_uri: str, storage_cfg: StorageConfig, index_cfg: IndexStageConfig, bound: dict):
        index_dir = storage.resolve(index_uri, storage_cfg)
        self.index, meta, table = search_index.load(index_dir, index_cfg)  # checks index.faiss's SHA-256
        same_index(meta, bound, index_dir.uri)
        self.ids, self.titles = table[S.ID].to_pylist(), table[S.TITLE].to_pylist()

    def search_many(self, vectors: np.ndarray, ks: list[int]) -> list[list[dict]]:
        """One FAISS search for a batch of query vectors; row i keeps its own top ``ks[i]``."""
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
class Encoder:
    """Query and candidate embeddings, and the search of queries: concurrent requests are embedded together
    (``@serve.batch``) and a batch's queries go to the index in one call. A request whose input the model
    cannot take gets ``api.Refused`` for itself alone. A request whose HTTP client goes away is cancelled
    by Serve down to here, and a cancelled request waiting for a batch is left out of it (``serve.batch``
    drops cancelled requests when it forms the batch)."""

    def __init__(self, config: Config, bound: dict, settings: ReplicaSettings, index):
        """``bound``: the checkpoint and index the app was built with, checked again here (a replica may
        start long after, when autoscaling or a restart brings it up). ``index``: the index deployment's
        handle, or the arguments of an ``IndexTable`` to search in this process
        (``serve.index_in_encoder``)."""
        torch.set_num_threads(settings.threads)
        index_dir = storage.resolve(config.run.run_root, config.storage).child("index")
        ckpt = check_binding(config, index_dir, bound)
        self.embedder = Embedder(ckpt.uri, ckpt.kind, config.storage, settings.device, settings.dtype)
        # the pool's images, read here from storage: never deployment arguments held by the controller
        self.products = lookup.products_from(pool_products(config, index_dir))
        self.rgb = lookup.rgb
        local = isinstance(index, dict)
        self.table = IndexTable(**index) if local else None
        self.index = None if local else over_serve_transport(index)
        self.run_many.set_max_batch_size(settings.batch_size)
        self.pacing = BatchWait(settings.batch_wait_s)
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
