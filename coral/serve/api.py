"""The HTTP API's request schema, limits and checks, apart from Ray: what a request may hold and how it
becomes the retriever's input.

A query is a list of parts: ``{"type": "text", "text": ...}``, ``{"type": "image", "image": <base64>}``
(inline bytes only: the server never fetches a URL) and ``{"type": "product", "id": ...}`` (a product of
the candidate pool, its image taken from the catalog). Parts join into the retriever's interleaved text,
an image slot where each image or product stands, exactly as the offline queries are written.

A search request holds one query (``parts``) or several (``queries``: each ``{"parts": [...]}``, with
its own ``top_k`` or the request's); a request's queries are checked together (their number, and the
pixel budget over all their images) and answered in order. ``coral.serve.embeddings`` takes the
OpenAI-compatible ``/v1/embeddings`` request to the same queries.

Errors are ``ApiError(status, message)``: 400 malformed JSON, 401 a missing or wrong token, 413 a body,
image or pixel count (an image's, or a request's images' in all) over its limit, 422 anything else the
request gets wrong, including an input the model cannot take (``Refused``, answered by the encoder for
that request alone). Messages name the part
and the limit, never echo the request, and carry no stack trace.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import io
import warnings
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from coral import schemas as S


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["image"]
    image: str = Field(description="the image file's bytes (PNG, JPEG, WebP, ...), base64")


class ProductPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["product"]
    id: str = Field(description="a product of the candidate pool")


Part = Annotated[TextPart | ImagePart | ProductPart, Field(discriminator="type")]


class SearchQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    parts: list[Part] = Field(min_length=1)
    top_k: int | None = Field(None, ge=1, description="this query's; the request's top_k when unset")


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    parts: list[Part] | None = Field(None, min_length=1, description="one query (or give queries)")
    queries: list[SearchQuery] | None = Field(
        None, min_length=1, description="several queries, answered in order, each a list of results"
    )
    top_k: int = Field(10, ge=1)

    @model_validator(mode="after")
    def _one_form(self):
        if (self.parts is None) == (self.queries is None):
            raise ValueError("give parts (one query) or queries (several), not both nor neither")
        return self

    def asked(self) -> tuple[list[list], list[int], list[str]]:
        """Each query's parts, top_k, and the name its errors carry (``parts``, ``queries[i].parts``)."""
        if self.queries is None:
            return [self.parts], [self.top_k], ["parts"]
        return (
            [q.parts for q in self.queries],
            [q.top_k or self.top_k for q in self.queries],
            [f"queries[{i}].parts" for i in range(len(self.queries))],
        )


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    parts: list[Part] = Field(min_length=1)
    role: Literal["query", "candidate"] = Field(
        "query", description="candidate: the text parts are the title, with exactly one image or product"
    )


class Hit(BaseModel):
    rank: int
    id: str
    score: float
    title: str


class QueryResults(BaseModel):
    results: list[Hit]


class SearchResponse(BaseModel):
    results: list[Hit] | None = Field(None, description="the query's hits (a request with parts)")
    queries: list[QueryResults] | None = Field(
        None, description="each query's hits, in the request's order (a request with queries)"
    )
    checkpoint: str = Field(description="content hash of the checkpoint that embedded the query")
    index: str = Field(description="id of the index that answered (the index stage's lineage hash)")


class EmbedResponse(BaseModel):
    embedding: list[float]
    dim: int
    checkpoint: str


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int
    max_parts: int
    max_text_chars: int
    max_image_bytes: int
    max_pixels: int
    max_request_pixels: int
    max_top_k: int
    max_inputs_per_request: int


@dataclass
class Query:
    """The retriever's input: interleaved text, and per image slot an image file's bytes (checked, not
    yet decoded: the encoder decodes them off every event loop) or a product id (str)."""

    text: str
    images: list  # bytes and product ids (str), in slot order
    pixels: int = 0  # the inline images' decoded pixels, in all


@dataclass(frozen=True)
class Embedded:
    """What the encoder answers for an embedding: the vector, and the tokens of the model's input as its
    processor built them (``/v1/embeddings``' usage)."""

    vector: np.ndarray
    tokens: int


@dataclass(frozen=True)
class Refused:
    """What the encoder answers for one request of a batch that the model cannot take: that request
    alone gets ``status``, the rest of its batch their results."""

    status: int
    message: str


def refused(e: BaseException) -> Refused:
    """A model-side failure of one input (an aspect ratio the processor rejects, text the tokenizer
    cannot encode, image bytes that do not decode) as the 422 its request gets; the message is the
    error's first line, short, without the input."""
    first = (str(e).splitlines() or [type(e).__name__])[0][:200]
    return Refused(422, f"the model cannot take this input: {type(e).__name__}: {first}")


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def authorize(header: str | None, digest: str | None) -> None:
    """Bearer token check against the token's SHA-256 (the replicas never hold the token itself).
    ``digest`` None: the app was started without a token on purpose (``serve.allow_unauthenticated``,
    or a loopback host)."""
    if digest is None:
        return
    scheme, _, presented = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not presented:
        raise ApiError(401, "missing bearer token (Authorization: Bearer <token>)")
    if not hmac.compare_digest(token_digest(presented.strip()), digest):
        raise ApiError(401, "wrong bearer token")


