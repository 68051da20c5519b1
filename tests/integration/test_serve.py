"""The Serve application over real HTTP on 127.0.0.1, on the session's short training run: every route,
served embeddings equal to offline ones (and OpenAI's ``/v1/embeddings`` equal to ``/v1/embed``),
served top-10 equal to the offline evaluation's, several queries a search, the right 4xx for bad requests
and tokens, the app's metrics on Ray's metrics endpoint, a mismatched checkpoint refused."""

from __future__ import annotations

import base64
import functools
import io
import json
import os
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from coral import checkpoint, manifest, storage
from coral import schemas as S
from coral.catalog import lookup
from coral.models import retrievers
from coral.serve import binding, client, deploy
from coral.serve.app import application
from tests.conftest import free_port
from tests.tolerance import assert_same_search, ranking_differences

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]

TOKEN = "s3cret-token-for-tests-0123456789"
BODY_LIMIT = 256 * 1024


def start_with_token(config) -> str:
    """Deploy with the token in the environment only while the app is built (it keeps its digest)."""
    os.environ["CORAL_TEST_TOKEN"] = TOKEN
    try:
        return deploy.start(config)
    finally:
        del os.environ["CORAL_TEST_TOKEN"]


@pytest.fixture(scope="module")
def served(trained_run):
    root, cfg = trained_run
    from dataclasses import replace

    serve_cfg = replace(cfg.serve, port=free_port(), max_body_bytes=BODY_LIMIT, token_env="CORAL_TEST_TOKEN")
    config = replace(cfg, serve=serve_cfg)
    url = start_with_token(config)
    with httpx.Client(timeout=60, headers=client.headers(TOKEN)) as http:
        yield url, http, root, config
    deploy.stop(config)


def held_out(root: Path, n: int) -> list[dict]:
    rows = pq.read_table(root / "merit" / "data").to_pylist()
    return [r for r in rows if r[S.SPLIT] == "test"][:n]


def catalog_images(root: Path) -> dict[str, bytes]:
    t = pq.read_table(root / "catalog" / "data", columns=[S.ID, S.IMAGE])
    return dict(zip(t[S.ID].to_pylist(), t[S.IMAGE].to_pylist(), strict=True))


def pool_ids(root: Path) -> set[str]:
    return set(pq.read_table(root / "index" / "data", columns=[S.ID])[S.ID].to_pylist())


def test_routes(served):
    url, http, root, _ = served
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}  # no token needed
    info = http.get(f"{url}/v1/info").json()
    meta = checkpoint.read_index_meta(storage.resolve(str(root / "index")))
    assert info["checkpoint"]["hash"] == meta["checkpoint"]["hash"] and info["dim"] == meta["dim"]
    assert info["index"]["count"] == meta["count"] == len(pool_ids(root))
    assert info["index"]["id"] == manifest.read_complete(storage.resolve(str(root / "index")))["hash"]
    # the tests' Ray runs Serve throughput-optimized, so replicas call each other over gRPC, although this
    # module imported Ray Serve before that was set (the transport a driver's handles start with)
    assert info["replica_calls"] == "grpc"
    assert info["index"]["in_encoder"] is True and info["index"]["layout"].startswith("auto: the index is")
    spec = http.get(f"{url}/openapi.json").json()
    assert {"/v1/search", "/v1/embed", "/v1/embeddings", "/v1/info", "/healthz"} <= set(spec["paths"])
    r = http.post(f"{url}/v1/search", json={"parts": [{"type": "text", "text": "a red mug"}], "top_k": 7})
    body = r.json()
    assert r.status_code == 200 and len(body["results"]) == 7
    assert [h["rank"] for h in body["results"]] == list(range(1, 8))
    assert {h["id"] for h in body["results"]} <= pool_ids(root)
    scores = [h["score"] for h in body["results"]]
    assert scores == sorted(scores, reverse=True)
    assert body["checkpoint"] == info["checkpoint"]["hash"] and body["index"] == info["index"]["id"]


