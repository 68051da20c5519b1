"""How long the query encoder's batch waits for more requests.

A fixed wait costs every lone request the whole wait; no wait at all leaves batches of one when requests
come in a few at a time, as they do behind Serve's hops. ``BatchWait`` waits only when requests keep
each other company: when another is in flight at the encoder as one arrives, or has been lately (a
moving average of the number in flight at arrival, so that the first request after a batch returns still
waits for the rest). A client sending one request at a time never waits.
"""

from __future__ import annotations


class BatchWait:
    def __init__(self, wait_s: float, smoothing: float = 0.2, busy_at: float = 0.5):
        self.wait_s, self.smoothing, self.busy_at = wait_s, smoothing, busy_at
        self.in_flight, self.company = 0, 0.0

    def arrive(self) -> float:
        """A request arrives: the wait for the batch it may open, in seconds."""
        self.company += self.smoothing * (self.in_flight - self.company)
        busy = self.in_flight > 0 or self.company >= self.busy_at
        self.in_flight += 1
        return self.wait_s if busy else 0.0

    def leave(self) -> None:
        """The request's answer is out."""
        self.in_flight -= 1
