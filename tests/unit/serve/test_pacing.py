"""The encoder's batch wait: a lone request never waits; requests that keep each other company do; while
a batch runs, the next one waits until that batch is predicted to end."""

import pytest

from coral.serve.pacing import BatchCost, BatchWait


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_client_sending_one_request_at_a_time_never_waits():
    clock = Clock()
    pace = BatchWait(0.005, clock=clock)
    for _ in range(100):
        assert pace.arrive() == 0.0
        with pace.running(1):
            clock.now += 0.004
        pace.leave()
    assert pace.in_flight == 0


def test_only_a_request_without_company_is_alone():
    pace = BatchWait(0.005)
    pace.arrive()
    assert pace.alone()
    pace.arrive()
    assert not pace.alone()  # two in flight: the second goes to the batch queue
    pace.leave()
    pace.leave()
    for _ in range(5):  # a burst
        pace.arrive()
    for _ in range(5):
        pace.leave()
    pace.arrive()
    assert not pace.alone()  # the first after a burst: company lingers, the burst's rest may follow
    pace.leave()
    for _ in range(30):
        pace.arrive()
        pace.leave()
    pace.arrive()
    assert pace.alone()


def test_requests_in_flight_together_wait_and_the_first_after_a_batch_still_waits():
    pace = BatchWait(0.005)
    assert pace.arrive() == 0.0  # the first of a burst: nobody in flight yet
    assert [pace.arrive() for _ in range(15)] == [0.005] * 15
    for _ in range(16):  # the batch answers everyone
        pace.leave()
    assert pace.in_flight == 0
    assert pace.arrive() == 0.005  # the next request of a busy stream waits for the rest
    pace.leave()
    for _ in range(30):  # the stream turns sequential: company decays and waiting stops
        pace.arrive()
        pace.leave()
    assert pace.arrive() == 0.0


def test_while_a_batch_runs_the_next_waits_until_it_is_predicted_to_end():
    clock = Clock()
    pace = BatchWait(0.002, clock=clock)
    for n in (1, 4, 8, 16, 2, 12):  # batches of 1 ms + 0.5 ms a request
        with pace.running(n):
            clock.now += 0.001 + 0.0005 * n
    with pace.running(8):  # predicted to take 5 ms
        clock.now += 0.001
        assert pace.arrive() == pytest.approx(0.004)  # arrives 1 ms in: waits the 4 ms left
        clock.now += 0.0035
        assert pace.arrive() == pytest.approx(0.002)  # 0.5 ms left: never less than the configured wait
        clock.now += 0.0015
    assert pace.batch is None
    assert pace.arrive() == 0.002  # idle model, requests in flight: the configured wait


def test_the_wait_behind_a_running_batch_is_bounded_and_off_when_batching_waits_are():
    clock = Clock()
    pace = BatchWait(0.002, longest_s=0.05, clock=clock)
    with pace.running(4):
        clock.now += 10.0  # a first batch that was very slow (a cold start)
    with pace.running(4):
        assert pace.arrive() == 0.05
    off = BatchWait(0.0, clock=clock)
    with off.running(4):
        clock.now += 0.01
    with off.running(4):
        assert off.arrive() == 0.0


def test_the_cost_fit_follows_size_and_forgets_old_batches():
    cost = BatchCost(decay=0.9)
    assert cost(8) == 0.0  # nothing seen yet
    for n in (1, 2, 4, 8, 16) * 4:
        cost.add(n, 0.002 + 0.001 * n)
    assert cost(1) == pytest.approx(0.003)
    assert cost(10) == pytest.approx(0.012)
    same = BatchCost()
    for _ in range(5):
        same.add(4, 0.006)
    assert same(16) == pytest.approx(0.006)  # one size seen: its mean, not an extrapolation
    for _ in range(60):  # the machine slows down 2x: the fit follows
        cost.add(4, 0.012)
        cost.add(8, 0.020)
    assert cost(8) == pytest.approx(0.020, rel=0.01)
    noisy = BatchCost()
    noisy.add(2, 0.010)
    noisy.add(8, 0.004)
    assert noisy(16) == pytest.approx((0.9 * 0.010 + 0.004) / 1.9)  # never cheaper when bigger: the mean


def test_no_configured_wait_never_waits():
    pace = BatchWait(0.0)
    assert {pace.arrive() for _ in range(10)} == {0.0}


def test_a_request_of_several_inputs_is_never_alone_and_keeps_company_once():
    """Several queries of one request are queued together (one batch), and count as one request for the
    company average: a lone request after them still goes at once."""
    pace = BatchWait(0.005)
    assert pace.arrive(4) == 0.0  # idle: its batch may open at once, the four already queued
    assert pace.in_flight == 4 and not pace.alone()
    pace.leave(4)
    assert pace.in_flight == 0
    assert pace.arrive() == 0.0 and pace.alone()
    pace.leave()