def test_served_embeddings_equal_offline(served):
    from coral.search.embedder import Embedder

    url, http, root, _ = served
    embedder = Embedder(str(root / "train" / "model"), "coral")
    images = catalog_images(root)
    products = lookup.products_from(
        {S.ID: list(images), S.TITLE: [""] * len(images), S.IMAGE: list(images.values())}
    )
    q = held_out(root, 1)[0]
    parts = client.parts_for(q[S.QUERY_TEXT], q[S.QUERY_IMAGE_IDS], set(), images)  # images inline
    served_q = np.asarray(http.post(f"{url}/v1/embed", json={"parts": parts}).json()["embedding"])
    offline_q = embedder([retrievers.query_features(embedder.retriever, q, products)])[0]
    np.testing.assert_allclose(served_q, offline_q, atol=1e-5)
    # a candidate: title + product, against the vector the index stage stored for it
    table = pq.read_table(root / "index" / "data").to_pylist()[0]
    parts = [{"type": "text", "text": table[S.TITLE]}, {"type": "product", "id": table[S.ID]}]
    served_c = http.post(f"{url}/v1/embed", json={"parts": parts, "role": "candidate"}).json()["embedding"]
    np.testing.assert_allclose(served_c, table["embedding"], atol=1e-5)


def test_served_top10_equals_the_offline_evaluation(served):
    url, http, root, _ = served
    evaluated = pq.read_table(root / "evaluate" / "data").to_pylist()
    offline = {r[S.QUERY_ID]: (r["top_ids"], r["top_scores"]) for r in evaluated if r["model"] == "trained"}
    queries = [q for q in held_out(root, 10_000) if q[S.QUERY_ID] in offline][:100]
    assert len(queries) == 100
    images, pool = catalog_images(root), pool_ids(root)

    def ask(q):  # 8 at a time, so the encoder batches them
        parts = client.parts_for(q[S.QUERY_TEXT], q[S.QUERY_IMAGE_IDS], pool, images)
        hits = client.search(http, url, parts, 10)["results"]
        return [h["id"] for h in hits], [h["score"] for h in hits]

    with ThreadPoolExecutor(8) as pool_:
        served_top = list(pool_.map(ask, queries))
    # other batch shapes and processes: ids exact but for ties, scores within a tolerance
    differ = {
        q[S.QUERY_ID]: d
        for q, (ids, scores) in zip(queries, served_top, strict=True)
        if (d := ranking_differences(ids, scores, *offline[q[S.QUERY_ID]]))
    }
    assert not differ, f"{len(differ)} of 100 queries ranked differently, e.g. {list(differ.items())[:3]}"


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels in a few bytes (an image bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


@functools.cache
def black_png(width: int, height: int) -> bytes:
    """A real, fully decodable PNG: 4096 x 4096 black is about 49 KB of file and 50 MB of RGB pixels."""
    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, "PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def openai_body(inputs, **extra) -> dict:
    """OpenAI's wire format, as its Python client sends it (``encoding_format`` base64 by default)."""
    return {"model": "coral", "input": inputs, "encoding_format": "float", **extra}


def data_uri(image: bytes) -> str:
    return f"data:image/png;base64,{b64(image)}"


def test_openai_embeddings_equal_embed_for_the_same_input(served):
    """``/v1/embeddings`` in OpenAI's wire format: OpenAI's response shape, one vector an input in order,
    each the one ``/v1/embed`` gives the same input (the same batch or not: a tolerance), the candidate
    role by field or model suffix, base64 as OpenAI's client decodes it; its inputs share one batch."""
    url, http, root, config = served
    images, pool = catalog_images(root), sorted(pool_ids(root))
    picture = next(iter(images.values()))
    inputs = [
        "a red mug",
        [{"type": "text", "text": "like "}, {"type": "image_url", "image_url": {"url": data_uri(picture)}}],
        [{"type": "text", "text": "like "}, {"type": "product", "id": pool[0]}],
    ]
    as_parts = [
        [{"type": "text", "text": "a red mug"}],
        [{"type": "text", "text": "like "}, {"type": "image", "image": b64(picture)}],
        inputs[2],
    ]
    before = http.get(f"{url}/v1/info").json()["encoder_ran"]
    r = http.post(f"{url}/v1/embeddings", json=openai_body(inputs))
    after = http.get(f"{url}/v1/info").json()["encoder_ran"]
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"object", "data", "model", "usage"} and body["object"] == "list"
    info = http.get(f"{url}/v1/info").json()
    assert body["model"] == info["checkpoint"]["hash"]
    assert [(d["object"], d["index"]) for d in body["data"]] == [("embedding", i) for i in range(3)]
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
    assert (after["requests"] - before["requests"], after["batches"] - before["batches"]) == (3, 1)
    for got, parts in zip(body["data"], as_parts, strict=True):
        assert len(got["embedding"]) == info["dim"]
        alone = http.post(f"{url}/v1/embed", json={"parts": parts}).json()["embedding"]
        np.testing.assert_allclose(got["embedding"], alone, atol=1e-5)
    packed = http.post(f"{url}/v1/embeddings", json=openai_body("a red mug", encoding_format="base64")).json()
    unpacked = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), dtype="float32")
    np.testing.assert_allclose(unpacked, body["data"][0]["embedding"], atol=1e-5)
    candidate = [{"type": "text", "text": "Red mug"}, {"type": "product", "id": pool[1]}]
    expected = http.post(f"{url}/v1/embed", json={"parts": candidate, "role": "candidate"}).json()[
        "embedding"
    ]
    for extra in ({"role": "candidate"}, {"model": "coral:candidate"}):
        got = http.post(f"{url}/v1/embeddings", json=openai_body([candidate], **extra)).json()["data"][0]
        np.testing.assert_allclose(got["embedding"], expected, atol=1e-5)


