"""Calls from the ingress to the encoder, sent again when the replica they went to dies.

Serve does not resend a request once a replica has it, so a replica that dies under load fails the
requests it held. Search and embed only read, so running one twice is harmless: the call is sent again
(to whichever replica the router picks once it has seen the death), a bounded number of times.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ray.exceptions import RayActorError  # ActorDiedError, and ActorUnavailableError under gRPC

T = TypeVar("T")


async def retried(call: Callable[[], Awaitable[T]], retries: int = 2, backoff_s: float = 0.05) -> T:
    """``await call()``; on a dead or unreachable replica, up to ``retries`` more times, waiting
    ``backoff_s``, then twice that, between tries. Any other error goes straight to the caller."""
    for attempt in range(retries):
        try:
            return await call()
        except RayActorError:
            await asyncio.sleep(backoff_s * 2**attempt)
    return await call()
