"""The ingress's calls to the query encoder, grouped while enough are out.

Each call between replicas costs both sides a fixed share of a core (gRPC, Serve's request handling), as
much for one query as for sixteen; at 16 clients on the tiny model that was a tenth of the encoder's
time, and the encoder's process is what bounds the app. ``Grouped`` sends a request's inputs at once
while fewer than ``limit`` calls are out (``2 x`` the encoder replicas: one running, one queued behind
it, at each), and otherwise holds it until a call comes back, then sends everything held in one call (at
most ``size`` requests): one hop for all, and the encoder queues a call's inputs together into its batch.
A lone request never waits.

A request cancelled while held (its HTTP client went away) is dropped and never sent; a call whose
requests have all been cancelled is cancelled itself, and Serve cancels it down to the encoder, which
leaves out the inputs still waiting for a batch. A call with some requests still wanted runs for all.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any


class Grouped:
    """``await grouped(item)`` -> ``send``'s answer for ``item``; ``send(items)`` answers each, in order."""

    def __init__(self, send: Callable[[list], Awaitable[list]], limit: int, size: int):
        self.send, self.limit, self.size = send, max(1, limit), max(1, size)
        self.held: list[tuple[Any, asyncio.Future]] = []
        self.out: set[asyncio.Task] = set()
        self.calls = 0  # calls sent, for ``/v1/info`` and the tests

    async def __call__(self, item):
        future = asyncio.get_running_loop().create_future()
        self.held.append((item, future))
        self._send_held()
        try:
            return await future
        except asyncio.CancelledError:
            self.held = [(i, f) for i, f in self.held if f is not future]
            raise

    def _send_held(self) -> None:
        while self.held and len(self.out) < self.limit:
            group, self.held = self.held[: self.size], self.held[self.size :]
            task = asyncio.ensure_future(self._call(group))
            self.out.add(task)
            for _, future in group:  # the last of its requests to go cancels the call
                future.add_done_callback(lambda _, g=group, t=task: self._abandoned(g, t))
            self.calls += 1

    @staticmethod
    def _abandoned(group: list, task: asyncio.Task) -> None:
        if all(f.cancelled() for _, f in group) and not task.done():
            task.cancel()

    async def _call(self, group: list) -> None:
        try:
            answers = await self.send([item for item, _ in group])
            for (_, future), answer in zip(group, answers, strict=True):
                if not future.done():
                    future.set_result(answer)
        except BaseException as e:  # CancelledError too: every request of the call gets it
            for _, future in group:
                if future.done():
                    continue
                if isinstance(e, Exception):
                    future.set_exception(e)
                else:
                    future.cancel()
            if not isinstance(e, Exception):
                raise
        finally:
            self.out.discard(asyncio.current_task())
            self._send_held()
