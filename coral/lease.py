"""One run per run_root: a lease at ``{run_root}/_lease.json`` that the graph driver holds while it runs.

    lease = Lease(root, config.storage, ttl_s=config.run.lease_ttl_s).acquire()  # UserInputError if held
    ...
    lease.check()    # LeaseLost unless this run still holds it (before deleting or completing a stage)
    lease.release()  # also on failure

The lease is ``{owner, host, pid, started, heartbeat, ttl_s}`` (owner: a random id of this run). Taking
it is atomic: on local storage the file appears whole or not at all (a hard link of a written temp file,
which fails when the name exists; ``O_CREAT | O_EXCL`` where links are not supported); on S3 a conditional
put (``If-None-Match: *``, honoured by S3 and by moto's server). A thread rewrites ``heartbeat`` every
``ttl_s / 8``: on S3 only if the object is still the one this run wrote (``If-Match`` on its ETag).

A lease whose heartbeat is older than its holder's ``ttl_s`` is stale (its run died without releasing it)
and the next run takes it over with a warning, atomically too: on S3 a put ``If-Match`` the ETag it judged
stale; on local storage by renaming the stale file away (only one taker can) and checking it is the one
judged. A write whose reply was lost and whose retry was refused is recognised as this run's own.

Limits: staleness compares the holder's clock (``heartbeat``) with the reader's, so clocks must agree to
well within ``ttl_s``; a run paused for longer than ``ttl_s`` may lose its lease, and learns it at its next
heartbeat or check.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from coral import storage
from coral.config import StorageConfig
from coral.errors import StorageError, UserInputError
from coral.storage import Location

log = logging.getLogger(__name__)

LEASE = "_lease.json"
_CONFLICT = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}
_MISSING = {"NoSuchKey", "404", "NotFound"}


class LeaseLost(RuntimeError):
    """This run no longer holds its run_root's lease: another run took it over."""


@dataclass(frozen=True)
class Holder:
    owner: str
    host: str
    pid: int
    started: float
    heartbeat: float
    ttl_s: float | None  # the holder's: it beats every ttl_s / 8, so it is stale after ttl_s without one

    def describe(self, now: float) -> str:
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started))
        return (
            f"run {self.owner} on host {self.host} (pid {self.pid}), started {started}, "
            f"last heartbeat {now - self.heartbeat:.0f} s ago"
        )


