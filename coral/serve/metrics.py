"""The Serve app's own metrics, through Ray's metrics API (``ray.util.metrics``): Ray exports them, with
its own, on each node's metrics endpoint (``http://<node>:<MetricsExportPort>/metrics``, Prometheus text,
every name prefixed ``ray_``; a counter's name ends in ``_total``).

Each replica makes its own in ``__init__`` (a metric belongs to the process that records it; made at
import, it would be made in every process that imports this module, the driver included):

- ingress (``HttpMetrics``, recorded by ``coral.serve.http``'s middleware for every response):
  ``coral_serve_requests{route, status}`` (counter), ``coral_serve_refusals{route, status}`` (counter,
  the 4xx among them) and ``coral_serve_request_seconds{route}`` (histogram, seconds from the request's
  arrival at the ingress to its response);
- encoder (``EncoderMetrics``): ``coral_serve_batch_size`` (histogram, inputs a model run takes),
  ``coral_serve_queue_wait_seconds`` (histogram, seconds an input waits at the encoder before its batch
  runs), ``coral_serve_batch_seconds`` (histogram, a batch's model run and search),
  ``coral_serve_encoder_inputs{outcome}`` (counter: ``embedded``, ``searched``, ``refused``) and
  ``coral_serve_encoder_in_flight`` (gauge, inputs queued or running at the replica, as each batch
starts; 0 once the replica is idle).

A ``route`` is one of ``ROUTES`` or ``other`` (a path no route serves), so that a client cannot grow the
label set.
"""

from __future__ import annotations

from ray.util import metrics

ROUTES = ("/v1/search", "/v1/embed", "/v1/embeddings", "/v1/info", "/healthz")
SECONDS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
SIZES = [1, 2, 4, 8, 16, 32, 64, 128]


def route_of(scope: dict) -> str:
    """The route a request's ASGI scope names, without the app's route prefix; ``other`` for any other
    path."""
    path, prefix = scope.get("path", ""), scope.get("root_path", "")
    if prefix and path.startswith(prefix):
        path = path[len(prefix) :]
    return path if path in ROUTES else "other"


class HttpMetrics:
    """The ingress replica's: one ``request`` a response."""

    def __init__(self):
        self.requests = metrics.Counter(
            "coral_serve_requests",
            description="HTTP requests answered by the ingress, by route and status code",
            tag_keys=("route", "status"),
        )
        self.refusals = metrics.Counter(
            "coral_serve_refusals",
            description="requests refused with a 4xx (malformed, unauthorized, over a limit, an input the "
            "model cannot take), by route and status code",
            tag_keys=("route", "status"),
        )
        self.seconds = metrics.Histogram(
            "coral_serve_request_seconds",
            description="seconds from a request's arrival at the ingress to its response, by route",
            boundaries=SECONDS,
            tag_keys=("route",),
        )

    def request(self, route: str, status: int, seconds: float) -> None:
        tags = {"route": route, "status": str(status)}
        self.requests.inc(1, tags=tags)
        if 400 <= status < 500:
            self.refusals.inc(1, tags=tags)
        self.seconds.observe(max(seconds, 0.0), tags={"route": route})


class EncoderMetrics:
    """The encoder replica's: ``batch`` once a batch, ``in_flight`` as a batch starts and when the replica
    falls idle."""

    def __init__(self):
        self.batch_size = metrics.Histogram(
            "coral_serve_batch_size",
            description="inputs (queries and embeddings) a batch of the encoder takes",
            boundaries=SIZES,
        )
        self.queue_wait = metrics.Histogram(
            "coral_serve_queue_wait_seconds",
            description="seconds an input waits at the encoder before its batch runs",
            boundaries=SECONDS,
        )
        self.batch_seconds = metrics.Histogram(
            "coral_serve_batch_seconds",
            description="seconds a batch of the encoder runs (features, model, search)",
            boundaries=SECONDS,
        )
        self.inputs = metrics.Counter(
            "coral_serve_encoder_inputs",
            description="inputs the encoder ran: embedded, searched, or refused (the model cannot take them)",
            tag_keys=("outcome",),
        )
        self.queued = metrics.Gauge(
            "coral_serve_encoder_in_flight", description="inputs at the encoder replica, queued or running"
        )

    def batch(self, waits: list[float], seconds: float, outcomes: dict[str, int]) -> None:
        """One batch ran: its inputs' waits before it, its seconds, and how many inputs had each outcome."""
        self.batch_size.observe(len(waits))
        for wait in waits:
            self.queue_wait.observe(max(wait, 0.0))
        self.batch_seconds.observe(max(seconds, 0.0))
        for outcome, n in outcomes.items():
            if n:
                self.inputs.inc(n, tags={"outcome": outcome})

    def in_flight(self, n: int) -> None:
        self.queued.set(n)
