"""Stage manifests and completion markers.

A stage's output under ``{run_root}/{stage}/`` is complete when ``_SUCCESS`` exists beside
``manifest.json``; the marker is written last. A manifest's ``hash`` is a lineage hash over the stage
name, its config hash and its inputs' hashes, so a downstream stage reruns exactly when something it
depends on changed.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from coral import storage
from coral.errors import StorageError
from coral.storage import Location

MANIFEST = "manifest.json"
SUCCESS = "_SUCCESS"
DATA = "data"
REJECTED = "rejected"

_VERSIONED = ("ray", "torch", "transformers", "deepspeed", "faiss-cpu", "pyarrow", "numpy")


@dataclass
class StageResult:
    """What a stage reports: rows read, rows written, rows rejected by reason, and free-form details;
    ``work_s``, where the stage knows it better than its meter: the seconds of it that grow with its rows
    (``coral.cost``)."""

    rows_in: int
    rows_out: int
    rejected: dict[str, int] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    work_s: float | None = None

    @property
    def rows_rejected(self) -> int:
        return sum(self.rejected.values())


def stable_hash(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def lineage_hash(stage: str, config_hash: str, inputs: dict[str, str]) -> str:
    return stable_hash({"stage": stage, "config": config_hash, "inputs": inputs})


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_commit() -> str | None:
    """HEAD of the checkout the code runs from, with "-dirty" when it has uncommitted changes."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=5, check=True)
        return out.stdout.strip()

    try:
        head = git("rev-parse", "HEAD")
        return f"{head}-dirty" if git("status", "--porcelain", "--untracked-files=no") else head
    except (OSError, subprocess.SubprocessError):
        return None


def build(
    stage: str,
    config: dict,
    config_hash: str,
    inputs: dict[str, str],
    status: str,
    started: float,
    result: StageResult | None = None,
    error: str | None = None,
    cost: dict | None = None,
) -> dict:
    manifest = {
        "stage": stage,
        "status": status,
        "config": config,
        "config_hash": config_hash,
        "inputs": inputs,
        "hash": lineage_hash(stage, config_hash, inputs),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started, 3),
        "versions": versions(),
        "git_commit": git_commit(),
    }
    if result is not None:
        manifest.update(
            rows_in=result.rows_in,
            rows_out=result.rows_out,
            rows_rejected=result.rows_rejected,
            rejected_reasons=dict(sorted(result.rejected.items())),
            details=result.details,
        )
    if cost is not None:
        manifest["cost"] = cost
    if error is not None:
        manifest["error"] = error
    return manifest


def read_complete(stage_dir: Location) -> dict | None:
    """The manifest of a completed stage, or None when its ``_SUCCESS`` is missing (incomplete).

    Once ``_SUCCESS`` exists, a manifest that cannot be read or parsed is a StorageError naming it, never
    "incomplete": the caller would otherwise delete a finished stage (a storage blip is not a redo)."""
    if not storage.exists(stage_dir.child(SUCCESS)):
        return None
    loc = stage_dir.child(MANIFEST)
    try:
        m = storage.read_json(loc)
    except (OSError, ValueError) as e:
        raise StorageError(
            f"{loc.uri}: cannot read the manifest of a completed stage: {storage._short(e)}"
        ) from e
    if not isinstance(m, dict):
        raise StorageError(f"{loc.uri}: the manifest of a completed stage is not a JSON object")
    return m


def write_complete(stage_dir: Location, manifest: dict) -> None:
    storage.write_json(stage_dir.child(MANIFEST), manifest)
    storage.write_bytes(stage_dir.child(SUCCESS), b"")


def write_failed(stage_dir: Location, manifest: dict) -> None:
    storage.write_json(stage_dir.child(MANIFEST), manifest)