def _parse(raw: bytes) -> Holder | None:
    try:
        d = json.loads(raw)
        ttl = float(d["ttl_s"]) if d.get("ttl_s") is not None else None
        return Holder(
            str(d["owner"]), str(d["host"]), int(d["pid"]), float(d["started"]), float(d["heartbeat"]), ttl
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


class Lease:
    def __init__(self, root: Location, cfg: StorageConfig | None = None, ttl_s: float = 120.0):
        self.loc = root.child(LEASE)
        self.ttl_s = ttl_s
        self.heartbeat_s = ttl_s / 8
        self.owner = uuid.uuid4().hex[:16]
        self.host, self.pid, self.started = socket.gethostname(), os.getpid(), time.time()
        self._store: _Local | _S3 = _S3(self.loc, cfg or StorageConfig()) if root.is_s3 else _Local(self.loc)
        self._token: Any = None  # what the conditional ops compare: the ETag on S3, the bytes on local
        self._body = b""
        self._refreshed = 0.0
        self._lost: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _encode(self) -> bytes:
        d = {
            "owner": self.owner,
            "host": self.host,
            "pid": self.pid,
            "started": self.started,
            "ttl_s": self.ttl_s,
        }
        return json.dumps({**d, "heartbeat": time.time()}, sort_keys=True).encode()

    def _mine(self, body: bytes) -> Any:
        """The token of ``body`` when the store holds exactly it: a write whose reply was lost, retried, and
        refused because the first try went through."""
        current = self._store.read()
        return current[1] if current is not None and current[0] == body else None

    def acquire(self) -> Lease:
        """Take the lease (or a stale one over) and start the heartbeat; UserInputError naming the holder
        while another run holds it."""
        try:
            for _ in range(5):
                body = self._encode()
                token = self._store.create(body)
                if token is None:
                    current = self._store.read()
                    if current is None:
                        continue  # released meanwhile
                    raw, their_token, mtime = current
                    if raw == body:
                        token = their_token  # ours: the reply to the create was lost and its retry refused
                    else:
                        token = self._take_over(body, raw, their_token, mtime)
                        if token is None:
                            continue  # another run took it first: read again, to name it
                self._token, self._body, self._refreshed = token, body, time.time()
                break
            else:
                raise UserInputError(f"{self.loc.uri}: could not take the lease: other runs keep taking it")
        except OSError as e:
            raise StorageError(f"{self.loc.uri}: cannot take the lease: {storage._short(e)}") from None
        self._thread = threading.Thread(target=self._beat, name="coral-lease", daemon=True)
        self._thread.start()
        log.info("%s: lease taken by run %s", self.loc.uri, self.owner)
        return self

    def _take_over(self, body: bytes, raw: bytes, their_token: Any, mtime: float) -> Any:
        """Take a stale lease over; UserInputError naming the holder of a live one."""
        holder, now = _parse(raw), time.time()
        age = now - (holder.heartbeat if holder else mtime)
        # the holder's TTL when it wrote one (it beats every ttl_s / 8), else this run's
        ttl = holder.ttl_s if holder and holder.ttl_s else self.ttl_s
        who = holder.describe(now) if holder else f"an unreadable lease written {age:.0f} s ago"
        if age <= ttl:
            raise UserInputError(
                f"{self.loc.uri}: another run holds this run_root: {who}; it is taken over once its "
                f"heartbeat is older than its run.lease_ttl_s ({ttl:g} s). Wait for it to end, or use "
                f"another run.run_root"
            )
        log.warning("%s: taking over a stale lease: %s (its run.lease_ttl_s: %g s)", self.loc.uri, who, ttl)
        return self._store.take_over(body, their_token) or self._mine(body)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.refresh()
            except LeaseLost as e:
                log.error("%s", e)
                return
            except Exception as e:  # a storage fault: try again next beat, while the lease is still fresh
                if time.time() - self._refreshed > self.ttl_s:
                    self._lost = f"{self.loc.uri}: lease not refreshed for over {self.ttl_s:g} s ({e})"
                    log.error("%s", self._lost)
                    return
                log.warning("%s: lease heartbeat failed, retrying: %s", self.loc.uri, storage._short(e))

    def refresh(self) -> None:
        """Rewrite the heartbeat; LeaseLost when the lease is no longer this run's."""
        with self._lock:
            if self._lost:
                raise LeaseLost(self._lost)
            if self._token is None:
                return
            body = self._encode()
            token = self._store.replace_own(body, self._token) or self._mine(body)
            if token is None:
                self._lost = self._lost_message(self._store.read())
                raise LeaseLost(self._lost)
            self._token, self._body, self._refreshed = token, body, time.time()

    def check(self) -> None:
        """LeaseLost unless the stored lease is still the one this run last wrote."""
        with self._lock:
            if self._lost:
                raise LeaseLost(self._lost)
            current = self._store.read()
            if current is None or current[0] != self._body:
                self._lost = self._lost_message(current)
                raise LeaseLost(self._lost)

    def _lost_message(self, current: tuple | None) -> str:
        holder = _parse(current[0]) if current else None
        now_held = holder.describe(time.time()) if holder else "nobody"
        return f"{self.loc.uri}: run {self.owner} lost its lease; it is now held by {now_held}"

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still this run's. Never raises: it runs on the
        way out of a failure too."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            if self._token is None:
                return
            token, self._token = self._token, None
            try:
                if not self._store.delete_own(token, self._body):
                    log.warning("%s: not removed: another run holds it now", self.loc.uri)
            except Exception as e:
                log.warning("%s: could not remove the lease (%s)", self.loc.uri, storage._short(e))


class _Local:
    """The lease as a local file. Tokens are the file's bytes."""

    def __init__(self, loc: Location):
        self.path = loc.path

    def _temp(self, body: bytes) -> str:
        tmp = f"{self.path}.{uuid.uuid4().hex[:12]}.tmp"
        with open(tmp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def create(self, body: bytes) -> bytes | None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = self._temp(body)
        try:
            os.link(tmp, self.path)  # atomic and exclusive, and the file is whole when it appears
            return body
        except FileExistsError:
            return None
        except OSError:  # no hard links here: create exclusively, then write
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return None
            with os.fdopen(fd, "wb") as f:
                f.write(body)
            return body
        finally:
            os.unlink(tmp)

    def read(self) -> tuple[bytes, bytes, float] | None:
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
            return raw, raw, os.path.getmtime(self.path)
        except FileNotFoundError:
            return None

    def _claim(self, expected: bytes) -> str | None:
        """Rename the lease away (one caller wins) if it holds ``expected``; else leave it as it was."""
        claim = f"{self.path}.{uuid.uuid4().hex[:12]}.claim"
        try:
            os.rename(self.path, claim)
        except FileNotFoundError:
            return None
        with open(claim, "rb") as f:
            if f.read() == expected:
                return claim
        try:
            os.link(claim, self.path)  # not the one expected: put it back, unless a new one came meanwhile
        except FileExistsError:
            pass
        os.unlink(claim)
        return None

    def take_over(self, body: bytes, expected: bytes) -> bytes | None:
        claim = self._claim(expected)
        if claim is None:
            return None
        os.unlink(claim)
        return self.create(body)

    def replace_own(self, body: bytes, expected: bytes) -> bytes | None:
        # no gap in which the name is free: a check, then an atomic replace. Only a taker can come between
        # them, and only once this run has missed heartbeats for ttl_s.
        current = self.read()
        if current is None or current[0] != expected:
            return None
        os.replace(self._temp(body), self.path)
        return body

    def delete_own(self, token: bytes, body: bytes) -> bool:
        claim = self._claim(body)
        if claim is None:
            return self.read() is None
        os.unlink(claim)
        return True


class _S3:
    """The lease as an S3 object, written with conditional puts. Tokens are ETags."""

    def __init__(self, loc: Location, cfg: StorageConfig):
        self.client = storage.boto3_client(cfg)
        self.bucket, self.key = loc.path.split("/", 1)

    @staticmethod
    def _code(e: Exception) -> str:
        return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))

    def _put(self, body: bytes, **condition: str) -> str | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            r = self.client.put_object(
                Bucket=self.bucket, Key=self.key, Body=body, ContentType="application/json", **condition
            )
        except ClientError as e:
            if self._code(e) in _CONFLICT | _MISSING:
                return None
            raise OSError(str(e)) from None
        except BotoCoreError as e:
            raise OSError(str(e)) from None
        return r["ETag"]

    def create(self, body: bytes) -> str | None:
        return self._put(body, IfNoneMatch="*")

    def read(self) -> tuple[bytes, str, float] | None:
        from botocore.exceptions import BotoCoreError, ClientError

        for attempt in range(3):  # botocore retries the request, not a body cut off while read
            try:
                r = self.client.get_object(Bucket=self.bucket, Key=self.key)
                return r["Body"].read(), r["ETag"], r["LastModified"].timestamp()
            except ClientError as e:
                if self._code(e) in _MISSING:
                    return None
                raise OSError(str(e)) from None
            except BotoCoreError as e:  # retried by botocore already, or a body cut off: try again
                if attempt == 2:
                    raise OSError(str(e)) from None
        return None

    def take_over(self, body: bytes, etag: str) -> str | None:
        return self._put(body, IfMatch=etag)

    def replace_own(self, body: bytes, etag: str) -> str | None:
        return self._put(body, IfMatch=etag)

    def delete_own(self, etag: str, body: bytes) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=etag)
            return True
        except ClientError as e:
            if self._code(e) in _MISSING:
                return True
            if self._code(e) in _CONFLICT:
                return False
            raise OSError(str(e)) from None
        except BotoCoreError as e:
            raise OSError(str(e)) from None
