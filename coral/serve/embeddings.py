"""``POST /v1/embeddings``, OpenAI's embeddings API: its request and response, and how its inputs become
the retriever's queries (``coral.serve.api``), under the same limits and refusals as ``/v1/embed``.

``input`` is a string, a list of strings, or a list of inputs each a string or a list of content parts
in OpenAI's chat format: ``{"type": "text", "text": ...}`` and ``{"type": "image_url", "image_url":
{"url": "data:image/png;base64,..."}}`` (a data URI: the server fetches no URL, an http(s) one is a 422
naming the part), and, beyond OpenAI's, ``{"type": "product", "id": ...}`` (a product of the candidate
pool). One embedding per input, in order.

The embeddings are the query role's, as a search embeds its query; ``"role": "candidate"`` in the body
(the OpenAI client: ``extra_body={"role": "candidate"}``), or a model name ending in ``:candidate`` (for
tools that only let one set the model), gives the candidate role's: text parts are the title, with
exactly one image or product part. ``model`` is otherwise free (the app serves one checkpoint); the
response's ``model`` is that checkpoint's content hash. ``usage`` counts the tokens of the model's
inputs as its processor built them (chat template and image tokens included for a Qwen2-VL checkpoint;
a CLIP checkpoint's text tokens only). ``encoding_format: "base64"`` (what the OpenAI Python client
asks for by default) sends each embedding as the base64 of its little-endian float32 bytes.
``dimensions`` may only be the embedding's own size: these embeddings are not shortened.
"""

from __future__ import annotations

import base64
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from coral.serve import api

CANDIDATE_SUFFIX = ":candidate"


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(description="a data URI, data:image/<type>;base64,<bytes>; no other URL is fetched")
    detail: Literal["auto", "low", "high"] | None = Field(None, description="accepted, and ignored")


class ImageURLPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[api.TextPart | ImageURLPart | api.ProductPart, Field(discriminator="type")]
Input = str | Annotated[list[ContentPart], Field(min_length=1)]


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: str | list[Input] = Field(
        description="a string, a list of strings, or a list of inputs each a string or content parts"
    )
    model: str | None = Field(None, description=f"free; ending in {CANDIDATE_SUFFIX}: the candidate role")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, description="the embedding's own size only")
    user: str | None = Field(None, description="accepted, and ignored")
    role: Literal["query", "candidate"] | None = Field(
        None, description="query (the default) or candidate: title text with exactly one image or product"
    )

    @field_validator("input", mode="before")
    @classmethod
    def _no_token_ids(cls, value):
        items = value if isinstance(value, list) else [value]
        if any(isinstance(x, int) or (isinstance(x, list) and x and isinstance(x[0], int)) for x in items):
            raise ValueError("token ids are not accepted: send text, or content parts")
        if isinstance(value, list) and not value:
            raise ValueError("no inputs")
        return value


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="floats, or base64 of little-endian float32")


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str = Field(description="content hash of the checkpoint that embedded the inputs")
    usage: Usage


def role_of(body: EmbeddingsRequest) -> str:
    """The role the request asks for: ``role``, else ``candidate`` when the model name ends in
    ``:candidate``; a contradiction is a 422."""
    by_model = (body.model or "").endswith(CANDIDATE_SUFFIX)
    if body.role == "query" and by_model:
        raise api.ApiError(422, f'role "query" contradicts a model name ending in {CANDIDATE_SUFFIX}')
    return body.role or ("candidate" if by_model else "query")


def check_dimensions(dimensions: int | None, dim: int) -> None:
    if dimensions is not None and dimensions != dim:
        raise api.ApiError(
            422, f"dimensions={dimensions}: this model's embeddings have {dim} dimensions (none shorter)"
        )


def image_of(url: str, where: str) -> str:
    """A data URI's base64 payload. Any other URL is refused: the server never fetches one."""
    scheme, sep, rest = url.partition(":")
    if not sep or scheme.strip().lower() != "data":
        kind = "an http(s) URL" if scheme.strip().lower() in ("http", "https") else "not a data URI"
        raise api.ApiError(
            422,
            f"{where}: image_url is {kind}; send the image inline as data:image/<type>;base64,<bytes> "
            f"(the server fetches no URL)",
        )
    head, comma, payload = rest.partition(",")
    params = [p.strip().lower() for p in head.split(";")]
    if not comma or params[-1] != "base64":
        raise api.ApiError(422, f"{where}: a data URI's image must be base64 (data:image/<type>;base64,...)")
    if params[0] and not params[0].startswith("image/"):
        raise api.ApiError(422, f"{where}: the data URI's media type is not image/*")
    return payload


def parts_of(item: str | list, where: str) -> list:
    """One input -> ``coral.serve.api`` parts (an ``image_url`` as an inline image)."""
    if isinstance(item, str):
        return [api.TextPart.model_construct(type="text", text=item)]
    return [
        api.ImagePart.model_construct(type="image", image=image_of(p.image_url.url, f"{where}[{j}]"))
        if p.type == "image_url"
        else p
        for j, p in enumerate(item)
    ]


def to_queries(body: EmbeddingsRequest, role: str, limits: api.Limits, products) -> tuple[list, list[str]]:
    """The request's inputs as queries (or candidates) and their names in errors (``input``,
    ``input[i]``); CPU work (base64, image headers), for a worker thread."""
    items, names = (
        ([body.input], ["input"])
        if isinstance(body.input, str)
        else (body.input, [f"input[{i}]" for i in range(len(body.input))])
    )
    api.check_inputs(len(items), limits)
    parts = [parts_of(item, name) for item, name in zip(items, names, strict=True)]
    to = api.to_query if role == "query" else api.to_candidate
    return api.to_queries(parts, names, limits, products, to), names


def encoded(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
    return np.asarray(vector, dtype=np.float32).tolist()


def response(embedded: list[api.Embedded], model: str, encoding_format: str) -> dict:
    """OpenAI's embeddings response."""
    tokens = sum(e.tokens for e in embedded)
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encoded(e.vector, encoding_format)}
            for i, e in enumerate(embedded)
        ],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
