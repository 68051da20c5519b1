"""A small Python client of the serving API (docs/serving.md), over any httpx-like client (``httpx.Client``:
anything with ``post(url, json=..., headers=...)``), plus the parts of a query.

Usage::

    import httpx
    from coral.serve import client

    url, token = "http://127.0.0.1:8000", None  # the token: serve.token_env's value, when the server has one
    with httpx.Client(timeout=60) as http:
        query = [client.text("a bag like "), client.product("p000012-0"),
                 client.text(" but in the colour of "), client.image(open("red.png", "rb").read())]
        hits = client.search(http, url, query, top_k=5, token=token)["results"]
        # several queries in one request, answered in order (and embedded in the same batch)
        per_query = client.search_many(http, url, [query, [client.text("a red mug")]], top_k=5, token=token)
        vector = client.embed(http, url, query, token=token)["embedding"]
        # a candidate's embedding: its title, and exactly one image or product
        doc = client.embed(http, url, [client.text("Red mug"), client.product("p000013-2")], role="candidate")
        # OpenAI's embeddings API: strings, or lists of OpenAI content parts
        png = open("red.png", "rb").read()
        vectors = client.embeddings(http, url, ["a red mug", [client.text("like "), client.image_url(png)]])

Each function raises ``client.ServeError`` (with the status and the server's message) for an answer that
is not 2xx. The OpenAI Python client works against ``/v1/embeddings`` as well:
``OpenAI(base_url=f"{url}/v1", api_key=token or "none").embeddings.create(model="coral", input=[...])``.
"""

from __future__ import annotations

import base64

from coral import schemas as S


class ServeError(Exception):
    """A 4xx or 5xx answer: ``status`` and the server's ``detail`` message."""

    def __init__(self, status: int, detail: str):
        super().__init__(f"{status}: {detail}")
        self.status, self.detail = status, detail


def text(s: str) -> dict:
    return {"type": "text", "text": s}


def image(data: bytes) -> dict:
    """An image file's bytes (PNG, JPEG, WebP, ...), sent inline: the server fetches no URL."""
    return {"type": "image", "image": base64.b64encode(data).decode()}


def product(pid: str) -> dict:
    """A product of the candidate pool: the server takes its image from the catalog."""
    return {"type": "product", "id": pid}


def image_url(data: bytes, media_type: str = "image/png") -> dict:
    """An image as OpenAI's content part, for ``embeddings``: a data URI of the file's bytes."""
    return {
        "type": "image_url",
        "image_url": {"url": f"data:{media_type};base64,{base64.b64encode(data).decode()}"},
    }


def parts_for(text: str, image_ids: list[str], pool, images: dict[str, bytes]) -> list[dict]:
    """An offline query (text with image slots, the slots' product ids) as API parts: a product part for
    a product of the candidate pool, its image bytes inline otherwise."""
    chunks = text.split(S.IMAGE_SLOT)
    if len(chunks) != len(image_ids) + 1:
        raise ValueError(f"{len(chunks) - 1} image slots but {len(image_ids)} image ids")
    parts: list[dict] = []
    for i, chunk in enumerate(chunks):
        if chunk:
            parts.append({"type": "text", "text": chunk})
        if i < len(image_ids):
            pid = image_ids[i]
            parts.append(product(pid) if pid in pool else image(images[pid]))
    return parts


def headers(token: str | None) -> dict:
    return {"Authorization": f"Bearer {token}"} if token else {}


def post(client, url: str, route: str, body: dict, token: str | None = None) -> dict:
    """``body`` to ``url + route``: the answer's JSON, or ``ServeError``."""
    r = client.post(f"{url}{route}", json=body, headers=headers(token))
    if r.status_code >= 400:
        try:
            detail = r.json().get("detail", r.text)
        except ValueError:
            detail = r.text
        raise ServeError(r.status_code, str(detail))
    return r.json()


def search(client, url: str, parts: list[dict], top_k: int = 10, token: str | None = None) -> dict:
    """One query: ``{"results": [{"rank", "id", "score", "title"}, ...], "checkpoint", "index"}``."""
    return post(client, url, "/v1/search", {"parts": parts, "top_k": top_k}, token)


def search_many(
    client, url: str, queries: list[list[dict]], top_k: int = 10, token: str | None = None
) -> list[list[dict]]:
    """Several queries in one request: each one's results, in order."""
    body = {"queries": [{"parts": parts} for parts in queries], "top_k": top_k}
    return [q["results"] for q in post(client, url, "/v1/search", body, token)["queries"]]


def embed(client, url: str, parts: list[dict], role: str = "query", token: str | None = None) -> dict:
    """One embedding: ``{"embedding": [...], "dim", "checkpoint"}``; ``role="candidate"``: a candidate's
    (text parts as its title, with exactly one image or product)."""
    return post(client, url, "/v1/embed", {"parts": parts, "role": role}, token)


def embeddings(
    client, url: str, inputs: list, role: str = "query", model: str = "coral", token: str | None = None
) -> list[list[float]]:
    """OpenAI's embeddings API: one vector an input (a string, or a list of content parts: ``text``,
    ``image_url``, ``product``), in order."""
    body = {"input": inputs, "model": model, "role": role}
    return [
        d["embedding"]
        for d in sorted(post(client, url, "/v1/embeddings", body, token)["data"], key=lambda d: d["index"])
    ]
