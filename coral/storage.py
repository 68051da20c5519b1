"""One way to reach storage: a URI (local path, ``file://``, ``s3://bucket/prefix``) becomes a pyarrow
filesystem plus a path, used by Ray Data (``filesystem=``), Ray Train (``storage_filesystem=``) and boto3.

Endpoint, region and credentials come from ``StorageConfig`` or the usual AWS environment variables.
Credentials live only inside the filesystem objects; nothing here logs or returns them.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import random
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from coral import schemas
from coral.config import StorageConfig
from coral.errors import ConfigError, StorageError

PROBE_NAME = ".coral-write-probe"
T = TypeVar("T")


@dataclass(frozen=True)
class Location:
    """A resolved storage location: ``fs`` + ``path`` (no scheme), and the ``uri`` users see."""

    uri: str
    fs: pafs.FileSystem
    path: str

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")

    def child(self, *parts: str) -> Location:
        return Location(join(self.uri, *parts), self.fs, posixpath.join(self.path, *parts))


def join(uri: str, *parts: str) -> str:
    return posixpath.join(uri.rstrip("/"), *parts) if parts else uri


def endpoint_url(cfg: StorageConfig) -> str | None:
    return cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def region(cfg: StorageConfig) -> str:
    return cfg.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


class RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3FileSystem, with ``max_attempts`` tries per request (throttling, 5xx, network errors).

    The retry strategy is AWS's *default* one (exponential backoff, no retry quota): the *standard* one
    shares a quota of 500 tokens per filesystem that a run's retries spend (5 or 10 each), after which it
    stops retrying altogether; a long-lived filesystem behind a throttling endpoint then fails requests on
    the first error. pyarrow's default strategy counts retries, not attempts, hence ``max_attempts - 1``.

    It also pickles with its retry strategy: pyarrow's ``__reduce__`` drops it, so the copy a Ray task gets
    would fall back to pyarrow's connect-only retries, and a 503 SlowDown would fail the task.
    """

    def __init__(self, *, max_attempts: int, **kwargs: Any):
        strategy = pafs.AwsDefaultS3RetryStrategy(max_attempts=max(max_attempts - 1, 0))
        super().__init__(retry_strategy=strategy, **kwargs)
        self.max_attempts = max_attempts
        self._rebuild_args = (max_attempts, kwargs)

    def __reduce__(self):
        return _rebuild_s3, self._rebuild_args


def _rebuild_s3(max_attempts: int, kwargs: dict[str, Any]) -> RetryingS3FileSystem:
    return RetryingS3FileSystem(max_attempts=max_attempts, **kwargs)


def s3_filesystem(cfg: StorageConfig) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = dict(
        region=region(cfg),
        connect_timeout=cfg.connect_timeout_s,
        request_timeout=cfg.request_timeout_s,
    )
    if cfg.access_key_id and cfg.secret_access_key:
        kwargs.update(access_key=cfg.access_key_id, secret_key=cfg.secret_access_key)
    url = endpoint_url(cfg)
    if url:
        parsed = urlparse(url if "://" in url else f"https://{url}")
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme or "https")
    return RetryingS3FileSystem(max_attempts=cfg.max_attempts, **kwargs)


def resolve(uri: str, cfg: StorageConfig | None = None) -> Location:
    """Turn a URI into a Location. Local paths become absolute; ``s3://`` keeps bucket/prefix as the path."""
    cfg = cfg or StorageConfig()
    if uri.startswith("s3://"):
        path = uri[len("s3://") :].strip("/")
        if not path:
            raise StorageError(f"{uri}: an s3:// URI needs a bucket")
        return Location(f"s3://{path}", s3_filesystem(cfg), path)
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    elif "://" in uri:
        raise StorageError(f"{uri}: unsupported scheme (use a local path, file:// or s3://)")
    path = str(Path(uri).expanduser().absolute())
    return Location(path, pafs.LocalFileSystem(), path)


def ensure_writable(loc: Location) -> bool:
    """Fail fast with a StorageError naming the URI unless we can create, write and delete under it.

    Returns False when this call created the (local) directory, so a caller can take it back."""
    existed = True
    try:
        if loc.is_s3:
            bucket = loc.path.split("/", 1)[0]
            if loc.fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise StorageError(f"{loc.uri}: bucket '{bucket}' does not exist")
        else:
            existed = exists(loc)
            loc.fs.create_dir(loc.path, recursive=True)
        probe = posixpath.join(loc.path, f"{PROBE_NAME}-{uuid.uuid4().hex[:12]}")  # one per caller
        with loc.fs.open_output_stream(probe) as f:
            f.write(b"ok")
        loc.fs.delete_file(probe)
        return existed
    except StorageError:
        raise
    except (OSError, PermissionError) as e:
        raise StorageError(f"{loc.uri}: cannot write there: {_short(e)}") from None


def _short(e: Exception) -> str:
    return str(e).splitlines()[0][:300] if str(e) else type(e).__name__


def exists(loc: Location) -> bool:
    return loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound


def size(loc: Location) -> int:
    """Bytes in the file at ``loc``; FileNotFoundError naming it when there is none."""
    info = loc.fs.get_file_info(loc.path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"{loc.uri}: no such file")
    return info.size


# The AWS SDK (C++) writes an error reply's body into the buffer of a ranged read: a 503 SlowDown's XML
# outgrows a small range (a Parquet column chunk of a few dozen bytes), the transfer aborts and the error
# comes back as INTERNAL_FAILURE, which no retry strategy retries. Ray Data retries it in its own reads.
_OVERFLOWED = "Failed to flush response stream"


