"""The ingress's encoder calls are sent again when the replica dies, a bounded number of times; any other
error is not retried."""

import asyncio

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError

from coral.serve.retry import retried


class Flaky:
    def __init__(self, failures: list[BaseException]):
        self.failures, self.calls = list(failures), 0

    async def __call__(self):
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return "answer"


def test_a_dead_or_unreachable_replica_is_retried_until_one_answers():
    call = Flaky([ActorUnavailableError("gone", b"\0" * 16), ActorDiedError()])
    assert asyncio.run(retried(call, retries=2, backoff_s=0.001)) == "answer"
    assert call.calls == 3


def test_retries_are_bounded():
    call = Flaky([ActorDiedError()] * 5)
    with pytest.raises(ActorDiedError):
        asyncio.run(retried(call, retries=2, backoff_s=0.001))
    assert call.calls == 3


def test_other_errors_are_not_retried():
    call = Flaky([ValueError("a bad image")])
    with pytest.raises(ValueError):
        asyncio.run(retried(call, retries=2, backoff_s=0.001))
    assert call.calls == 1