@pytest.mark.parametrize(
    "body,status,words",
    [
        (
            openai_body([[{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]]),
            422,
            "input[0][0]: image_url is an http(s) URL",
        ),
        (openai_body([[1, 2, 3]]), 422, "token ids are not accepted"),
        (openai_body("x", dimensions=3), 422, "dimensions=3"),
        (openai_body(["x"] * 33), 422, "33 inputs, over the limit 32"),
        (openai_body(["Red mug"], role="candidate"), 422, "input[0]: a candidate has exactly one image"),
        (openai_body(["x", "y" * 5000]), 422, "input[1][0]: text over 4000 characters"),
        (
            openai_body(
                ["ok", [{"type": "image_url", "image_url": {"url": data_uri(png_header(5000, 5000))}}]]
            ),
            413,
            "input[1][0]: image is 5000x5000",
        ),
        (
            openai_body(["ok", [{"type": "image_url", "image_url": {"url": data_uri(black_png(1, 300))}}]]),
            422,
            "input[1]: the model cannot take this input",
        ),
        (openai_body("x" * (BODY_LIMIT + 10)), 413, "request body over"),
    ],
)
def test_bad_embeddings_requests_get_a_4xx_naming_the_input(served, body, status, words):
    url, http, _, _ = served
    r = http.post(f"{url}/v1/embeddings", json=body)
    assert r.status_code == status, r.text
    assert words in r.json()["detail"] and "Traceback" not in r.json()["detail"]


def test_several_queries_a_search_are_answered_in_order_from_one_batch(served):
    """``queries``: each query's results, in order and with its own top_k, as a search of each alone
    answers (scores within a tolerance: another batch); all of them run in one encoder batch."""
    url, http, root, _ = served
    pool = sorted(pool_ids(root))
    asks = [
        {"parts": [{"type": "text", "text": "like "}, {"type": "product", "id": pool[i]}], "top_k": 3 + i}
        for i in range(5)
    ]
    asks[4] = {"parts": [{"type": "text", "text": "a red mug"}]}  # the request's top_k
    before = http.get(f"{url}/v1/info").json()["encoder_ran"]
    r = http.post(f"{url}/v1/search", json={"queries": asks, "top_k": 4})
    after = http.get(f"{url}/v1/info").json()["encoder_ran"]
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"queries", "checkpoint", "index"} and len(body["queries"]) == len(asks)
    assert (after["requests"] - before["requests"], after["batches"] - before["batches"]) == (5, 1)
    for answer, ask in zip(body["queries"], asks, strict=True):
        alone = http.post(f"{url}/v1/search", json={"top_k": 4, **ask}).json()
        assert len(answer["results"]) == ask.get("top_k", 4)
        assert_same_search({**answer, "checkpoint": body["checkpoint"], "index": body["index"]}, alone)
    many = client.search_many(http, url, [a["parts"] for a in asks[:2]], top_k=2)
    assert [[h["rank"] for h in hits] for hits in many] == [[1, 2], [1, 2]]