def read_retried(loc: Location, read: Callable[[], T]) -> T:
    """``read()``, a pyarrow read under ``loc``, tried up to the filesystem's ``max_attempts`` times while
    it fails that way (a throttled small ranged read); any other error at once."""
    attempts = getattr(loc.fs, "max_attempts", 1)
    for attempt in range(1, attempts + 1):
        try:
            return read()
        except OSError as e:
            if _OVERFLOWED not in str(e) or attempt == attempts:
                raise
            time.sleep(random.uniform(0.5, 1.0) * min(0.1 * 2**attempt, 5.0))
    raise AssertionError("unreachable")


def read_table(loc: Location, **kwargs: Any) -> Any:
    """``pq.read_table`` of the Parquet file or folder at ``loc`` (``columns=``, ``filters=``...), retried
    like ``read_retried``."""
    import pyarrow.parquet as pq

    return read_retried(loc, lambda: pq.read_table(loc.path, filesystem=loc.fs, **kwargs))


def read_dataset(loc: Location, columns: list[str] | None = None, filter: Any = None) -> Any:
    """The Parquet dataset at ``loc`` as one table (``columns``, a ``pyarrow.dataset`` ``filter``),
    retried like ``read_retried``."""
    import pyarrow.dataset as pads

    def read():
        return pads.dataset(loc.path, filesystem=loc.fs, format="parquet").to_table(
            columns=columns, filter=filter
        )

    return read_retried(loc, read)


def read_bytes(loc: Location) -> bytes:
    def read() -> bytes:
        with loc.fs.open_input_stream(loc.path) as f:
            return f.read()

    return read_retried(loc, read)


def write_bytes(loc: Location, data: bytes) -> None:
    parent = posixpath.dirname(loc.path)
    if parent and not loc.is_s3:
        loc.fs.create_dir(parent, recursive=True)
    with loc.fs.open_output_stream(loc.path) as f:
        f.write(data)


def read_json(loc: Location) -> Any:
    return json.loads(read_bytes(loc))


def read_json_items(loc: Location, key: str) -> list:
    """A JSON list or JSON lines file's items; a ConfigError naming the config ``key`` and the file when it
    cannot be read or parsed."""
    try:
        text = read_bytes(loc).decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{key}: cannot read {loc.uri}: {type(e).__name__}") from None
    try:
        if text.lstrip().startswith("["):
            return json.loads(text)
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ConfigError(f"{key}: {loc.uri} is neither a JSON list nor JSON lines ({e})") from None


def write_parquet(loc: Location, table: Any) -> None:
    """One Parquet file at ``loc`` (its directory created on local storage)."""
    import pyarrow.parquet as pq

    parent = posixpath.dirname(loc.path)
    if parent and not loc.is_s3:
        loc.fs.create_dir(parent, recursive=True)
    pq.write_table(table, loc.path, filesystem=loc.fs)


def keyed_name(keys: Iterable[str]) -> str:
    """A batch's file name from its rows' keys, so that a retried batch overwrites its own file instead of
    adding a second copy."""
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


def write_rejected(loc: Location, rows: list[dict], schema: Any = None) -> None:
    """Rejected rows ({id, reason}, or ``schema``'s columns) as one Parquet file named after their ids."""
    if rows:
        table = pa.Table.from_pylist(rows, schema=schema or schemas.REJECTED)
        write_parquet(loc.child(f"part-{keyed_name(r[schemas.ID] for r in rows)}.parquet"), table)


def write_json(loc: Location, obj: Any) -> None:
    write_bytes(loc, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def delete_tree(loc: Location) -> None:
    """Remove a directory (or prefix) and everything under it; missing is fine."""
    info = loc.fs.get_file_info(loc.path)
    if info.type == pafs.FileType.Directory or (loc.is_s3 and list_files(loc)):
        loc.fs.delete_dir(loc.path)
    elif info.type == pafs.FileType.File:
        loc.fs.delete_file(loc.path)


def list_files(loc: Location, suffix: str = "") -> list[str]:
    """Paths (fs paths, sorted) of the files under ``loc`` ending in ``suffix``."""
    sel = pafs.FileSelector(loc.path, recursive=True, allow_not_found=True)
    return sorted(
        i.path for i in loc.fs.get_file_info(sel) if i.type == pafs.FileType.File and i.path.endswith(suffix)
    )


def boto3_client(cfg: StorageConfig | None = None):
    """A boto3 S3 client with the same endpoint, region, credentials and timeouts as the filesystems."""
    import boto3
    from botocore.config import Config as BotoConfig

    cfg = cfg or StorageConfig()
    kwargs: dict[str, Any] = dict(
        region_name=region(cfg),
        endpoint_url=endpoint_url(cfg),
        config=BotoConfig(
            connect_timeout=cfg.connect_timeout_s,
            read_timeout=cfg.request_timeout_s,
            # adaptive: standard retries (backoff, throttling and transient errors) plus client-side rate
            # limiting once the endpoint throttles
            retries={"max_attempts": cfg.max_attempts, "mode": "adaptive"},
        ),
    )
    if cfg.access_key_id and cfg.secret_access_key:
        kwargs.update(aws_access_key_id=cfg.access_key_id, aws_secret_access_key=cfg.secret_access_key)
    return boto3.client("s3", **kwargs)
