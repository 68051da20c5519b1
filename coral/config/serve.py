"""The ``serve`` section: the retriever behind HTTP (Ray Serve) and its deployments' scale."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from coral.typed import check


# Not ``Resources``: a deployment scales by ``replicas`` / ``autoscaling`` (Ray Serve's), not num_actors, and
# its model's device and dtype are the serve section's, so inheriting would add keys that do nothing. Its
# fields also keep today's rerun semantics (they are part of the serve section's hash).
@dataclass(frozen=True)
class DeploymentConfig:
    """One Serve deployment's scale: fixed ``replicas``, or ``autoscaling`` (Serve's keys: min_replicas,
    max_replicas, target_ongoing_requests, ...) when given; Ray resources per replica."""

    replicas: int = 1
    autoscaling: dict[str, Any] = field(default_factory=dict)
    num_cpus: float = 1.0
    num_gpus: float = 0.0  # fractional shares a GPU between replicas
    accelerator_type: str = ""  # e.g. L4: replicas only on nodes with that GPU
    max_ongoing_requests: int = 32

    def __post_init__(self):
        check(self.replicas >= 1 and self.max_ongoing_requests >= 1, "replicas, max_ongoing_requests >= 1")
        check(self.num_cpus >= 0 and self.num_gpus >= 0, "num_cpus and num_gpus must be >= 0")


# Not ``Resources``: its Ray resources are per deployment (``encoder``, ``index``, ``ingress``); it holds only
# the model's ``device`` and ``dtype`` (kept rerun-relevant, as they were).
@dataclass(frozen=True)
class ServeConfig:
    """The retriever behind HTTP (Ray Serve): the run's index and the checkpoint that built it.

    Safe by default: binds ``host`` 127.0.0.1; when the environment variable ``token_env`` is set, every
    route but ``/healthz`` needs ``Authorization: Bearer <its value>``, and on any host but a loopback
    address the app refuses to start without it, unless ``allow_unauthenticated: true`` says so on
    purpose; bodies, parts, image bytes, an image's pixels and a request's (``max_request_pixels``, from
    the images' headers, before any is decoded) are bounded; images come only inline (base64), never as
    URLs. ``batch_size`` and
    ``batch_wait_s``: the query encoder's request batching (1 turns it off); while a batch runs, the
    next one waits until it is predicted to end, else up to ``batch_wait_s`` while requests come
    together; a lone request goes at once (``coral.serve.pacing``).
    ``index_in_encoder``: true: each encoder replica holds the index and searches it itself, and no
    index deployment starts (``serve.index`` unused): one hop fewer a search; false: the index
    deployment (``serve.index``) holds it; "auto" (the default): in the encoder when the index file is
    at most ``index_in_encoder_max_mb`` (each encoder replica holds a copy) and ``serve.index`` asks for
    no GPU, more than one replica or autoscaling, else the deployment (``coral.serve.app.index_layout``).
    ``forever``: keep serving after the stage (``--serve-forever``) instead of shutting down once the
    examples have run."""

    checkpoint: str = ""  # "": the one index.json records; another copy is served only if it matches
    host: str = "127.0.0.1"
    port: int = 8000
    app_name: str = "coral"
    route_prefix: str = "/"
    token_env: str = "CORAL_SERVE_TOKEN"
    allow_unauthenticated: bool = False  # serve a non-loopback host without a token, on purpose
    batch_size: int = 16
    batch_wait_s: float = 0.005
    encoder: DeploymentConfig = field(default_factory=DeploymentConfig)
    index: DeploymentConfig = field(default_factory=lambda: DeploymentConfig(num_cpus=0.25))
    index_in_encoder: bool | Literal["auto"] = "auto"
    index_in_encoder_max_mb: float = 512.0  # "auto": larger indexes get their own deployment
    # room beyond the searches a client may send at once: /healthz and /v1/info are never queued behind
    # them (the work each search brings is bounded by the encoder's max_ongoing_requests and the limits)
    ingress: DeploymentConfig = field(
        default_factory=lambda: DeploymentConfig(num_cpus=0.25, max_ongoing_requests=128)
    )
    max_body_bytes: int = 8 * 2**20
    max_parts: int = 16
    max_text_chars: int = 4000
    max_image_bytes: int = 4 * 2**20
    max_pixels: int = 4096 * 4096  # one image's
    max_request_pixels: int = 4096 * 4096  # a request's images' in all (about 50 MB as RGB)
    max_top_k: int = 100
    # inputs a request may hold: /v1/search's queries, /v1/embeddings' inputs
    max_inputs_per_request: int = 32
    examples: int = 3  # held-out queries sent over HTTP by the stage, printed with their top results
    access_log: bool = False  # Serve's line per request and replica (proxy, ingress, encoder, index): CPU
    forever: bool = False
    device: str = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    def __post_init__(self):
        check(1 <= self.port <= 65535, f"serve.port must be in 1..65535, got {self.port}")
        check(self.batch_size >= 1 and self.batch_wait_s >= 0, "serve.batch_size >= 1, batch_wait_s >= 0")
        limits = (self.max_body_bytes, self.max_parts, self.max_text_chars, self.max_image_bytes)
        limits += (self.max_inputs_per_request,)
        check(
            min(*limits, self.max_pixels, self.max_request_pixels, self.max_top_k) >= 1,
            "serve limits must be >= 1",
        )
        check(self.route_prefix.startswith("/"), "serve.route_prefix must start with /")
        check(
            self.index_in_encoder in (True, False, "auto") and self.index_in_encoder_max_mb >= 0,
            "serve.index_in_encoder must be true, false or auto; serve.index_in_encoder_max_mb >= 0",
        )