def scrape(address: str) -> dict[str, float]:
    """Ray's metrics endpoint: each sample name's value, summed over its labels; and ``name{k=v,...}``
    for the coral metrics' labelled samples."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, float] = {}
    text = httpx.get(f"http://{address}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            names = [sample.name]
            if sample.name.startswith("ray_coral_serve"):
                keep = {k: v for k, v in sample.labels.items() if k in ("route", "status", "outcome", "le")}
                names.append(sample.name + "{" + ",".join(f"{k}={v}" for k, v in sorted(keep.items())) + "}")
            for name in names:
                totals[name] = totals.get(name, 0.0) + sample.value
    return totals


def test_the_apps_metrics_reach_rays_metrics_endpoint(served):
    """Batch sizes, queue waits, latency by route, requests and refusals, recorded by the replicas through
    ``ray.util.metrics`` and exported on the node's metrics endpoint (Ray reports them every few
    seconds: polled, within a bound)."""
    import ray

    url, http, root, _ = served
    pool = sorted(pool_ids(root))
    queries = [{"parts": [{"type": "text", "text": "like "}, {"type": "product", "id": p}]} for p in pool[:4]]
    assert http.post(f"{url}/v1/search", json={"queries": queries, "top_k": 3}).status_code == 200
    assert http.post(f"{url}/v1/embeddings", json=openai_body(["a", "b"])).status_code == 200
    assert http.post(f"{url}/v1/embed", json={"parts": []}).status_code == 422
    assert httpx.post(f"{url}/v1/search", json=queries[0]).status_code == 401  # no token
    node = next(n for n in ray.nodes() if n["Alive"])
    address = f"{node['NodeManagerAddress']}:{node['MetricsExportPort']}"
    wanted = {
        "ray_coral_serve_requests_total{route=/v1/search,status=200}",
        "ray_coral_serve_requests_total{route=/v1/embeddings,status=200}",
        "ray_coral_serve_refusals_total{route=/v1/embed,status=422}",
        "ray_coral_serve_refusals_total{route=/v1/search,status=401}",
        "ray_coral_serve_request_seconds_count{route=/v1/search}",
        "ray_coral_serve_request_seconds_count{route=/v1/embeddings}",
        "ray_coral_serve_batch_size_count",
        "ray_coral_serve_batch_size_sum",
        "ray_coral_serve_queue_wait_seconds_count",
        "ray_coral_serve_batch_seconds_count",
        "ray_coral_serve_encoder_inputs_total{outcome=searched}",
        "ray_coral_serve_encoder_inputs_total{outcome=embedded}",
    }
    deadline, seen = time.monotonic() + 120, {}
    while time.monotonic() < deadline:
        seen = scrape(address)
        if all(seen.get(name, 0) > 0 for name in wanted) and "ray_coral_serve_encoder_in_flight" in seen:
            break
        time.sleep(2)
    missing = sorted(name for name in wanted if seen.get(name, 0) <= 0)
    assert not missing, (missing, sorted(n for n in seen if "coral" in n)[:40])
    # the 4-query search ran as one batch: batches over 2 inputs are on record
    assert seen["ray_coral_serve_batch_size_bucket{le=2.0}"] < seen["ray_coral_serve_batch_size_count"]


@pytest.mark.parametrize(
    "body,status,words",
    [
        (b'{"parts": [{"type": "text", "text": "x"}', 400, "malformed JSON"),
        ({"parts": [{"type": "video", "url": "http://127.0.0.1/x"}]}, 422, "video"),
        ({"parts": [{"type": "image", "image": "not base64 at all!"}]}, 422, "not valid base64"),
        ({"parts": [{"type": "image", "image": b64(b"GIF89a garbage")}]}, 422, "not a readable image"),
        ({"parts": [{"type": "image", "image": b64(png_header(30_000, 30_000))}]}, 413, "over the limit"),
        ({"parts": [{"type": "image", "image": b64(png_header(5000, 5000))}]}, 413, "5000x5000"),
        (
            {"parts": [{"type": "image", "image": b64(black_png(4096, 4096))}] * 2},
            413,
            "over the limit 16777216 a request",
        ),
        (b'{"parts": [{"type": "text", "text": "lone \\ud800 surrogate"}]}', 422, "lone surrogate"),
        ({"parts": [{"type": "text", "text": "x" * (BODY_LIMIT + 10)}]}, 413, "request body over"),
        ({"parts": [{"type": "product", "id": "no-such-product"}]}, 422, "unknown product id"),
        ({"parts": [{"type": "text", "text": "x"}] * 17}, 422, "over the limit 16"),
        ({"parts": [{"type": "text", "text": "x"}], "top_k": 101}, 422, "top_k=101"),
        ({"parts": [{"type": "text", "text": "x"}], "top_k": 0}, 422, "top_k"),
        ({"parts": []}, 422, "parts"),
        ({"parts": [{"type": "text", "text": "x"}], "extra": 1}, 422, "extra"),
        (
            {
                "parts": [{"type": "text", "text": "x"}],
                "queries": [{"parts": [{"type": "text", "text": "y"}]}],
            },
            422,
            "not both",
        ),
        ({"queries": [{"parts": [{"type": "text", "text": "x"}]}] * 33}, 422, "33 inputs, over the limit 32"),
        (
            {
                "queries": [
                    {"parts": [{"type": "text", "text": "x"}]},
                    {"parts": [{"type": "product", "id": "no"}]},
                ]
            },
            422,
            "queries[1].parts[0]: unknown product id",
        ),
        ({"queries": [{"parts": [{"type": "text", "text": "x"}], "top_k": 101}]}, 422, "top_k=101"),
    ],
)
def test_bad_requests_get_a_4xx_with_a_message(served, body, status, words):
    url, http, _, _ = served
    if isinstance(body, bytes):
        r = http.post(f"{url}/v1/search", content=body, headers={"content-type": "application/json"})
    else:
        r = http.post(f"{url}/v1/search", json=body)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert words in detail and "Traceback" not in detail


def test_token_is_checked_on_every_route_but_healthz_and_never_logged(served):
    url, _, _, _ = served
    q = {"parts": [{"type": "text", "text": "a mug"}]}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        assert httpx.post(f"{url}/v1/search", json=q, headers=headers).status_code == 401
        assert httpx.post(f"{url}/v1/embed", json=q, headers=headers).status_code == 401
        assert httpx.post(f"{url}/v1/embeddings", json={"input": "a"}, headers=headers).status_code == 401
        assert httpx.get(f"{url}/v1/info", headers=headers).status_code == 401
    assert httpx.get(f"{url}/healthz").status_code == 200
    logs = Path("/tmp/ray/session_latest/logs")  # this session's: the tests' Ray uses the default temp dir
    assert logs.is_dir()
    leaked = [p.name for p in logs.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert not leaked, f"the token is in {leaked}"


def test_the_direct_path_answers_as_the_proxy_does(served):
    """The tests' Ray runs Serve throughput-optimized (``ray.serve_throughput_optimized``), so the ingress
    replica takes HTTP itself too: the same answers, limits and token check there as through the proxy."""
    url, http, root, config = served
    assert os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    direct = deploy.direct_url(config.serve)
    assert direct is not None and direct != url
    assert httpx.get(f"{direct}/healthz").json() == {"status": "ok"}
    pool = sorted(pool_ids(root))
    for i in range(3):
        q = {"parts": [{"type": "text", "text": "like "}, {"type": "product", "id": pool[i]}], "top_k": 5}
        assert_same_search(
            http.post(f"{direct}/v1/search", json=q).json(), http.post(f"{url}/v1/search", json=q).json()
        )
    q = {"parts": [{"type": "text", "text": "a mug"}]}
    assert httpx.post(f"{direct}/v1/search", json=q).status_code == 401
    bad = http.post(f"{direct}/v1/search", content=b"{", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "malformed JSON" in bad.json()["detail"]
    big = http.post(
        f"{direct}/v1/search", json={"parts": [{"type": "text", "text": "x" * (BODY_LIMIT + 10)}]}
    )
    assert big.status_code == 413


def test_the_index_deployment_answers_as_the_index_in_the_encoder_does(served):
    """The module's app searches its small index in the encoder ("auto"); with
    ``serve.index_in_encoder: false`` an index deployment does, alone and in batches, with the same
    answers: ids and ranks exact (ties aside), scores within a tolerance, since a batch sums in another
    order."""
    from dataclasses import replace

    from ray import serve

    url, http, root, config = served
    assert set(serve.status().applications[config.serve.app_name].deployments) == {"Encoder", "Ingress"}
    split_serve = replace(config.serve, app_name="coral_split", route_prefix="/split", index_in_encoder=False)
    split = replace(config, serve=split_serve)
    split_url = start_with_token(split)
    try:
        assert set(serve.status().applications["coral_split"].deployments) == {"Encoder", "Index", "Ingress"}
        index = http.get(f"{split_url}/v1/info").json()["index"]
        assert index["in_encoder"] is False and index["layout"] == "serve.index_in_encoder: false"
        pool = sorted(pool_ids(root))
        queries = [
            {"parts": [{"type": "text", "text": "like "}, {"type": "product", "id": pool[i]}], "top_k": 5 + i}
            for i in range(8)
        ]

        def ask(base: str, q: dict) -> dict:
            return http.post(f"{base}/v1/search", json=q).json()

        with ThreadPoolExecutor(8) as pool_:  # together, so the encoder batches them
            together = list(pool_.map(lambda q: ask(split_url, q), queries))
        for q, answer in zip(queries, together, strict=True):  # batched and alone: scores within a tolerance
            expected = ask(url, q)
            assert_same_search(ask(split_url, q), expected)  # alone
            assert_same_search(answer, expected)
            assert len(answer["results"]) == q["top_k"]
    finally:
        deploy.stop(split, shutdown=False)


def test_concurrent_searches_share_the_encoders_batches(served):
    """48 searches from 16 clients at once run as batches, not one by one: a lone request runs the model
    off the event loop too, so that requests arriving meanwhile see company and queue for the next
    batch (with the model on the loop, all 48 ran alone)."""
    url, http, root, config = served
    assert config.serve.encoder.replicas == 1  # both /v1/info calls count the same replica's runs
    pool = sorted(pool_ids(root))
    before = http.get(f"{url}/v1/info").json()["encoder_ran"]
    queries = [
        {
            "parts": [{"type": "text", "text": "like "}, {"type": "product", "id": pool[i % len(pool)]}],
            "top_k": 5,
        }
        for i in range(48)
    ]
    with ThreadPoolExecutor(16) as pool_:
        answers = list(pool_.map(lambda q: http.post(f"{url}/v1/search", json=q), queries))
    assert [a.status_code for a in answers] == [200] * len(queries)
    after = http.get(f"{url}/v1/info").json()["encoder_ran"]
    requests, batches = (after[k] - before[k] for k in ("requests", "batches"))
    assert requests == len(queries) and batches <= requests // 2, (batches, requests)


def test_auto_keeps_a_small_unscaled_index_in_the_encoder(trained_run):
    from dataclasses import replace

    from coral.config import DeploymentConfig
    from coral.serve.app import index_layout

    root, cfg = trained_run
    index_dir = storage.resolve(str(root / "index"))
    mib = (root / "index" / "index.faiss").stat().st_size / 2**20

    def layout(**changes):
        return index_layout(replace(cfg.serve, **changes), index_dir)

    assert layout() == (True, f"auto: the index is {mib:.1f} MiB, within serve.index_in_encoder_max_mb")
    assert layout(index_in_encoder_max_mb=mib / 2) == (
        False,
        f"auto: the index is {mib:.1f} MiB, over serve.index_in_encoder_max_mb",
    )
    for scaled in (dict(num_gpus=0.5), dict(replicas=2), dict(autoscaling={"max_replicas": 4})):
        inside, why = layout(index=DeploymentConfig(**scaled))
        assert not inside and "serve.index asks for" in why
    assert layout(index_in_encoder=True, index_in_encoder_max_mb=0)[0] is True
    assert layout(index_in_encoder=False)[0] is False


def test_a_mismatched_checkpoint_refuses_to_start(trained_run, tiny_models):
    from dataclasses import replace

    _, cfg = trained_run
    other = replace(cfg, serve=replace(cfg.serve, checkpoint=str(tiny_models["qwen2_vl"])))
    with pytest.raises(checkpoint.IndexMismatch) as e:
        application(other)
    trained = checkpoint.describe(str(Path(cfg.run.run_root) / "train" / "model"), "coral")
    untrained = checkpoint.describe(str(tiny_models["qwen2_vl"]), "coral")
    assert trained.hash in str(e.value) and untrained.hash in str(e.value)


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_fuzzing_from_the_openapi_spec_finds_no_5xx(served, mode):
    """Requests generated from the app's own OpenAPI document, fitting it and not: never a server error.
    (schemathesis drives hypothesis directly; its pytest plugin does not load under pytest 9.)"""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.generation.modes import GenerationMode

    url, _, _, _ = served
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", headers=client.headers(TOKEN), timeout=30)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {
        "/v1/search",
        "/v1/embed",
        "/v1/embeddings",
        "/v1/info",
        "/healthz",
    }
    seen: list[int] = []
    for op in operations:
        if mode == "negative" and op.method.upper() == "GET":
            continue  # no parameters or body: nothing can be made invalid

        @settings(
            max_examples=40,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=op.as_strategy(generation_mode=GenerationMode(mode)))
        def call(case):
            response = case.call(base_url=url, headers=client.headers(TOKEN), timeout=60)
            seen.append(response.status_code)
            assert response.status_code < 500, (
                f"{case.method} {case.path}: {response.status_code} {response.text[:300]}"
            )

        call()
    assert len(seen) >= 2 * 40
    if mode == "negative":
        assert any(400 <= code < 500 for code in seen)  # invalid requests were sent, and refused


def replicas() -> dict[str, str]:
    """Every Serve replica's id and state (a replica that died and came back has a new id)."""
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    return {
        r["replica_id"]: r["state"]
        for app in details["applications"].values()
        for d in app["deployments"].values()
        for r in d["replicas"]
    }


