"""The Serve app's HTTP layer: the FastAPI app, the body-size and metrics middleware, the error responses,
and the bearer token (the check on each route, and ``token_of``, which refuses a public host without one).

The ingress deployment (``coral.serve.deployments.Ingress``) serves this ``app``; the request schema and
the checks of its parts are in ``coral.serve.api``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from coral import net
from coral.config import ServeConfig
from coral.errors import ConfigError
from coral.serve import api
from coral.serve.metrics import route_of

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
                raise HTTPException(413, f"request body over {limits.max_body_bytes} bytes")
            return message

        return await self.inner(scope, counted, send)


class Measured:
    """ASGI middleware, outside ``BodyLimit``: every response's route, status and seconds go to
    ``app.state.metrics`` (the ingress replica's ``coral.serve.metrics.HttpMetrics``), refusals by the
    middleware, the token check and validation included. A client that leaves first counts as 499."""

    def __init__(self, inner):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        metrics = getattr(app.state, "metrics", None)
        if scope["type"] != "http" or metrics is None:
            return await self.inner(scope, receive, send)
        start, status = time.perf_counter(), None

        async def sent(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.inner(scope, receive, sent)
        except asyncio.CancelledError:
            status = status or 499
            raise
        except Exception:
            status = status or 500
            raise
        finally:
            metrics.request(route_of(scope), status or 500, time.perf_counter() - start)


app.add_middleware(BodyLimit)
app.add_middleware(Measured)  # added last: the outermost, so it sees BodyLimit's 413s


@app.exception_handler(api.ApiError)
async def _api_error(_: Request, e: api.ApiError) -> JSONResponse:
    return JSONResponse({"detail": e.message}, status_code=e.status)


@app.exception_handler(RequestValidationError)
async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
    status, message = api.validation_message(e.errors())
    return JSONResponse({"detail": message}, status_code=status)


def configure(limits: api.Limits, token_digest: str | None, metrics=None) -> None:
    """Set the limits, token and metrics the middleware and the auth dependency read. A module function, so
    that it runs on this module's ``app`` even from a deployment class that Serve serialised by value."""
    app.state.limits, app.state.token_digest, app.state.metrics = limits, token_digest, metrics


async def authorized(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    header = f"{credentials.scheme} {credentials.credentials}" if credentials else None
    api.authorize(header, getattr(app.state, "token_digest", None))


def token_of(cfg: ServeConfig) -> str | None:
    """The bearer token from ``serve.token_env``; refuses (ConfigError) to serve a non-loopback host
    without one, unless ``serve.allow_unauthenticated`` says so on purpose."""
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