def check_image(data: str, where: str, limits: Limits) -> tuple[bytes, int]:
    """base64 -> (the image file's bytes, its pixel count), from its header alone: the byte and pixel
    limits are checked before any pixel is decoded (the encoder decodes it)."""
    if len(data) > 4 * -(-limits.max_image_bytes // 3):
        raise ApiError(413, f"{where}: image over {limits.max_image_bytes} bytes")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, f"{where}: image is not valid base64") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as img:
                width, height = img.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ApiError(413, f"{where}: image pixels over the limit {limits.max_pixels}") from None
    except Exception:
        raise ApiError(422, f"{where}: not a readable image") from None
    if width * height > limits.max_pixels:
        raise ApiError(
            413,
            f"{where}: image is {width}x{height} = {width * height} pixels, over the limit {limits.max_pixels}",
        )
    return raw, width * height


def check_text(text: str, where: str) -> None:
    if S.IMAGE_SLOT in text:
        raise ApiError(422, f"{where}: text may not contain {S.IMAGE_SLOT}; send an image part")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(422, f"{where}: text is not valid Unicode (a lone surrogate)") from None


def to_query(parts: list, limits: Limits, products, where: str = "parts", used: int = 0) -> Query:
    """A request's parts -> Query; ``products``: the ids a product part may name; ``where``: the parts'
    name in errors; ``used``: pixels the request's earlier queries took of its budget. CPU work (base64,
    image headers): the ingress runs it in a worker thread, off its event loop."""
    if len(parts) > limits.max_parts:
        raise ApiError(422, f"{where}: {len(parts)} parts, over the limit {limits.max_parts}")
    text, images, chars, pixels = [], [], 0, used
    for i, part in enumerate(parts):
        at = f"{where}[{i}]"
        if part.type == "text":
            chars += len(part.text)
            if chars > limits.max_text_chars:
                raise ApiError(422, f"{at}: text over {limits.max_text_chars} characters in all")
            check_text(part.text, at)
            text.append(part.text)
        elif part.type == "image":
            raw, n = check_image(part.image, at, limits)
            pixels += n
            if pixels > limits.max_request_pixels:
                raise ApiError(
                    413,
                    f"{at}: the request's images come to {pixels} pixels, over the limit "
                    f"{limits.max_request_pixels} a request",
                )
            text.append(S.IMAGE_SLOT)
            images.append(raw)
        else:
            if part.id not in products:
                raise ApiError(422, f"{at}: unknown product id {part.id[:80]!r} (not in the candidate pool)")
            text.append(S.IMAGE_SLOT)
            images.append(part.id)
    return Query("".join(text), images, pixels - used)


def to_candidate(parts: list, limits: Limits, products, where: str = "parts", used: int = 0) -> Query:
    """A candidate: its text parts are the title, and it has exactly one image or product part."""
    q = to_query(parts, limits, products, where, used)
    if len(q.images) != 1:
        raise ApiError(
            422, f"{where}: a candidate has exactly one image or product part, got {len(q.images)}"
        )
    return Query(q.text.replace(S.IMAGE_SLOT, ""), q.images, q.pixels)


def to_queries(parts: list[list], names: list[str], limits: Limits, products, to=to_query) -> list[Query]:
    """A request's inputs (each a list of parts, named ``names[i]`` in errors) -> queries (``to``:
    ``to_query`` or ``to_candidate``), within the request's limits: at most ``max_inputs_per_request``,
    and ``max_request_pixels`` over all their images."""
    check_inputs(len(parts), limits)
    out: list[Query] = []
    used = 0
    for p, name in zip(parts, names, strict=True):
        out.append(to(p, limits, products, name, used))
        used += out[-1].pixels
    return out


def carries_images(parts: list[list]) -> bool:
    """Whether any of a request's inputs carries an image of its own (base64 to decode and check)."""
    return any(isinstance(p, ImagePart) for query in parts for p in query)


def check_inputs(n: int, limits: Limits) -> None:
    if n > limits.max_inputs_per_request:
        raise ApiError(422, f"{n} inputs, over the limit {limits.max_inputs_per_request} a request")


def check_top_k(top_k: int, limits: Limits) -> None:
    if top_k > limits.max_top_k:
        raise ApiError(422, f"top_k={top_k}, over the limit {limits.max_top_k}")


def answers(results: list, names: list[str]) -> list:
    """The encoder's answers to a request's inputs; the first it refused fails the request, named (when
    the request has several inputs)."""
    for result, name in zip(results, names, strict=True):
        if isinstance(result, Refused):  # this request alone: the rest of its batch got theirs
            raise ApiError(result.status, f"{name}: {result.message}" if len(names) > 1 else result.message)
    return results


def validation_message(errors: list[dict]) -> tuple[int, str]:
    """FastAPI's validation errors -> (status, message) without the offending input."""
    if any(e.get("type") == "json_invalid" for e in errors):
        return 400, "malformed JSON body"
    lines = []
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        lines.append(f"{loc or 'body'}: {e.get('msg', 'invalid')}")
    return 422, "; ".join(lines)