def test_a_request_the_model_cannot_take_fails_alone(served):
    """16 searches at once, one of them with a 1 x 300 image (Qwen's resize refuses an aspect ratio over
    200): 15 answers and one 422, batched together, and the encoder replica lives on."""
    url, http, root, _ = served
    pool = sorted(pool_ids(root))
    before, alive = http.get(f"{url}/v1/info").json()["encoder_ran"], replicas()
    good = [
        {"parts": [{"type": "text", "text": "like "}, {"type": "product", "id": pool[i]}], "top_k": 3}
        for i in range(15)
    ]
    poisoned = {
        "parts": [{"type": "text", "text": "like "}, {"type": "image", "image": b64(black_png(1, 300))}]
    }
    bodies = [*good[:8], poisoned, *good[8:]]
    with ThreadPoolExecutor(16) as pool_:
        answers = list(pool_.map(lambda q: http.post(f"{url}/v1/search", json=q), bodies))
    codes = [a.status_code for a in answers]
    assert codes == [200] * 8 + [422] + [200] * 7, codes
    assert "aspect ratio" in answers[8].json()["detail"] and "Traceback" not in answers[8].json()["detail"]
    assert all(len(a.json()["results"]) == 3 for a in answers if a.status_code == 200)
    after = http.get(f"{url}/v1/info").json()["encoder_ran"]
    assert after["refused"] - before["refused"] == 1
    assert after["batches"] - before["batches"] < 16  # the poisoned request shared batches with good ones
    assert replicas() == alive


