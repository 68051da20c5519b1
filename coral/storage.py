"""One way to reach storage: a URI (local path, ``file://``, ``s3://bucket/prefix``) becomes a pyarrow
filesystem plus a path, used by Ray Data (``filesystem=``), Ray Train (``storage_filesystem=``) and boto3.

Endpoint, region and credentials come from ``StorageConfig`` or the usual AWS environment variables.
Credentials live only inside the filesystem objects; nothing here logs or returns them.
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

from coral.config import StorageConfig
from coral.errors import ConfigError, StorageError

PROBE_NAME = ".coral-write-probe"


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


def s3_filesystem(cfg: StorageConfig) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = dict(
        region=region(cfg),
        connect_timeout=cfg.connect_timeout_s,
        request_timeout=cfg.request_timeout_s,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=cfg.max_attempts),
    )
    if cfg.access_key_id and cfg.secret_access_key:
        kwargs.update(access_key=cfg.access_key_id, secret_key=cfg.secret_access_key)
    url = endpoint_url(cfg)
    if url:
        parsed = urlparse(url if "://" in url else f"https://{url}")
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme or "https")
    return pafs.S3FileSystem(**kwargs)


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
        probe = posixpath.join(loc.path, PROBE_NAME)
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


def read_bytes(loc: Location) -> bytes:
    with loc.fs.open_input_stream(loc.path) as f:
        return f.read()


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
            retries={"max_attempts": cfg.max_attempts, "mode": "standard"},
        ),
    )
    if cfg.access_key_id and cfg.secret_access_key:
        kwargs.update(aws_access_key_id=cfg.access_key_id, aws_secret_access_key=cfg.secret_access_key)
    return boto3.client("s3", **kwargs)
