"""The encoder's batch wait: a lone request never waits; requests that keep each other company do."""

from coral.serve.pacing import BatchWait


def test_a_client_sending_one_request_at_a_time_never_waits():
    pace = BatchWait(0.005)
    for _ in range(100):
        assert pace.arrive() == 0.0
        pace.leave()
    assert pace.in_flight == 0


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


def test_no_configured_wait_never_waits():
    pace = BatchWait(0.0)
    assert {pace.arrive() for _ in range(10)} == {0.0}