def test_maximum_size_requests_keep_healthz_fast_and_every_replica_alive(served):
    """32 requests at once, each at the request pixel budget (one 4096 x 4096 image: 50 MB of RGB):
    images are checked from their headers and decoded off every event loop, one at a time in the
    encoder, so /healthz keeps answering within a second, every request is answered, no replica dies."""
    import threading

    url, http, _, config = served
    assert config.serve.max_request_pixels == 4096 * 4096
    alive = replicas()
    body = {
        "parts": [{"type": "text", "text": "like "}, {"type": "image", "image": b64(black_png(4096, 4096))}]
    }
    latencies: list[float] = []
    done = threading.Event()

    def probe():
        with httpx.Client(timeout=10) as c:
            while not done.is_set():
                t = time.perf_counter()
                assert c.get(f"{url}/healthz").status_code == 200
                latencies.append(time.perf_counter() - t)
                time.sleep(0.05)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        with ThreadPoolExecutor(32) as pool_:
            answers = list(
                pool_.map(lambda _: http.post(f"{url}/v1/search", json=body, timeout=300), range(32))
            )
    finally:
        done.set()
        prober.join(timeout=30)
    assert [a.status_code for a in answers] == [200] * 32
    assert len(latencies) >= 10 and max(latencies) < 1.0, (len(latencies), max(latencies))
    assert replicas() == alive


