"""How long the query encoder's next batch waits for more requests.

Serve's ``@serve.batch`` closes a batch once its wait is over and queues it behind the running one, so a
batch that closes while the model is still busy waits anyway, with fewer requests than it could have
had: at 16 clients the batches held 3-4 requests on average while a dozen more waited behind them.
``BatchWait`` gives each batch the wait that fills it:

- while a batch is running, until that batch is predicted to end (its size through ``BatchCost``, fitted
  to the batches so far), so the next one takes every request that came meanwhile;
- while the model is idle but requests keep each other company (another is in flight at the encoder as
  one arrives, or has been lately: a moving average of the number in flight at arrival), the configured
  wait;
- a lone request, from a client sending one at a time, never waits; the encoder runs it without the
  batch queue (``alone``).
"""

from __future__ import annotations

import time
from contextlib import contextmanager


class BatchCost:
    """Seconds a batch of ``n`` takes, ``a + b n``, fitted to the batches seen so far by least squares
    weighted towards the recent ones (``decay`` per batch), so that a change in the machine's speed, or
    the first slow batches, fade."""

    def __init__(self, decay: float = 0.9):
        self.decay = decay
        self.w = self.wn = self.wnn = self.wd = self.wnd = 0.0

    def add(self, n: int, seconds: float) -> None:
        k = self.decay
        self.w, self.wn, self.wnn = k * self.w + 1, k * self.wn + n, k * self.wnn + n * n
        self.wd, self.wnd = k * self.wd + seconds, k * self.wnd + n * seconds

    def __call__(self, n: int) -> float:
        if self.w == 0:
            return 0.0
        spread = self.wnn * self.w - self.wn * self.wn
        mean = self.wd / self.w
        if spread <= 1e-9 * self.w * self.w:  # every batch the same size so far: their mean
            return mean
        slope = (self.wnd * self.w - self.wn * self.wd) / spread
        if slope < 0:  # noise: a bigger batch is never cheaper
            return mean
        return max(0.0, (self.wd - slope * self.wn) / self.w + slope * n)


class BatchWait:
    """``arrive``/``leave`` around each request; ``running(n)`` around each batch (one at a time)."""

    def __init__(
        self, wait_s: float, smoothing: float = 0.2, busy_at: float = 0.5, longest_s: float = 1.0, clock=None
    ):
        self.wait_s, self.smoothing, self.busy_at, self.longest_s = wait_s, smoothing, busy_at, longest_s
        self.clock = clock or time.perf_counter
        self.in_flight, self.company = 0, 0.0
        self.cost, self.batch = BatchCost(), None  # batch: (start, size) of the running one

    def arrive(self, n: int = 1) -> float:
        """A request arrives with ``n`` inputs (several queries or embeddings, queued together): the wait
        for the batch it may open, in seconds. The company average counts the request once."""
        self.company += self.smoothing * (self.in_flight - self.company)
        busy = self.in_flight > 0 or self.company >= self.busy_at
        self.in_flight += n
        wait = self.wait_s if busy else 0.0
        if self.batch is not None and self.wait_s > 0:
            start, size = self.batch
            ends_in = start + self.cost(size) - self.clock()
            wait = max(wait, min(ends_in, self.longest_s))
        return wait

    def alone(self) -> bool:
        """Only one input is at the encoder, and requests have not been keeping each other company."""
        return self.in_flight <= 1 and self.company < self.busy_at

    def leave(self, n: int = 1) -> None:
        """The request's answer (for its ``n`` inputs) is out."""
        self.in_flight -= n

    @contextmanager
    def running(self, size: int):
        """A batch of ``size`` runs inside; its time goes into the cost model."""
        start = self.clock()
        self.batch = (start, size)
        try:
            yield
        finally:
            self.batch = None
            self.cost.add(size, self.clock() - start)
