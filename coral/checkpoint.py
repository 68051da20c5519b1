"""Checkpoints as the index, evaluate and serve stages see them: where a retriever's model dir is, its
content hash, its embedding size, and the index bound to it.

A checkpoint is an exported Hugging Face dir (model + processor) on local disk or object storage, or a hub
id. Its hash is the SHA-256 of its files' names and bytes (a hub id hashes to the id itself): two dirs with
the same weights and processor have the same hash wherever they live. The export's description files
(``METADATA``: the model card, which the evaluate stage rewrites with its figures, and
``coral_retriever.json``) are left out of the hash and the listing's fingerprint: they describe the
weights, and rewriting them leaves the index bound to the checkpoint. ``local_dir`` copies an ``s3://``
dir once into a local cache keyed by its content, so every actor on every node can load it through the
one loader and a rewritten checkpoint is never served from a stale copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import tempfile
from dataclasses import asdict, dataclass

from coral import storage
from coral.config import StorageConfig
from coral.errors import ConfigError

INDEX_META = "index.json"
METADATA = ("README.md", "coral_retriever.json")  # top-level files of a checkpoint dir the hash leaves out


@dataclass(frozen=True)
class Checkpoint:
    uri: str  # dir, s3:// URI or hub id
    kind: str  # retriever kind (coral, mmret_mllm, mmret_clip)
    hash: str
    dim: int


def _files(uri: str, cfg: StorageConfig | None) -> tuple[storage.Location, list[str]]:
    loc = storage.resolve(uri, cfg)
    files = sorted(storage.list_files(loc))
    if not [f for f in files if not is_metadata(loc, f)]:
        raise ConfigError(f"checkpoint {uri}: no files there")
    return loc, files


def is_metadata(loc: storage.Location, path: str) -> bool:
    return posixpath.relpath(path, loc.path) in METADATA


def is_storage_path(uri: str) -> bool:
    return uri.startswith("s3://") or os.path.isdir(uri)


def content_hash(uri: str, cfg: StorageConfig | None = None) -> str:
    if not is_storage_path(uri):
        return "hub:" + uri
    loc, files = _files(uri, cfg)
    h = hashlib.sha256()
    for path in (f for f in files if not is_metadata(loc, f)):
        h.update(posixpath.relpath(path, loc.path).encode() + b"\0")
        with loc.fs.open_input_stream(path) as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()[:16]


def listing_fingerprint(uri: str, cfg: StorageConfig | None = None) -> str:
    """A cheap stand-in for the content hash: every file's name, size and modification time (rewriting
    an object on S3 changes its time), without reading the bytes."""
    loc, files = _files(uri, cfg)
    infos = loc.fs.get_file_info([f for f in files if not is_metadata(loc, f)])
    h = hashlib.sha256()
    for info in sorted(infos, key=lambda i: i.path):
        h.update(f"{posixpath.relpath(info.path, loc.path)}\0{info.size}\0{info.mtime_ns}\0".encode())
    return h.hexdigest()[:16]


def local_dir(uri: str, cfg: StorageConfig | None = None, content: str | None = None) -> str:
    """A local dir (or hub id) the loader can read: an ``s3://`` dir is copied once into a cache keyed by
    its URI and its content (``content``, the checkpoint's hash when the caller has it, else the listing's
    fingerprint), so a checkpoint rewritten at the same URI is fetched again, never served stale."""
    if not uri.startswith("s3://"):
        return uri
    key = content or listing_fingerprint(uri, cfg)
    cache = os.path.join(
        tempfile.gettempdir(), "coral-checkpoints", hashlib.sha1(f"{uri}\0{key}".encode()).hexdigest()[:16]
    )
    done = os.path.join(cache, ".complete")
    if not os.path.exists(done):
        loc, files = _files(uri, cfg)
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(cache))
        for path in files:
            dest = os.path.join(tmp, posixpath.relpath(path, loc.path))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with loc.fs.open_input_stream(path) as f, open(dest, "wb") as out:
                out.write(f.read())
        open(os.path.join(tmp, ".complete"), "w").close()
        try:
            os.rename(tmp, cache)
        except OSError:  # another process got there first
            shutil.rmtree(tmp, ignore_errors=True)
    return cache


def embedding_dim(model_dir: str) -> int:
    """The size of the retriever's embedding, from the model's config."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    if cfg.model_type in ("clip", "siglip"):
        return int(getattr(cfg, "projection_dim", None) or cfg.text_config.hidden_size)
    return int(getattr(cfg, "text_config", cfg).hidden_size)


def describe(uri: str, kind: str, cfg: StorageConfig | None = None) -> Checkpoint:
    digest = content_hash(uri, cfg)
    return Checkpoint(uri, kind, digest, embedding_dim(local_dir(uri, cfg, digest)))


class IndexMismatch(ConfigError):
    pass


def check_bound(index_meta: dict, model: Checkpoint, where: str) -> None:
    """An index may only be searched with the checkpoint that built it."""
    built = index_meta["checkpoint"]
    if built["hash"] != model.hash or built["dim"] != model.dim:
        raise IndexMismatch(
            f"the index at {where} was built with checkpoint {built['uri']} (hash {built['hash']}, "
            f"embedding size {built['dim']}), not with {model.uri} (hash {model.hash}, embedding size "
            f"{model.dim}); rebuild the index with this checkpoint or load the one it was built with"
        )


def index_meta(checkpoint: Checkpoint, spec: str, count: int, index_bytes: bytes) -> dict:
    """``index.json``: the checkpoint that built the index, its spec and size, and the SHA-256 of the
    ``index.faiss`` bytes, checked whenever the index is loaded."""
    return {
        "checkpoint": asdict(checkpoint),
        "spec": spec,
        "count": count,
        "dim": checkpoint.dim,
        "index_sha256": hashlib.sha256(index_bytes).hexdigest(),
    }


def check_index_digest(index_meta: dict, digest: str, where: str) -> None:
    """The ``index.faiss`` bytes (their SHA-256, ``digest``) are the ones ``index.json`` recorded: a
    swapped or damaged file refuses to load, so no index is searched that the checkpoint did not build."""
    want = index_meta.get("index_sha256")
    if not want:
        raise IndexMismatch(f"{where}/{INDEX_META} records no index_sha256; rebuild the index")
    if digest != want:
        raise IndexMismatch(
            f"{where}/index.faiss has sha256 {digest}, not the {want} that {INDEX_META} records: the file "
            "was replaced or damaged after the index stage wrote it; rebuild the index"
        )


def index_file_digest(index_dir: storage.Location) -> str:
    """SHA-256 of ``index.faiss``, read in chunks (an index can be larger than memory would like)."""
    h = hashlib.sha256()
    with index_dir.fs.open_input_stream(index_dir.child("index.faiss").path) as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def read_index_meta(index_dir: storage.Location) -> dict:
    loc = index_dir.child(INDEX_META)
    if not storage.exists(loc):
        raise ConfigError(f"no index at {index_dir.uri} ({INDEX_META} is missing); run the index stage")
    return json.loads(storage.read_bytes(loc))