def test_a_client_that_leaves_leaves_no_model_runs_behind(served):
    """16 heavy requests whose clients give up after 0.3 s: Serve cancels each request down to the
    encoder, and the ones still queued when their clients left are not run for no one."""
    url, http, _, _ = served
    body = {
        "parts": [{"type": "text", "text": "like "}, {"type": "image", "image": b64(black_png(4096, 4096))}]
    }
    before = http.get(f"{url}/v1/info").json()["encoder_ran"]

    def leave(_):
        try:
            http.post(f"{url}/v1/search", json=body, timeout=0.3)
        except httpx.TimeoutException:
            return True
        return False

    with ThreadPoolExecutor(16) as pool_:
        left = sum(pool_.map(leave, range(16)))
    assert left >= 12  # each takes about 0.2 s alone: most clients left before theirs ran
    deadline, seen = time.monotonic() + 60, None
    while time.monotonic() < deadline:  # until the encoder is idle again
        now = http.get(f"{url}/v1/info").json()["encoder_ran"]
        if now == seen:
            break
        seen = now
        time.sleep(1.0)
    ran = seen["requests"] - before["requests"]
    assert ran < 16, (seen, before)


def test_the_apps_arguments_carry_no_pool_images(trained_run):
    """What Serve's controller holds for the app: the config and the binding, not the pool's images
    nor its ids (each replica reads them from storage), so a large pool does not sit in the controller."""
    import pickle

    root, cfg = trained_run
    app = application(cfg)
    ingress = app._bound_deployment
    encoder = ingress.init_args[0]._bound_deployment
    args = pickle.dumps((encoder.init_args, encoder.init_kwargs, ingress.init_args[1:], ingress.init_kwargs))
    images = sum(len(b) for b in catalog_images(root).values())
    assert len(args) < 20_000 < images, (len(args), images)
    assert b"\x89PNG" not in args and sorted(pool_ids(root))[0].encode() not in args


