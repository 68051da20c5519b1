"""The ingress's grouped calls: a lone request goes at once, the ones that come while the calls are out go
together, each gets its own answer, and a request whose client left is never sent for no one."""

from __future__ import annotations

import asyncio

import pytest

from coral.serve.grouping import Grouped


class Encoder:
    """``send``: answers each item with ``item * 10`` once ``release`` is set; records each call's items."""

    def __init__(self):
        self.calls: list[list] = []
        self.release = asyncio.Event()
        self.cancelled = 0

    async def send(self, items: list) -> list:
        self.calls.append(list(items))
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if "bad" in items:
            raise RuntimeError("the encoder failed")
        return [i * 10 for i in items]


async def settle():
    """A few turns of the loop: the requests' tasks, then the calls' tasks, start."""
    for _ in range(5):
        await asyncio.sleep(0)


def run(main):
    return asyncio.run(asyncio.wait_for(main(), timeout=10))


def test_a_lone_request_goes_at_once_and_the_rest_together_while_calls_are_out():
    async def main():
        enc = Encoder()
        grouped = Grouped(enc.send, limit=2, size=3)
        first = [asyncio.ensure_future(grouped(i)) for i in (1, 2)]
        await settle()
        assert enc.calls == [[1], [2]]  # two calls out: the limit
        rest = [asyncio.ensure_future(grouped(i)) for i in (3, 4, 5, 6)]
        await settle()
        assert enc.calls == [[1], [2]] and len(grouped.held) == 4
        enc.release.set()
        answers = await asyncio.gather(*first, *rest)
        return enc.calls, answers, grouped

    calls, answers, grouped = run(main)
    assert answers == [10, 20, 30, 40, 50, 60]
    assert calls == [[1], [2], [3, 4, 5], [6]]  # held ones together, at most ``size`` a call
    assert not grouped.out and not grouped.held


def test_a_failed_call_fails_each_of_its_requests_and_the_next_call_still_goes():
    async def main():
        enc = Encoder()
        grouped = Grouped(enc.send, limit=1, size=8)
        a = asyncio.ensure_future(grouped(1))
        await settle()
        held = [asyncio.ensure_future(grouped(x)) for x in ("bad", 2)]
        await settle()
        enc.release.set()
        assert await a == 10
        for f in held:
            with pytest.raises(RuntimeError, match="the encoder failed"):
                await f
        return await grouped(3)

    assert run(main) == 30


def test_a_request_whose_client_left_is_not_sent_and_an_abandoned_call_is_cancelled():
    async def main():
        enc = Encoder()
        grouped = Grouped(enc.send, limit=1, size=8)
        out = asyncio.ensure_future(grouped(1))
        await settle()
        held = [asyncio.ensure_future(grouped(i)) for i in (2, 3)]
        await settle()
        held[0].cancel()  # left while held: dropped
        await settle()
        assert [i for i, _ in grouped.held] == [3]
        out.cancel()  # the only request of the call out: the call is cancelled
        await asyncio.sleep(0.01)
        assert enc.cancelled == 1 and enc.calls == [[1], [3]]
        enc.release.set()
        return await held[1], enc

    answer, enc = run(main)
    assert answer == 30 and enc.calls == [[1], [3]]
