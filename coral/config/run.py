"""Where a run lives and how it reaches its storage and Ray: the ``run``, ``storage`` and ``ray`` sections."""

from __future__ import annotations

from dataclasses import dataclass, field

from coral.typed import check


@dataclass(frozen=True)
class RunConfig:
    """Where the run lives and which stages it has, in order."""

    name: str = "demo"
    run_root: str = "runs/demo"  # local path, file:// or s3://bucket/prefix
    stages: tuple[str, ...] = ("catalog", "embed")
    # one run per run_root: its lease (run_root/_lease.json) is refreshed every lease_ttl_s / 8 and taken
    # over by another run only once its heartbeat is older than this (coral.lease)
    lease_ttl_s: float = 120.0

    def __post_init__(self):
        check(bool(self.run_root), "run_root must not be empty")
        check(len(self.stages) > 0, "stages must name at least one stage")
        check(self.lease_ttl_s > 0, f"lease_ttl_s must be > 0, got {self.lease_ttl_s}")


@dataclass(frozen=True)
class StorageConfig:
    """Object-storage access. Unset values fall back to the usual AWS_* environment variables."""

    endpoint_url: str | None = None  # e.g. http://127.0.0.1:9000 for an S3-compatible server
    region: str | None = None
    # secrets: in no repr, manifest (redacted), log line or error message
    access_key_id: str | None = field(default=None, repr=False, metadata={"secret": True})
    secret_access_key: str | None = field(default=None, repr=False, metadata={"secret": True})
    connect_timeout_s: float = 3.0
    request_timeout_s: float = 10.0
    max_attempts: int = 5  # tries per request, the first included (boto3 and pyarrow alike)

    def __post_init__(self):
        check(
            (self.access_key_id is None) == (self.secret_access_key is None),
            "access_key_id and secret_access_key must be set together (or neither, to use the environment)",
        )
        check(self.max_attempts >= 1, f"max_attempts must be >= 1, got {self.max_attempts}")


@dataclass(frozen=True)
class RayConfig:
    """How the driver reaches Ray. ``address`` (or RAY_ADDRESS) joins a cluster; otherwise a local Ray starts.

    ``num_cpus`` is the *logical* CPU count of a local Ray: on a 2-core machine an actor pool plus its read
    tasks (or train workers plus ingest) deadlock at the physical count, so the default oversubscribes.
    """

    address: str | None = None
    num_cpus: int = 4
    include_dashboard: bool = True  # Ray Train V2 logs state-API errors without it
    temp_dir: str | None = None
    # a local Ray's Serve runs throughput-optimized (RAY_SERVE_THROUGHPUT_OPTIMIZED): gRPC between
    # replicas, user code on the replica's event loop, HTTP straight into ingress replicas beside the proxy.
    # A cluster sets it where Ray starts (cluster.yaml, the KubeRay manifests); the environment wins.
    serve_throughput_optimized: bool = True
    # a local Ray runs the stages' CPU model pools (embed, annotate's hf engine, index, evaluate) as tasks
    # in Ray's long-lived worker processes, each keeping the model it built last: later stages skip the
    # 5-6 s of imports a new actor process costs. False: actor pools, as on a cluster (always there).
    warm_workers: bool = True

    def __post_init__(self):
        check(self.num_cpus >= 1, f"num_cpus must be >= 1, got {self.num_cpus}")