def test_a_replica_checks_the_binding_again_when_it_starts(trained_run, tmp_path):
    """A replica that starts later (autoscaling, a restart) hashes what the paths hold then: an index
    file or checkpoint swapped after the app was built refuses to load, as does a damaged index file."""
    import shutil

    from coral.search import index as search_index

    root, cfg = trained_run
    copy = tmp_path / "run"
    for stage in ("catalog", "index", "train"):
        shutil.copytree(
            root / stage, copy / stage, ignore=shutil.ignore_patterns("checkpoints", "tensorboard")
        )
    meta_path = copy / "index" / "index.json"
    meta = json.loads(meta_path.read_text())
    meta["checkpoint"]["uri"] = str(copy / "train" / "model")
    meta_path.write_text(json.dumps(meta))
    config = replace(cfg, run=replace(cfg.run, run_root=str(copy)))
    index_dir = storage.resolve(str(copy / "index"))
    ckpt = binding.check_binding(
        config, index_dir, binding.binding(meta, checkpoint.describe(meta["checkpoint"]["uri"], "coral"))
    )
    bound = binding.binding(meta, ckpt)
    binding.IndexTable(index_dir.uri, config.storage, config.index, bound)  # as built: loads

    faiss_file = copy / "index" / "index.faiss"
    original = faiss_file.read_bytes()
    faiss_file.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # one bit flipped
    with pytest.raises(checkpoint.IndexMismatch, match="replaced or damaged"):
        search_index.load(index_dir, config.index)
    with pytest.raises(checkpoint.IndexMismatch, match="replaced or damaged"):
        binding.IndexTable(index_dir.uri, config.storage, config.index, bound)
    faiss_file.write_bytes(original)

    weights = next((copy / "train" / "model").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes() + b"\0")  # another checkpoint at the same path
    with pytest.raises(checkpoint.IndexMismatch, match="was built with checkpoint"):
        binding.check_binding(config, index_dir, bound)

    meta["index_sha256"] = "0" * 64  # index.json rewritten since the app was built
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(checkpoint.IndexMismatch, match="changed since this app was built"):
        binding.check_binding(config, index_dir, bound)
