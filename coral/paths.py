"""Paths that come from the user's files stay where they are allowed to point.

An image path written in a products, MERIT or MegaPairs file resolves only under that file's own folder
(``root``: a local folder or ``s3://bucket/prefix``) or under a prefix the config allows explicitly
(``allowed_image_roots``). ``confine`` returns the path's resolved URI or raises ``PathError`` with a
short reason; ``safe_name`` checks that an id can be one file-name component (the MERIT export writes
``<id>.png``). Every caller uses these two; there is no second copy of the rules.
"""

from __future__ import annotations

import os
import posixpath
from functools import lru_cache

S3, FILE = "s3://", "file://"
MAX_NAME_BYTES = 200  # leaves room for an extension within the usual 255-byte file-name limit


class PathError(ValueError):
    """A path or name from a user's file that may not be used; the message is the short reason."""


def _under(path: str, prefix: str) -> bool:
    prefix = prefix.rstrip("/") or "/"
    return path == prefix or path.startswith(prefix if prefix.endswith("/") else prefix + "/")


def _s3(uri: str) -> str:
    """``s3://bucket/key`` normalised: ``..`` and ``.`` folded, never above the bucket."""
    return S3 + posixpath.normpath("/" + uri[len(S3) :]).lstrip("/")


def _local(path: str) -> str:
    return os.path.realpath(path[len(FILE) :] if path.startswith(FILE) else path)


@lru_cache(maxsize=64)  # one file's rows share their roots: resolve them once, not once a row
def _roots(root: str, allowed: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(s3 prefixes, local prefixes as written (normalised), the same with symlinks resolved)."""
    s3, lexical, real = [], [], []
    for r in (root, *allowed):
        if r.startswith(S3):
            s3.append(_s3(r))
        elif r:
            lexical.append(posixpath.normpath(r[len(FILE) :] if r.startswith(FILE) else r))
            real.append(_local(r))
    return tuple(s3), tuple(lexical + real), tuple(real)


def confine(path: object, root: str, allowed: tuple[str, ...] = ()) -> str:
    """The URI ``path`` names, resolved against ``root`` (the folder of the file that wrote it): a local
    real path (symlinks followed) or a normalised ``s3://`` URI. PathError unless it lies under ``root``
    or one of the ``allowed`` prefixes (local folders or ``s3://bucket[/prefix]``)."""
    if not isinstance(path, str) or not path.strip():
        raise PathError("no image path")
    if "\0" in path:
        raise PathError("NUL in the image path")
    s3_roots, lexical_roots, real_roots = _roots(root, tuple(allowed))
    scheme = path.split("://", 1)[0].lower() if "://" in path else ""
    if scheme not in ("", "s3", "file"):
        raise PathError(f"URI scheme '{scheme}' is not allowed")
    relative = scheme == "" and not posixpath.isabs(path)
    if scheme == "s3" or (relative and root.startswith(S3)):
        uri = _s3(path if scheme else posixpath.join(root, path))
        if not any(_under(uri, r) for r in s3_roots):
            raise PathError("s3 path outside the file's folder and the allowed roots")
        return uri
    local = path[len(FILE) :] if scheme == "file" else path
    if scheme == "file" and not posixpath.isabs(local):
        raise PathError("file:// needs an absolute path")
    # a relative path here has a local root, the first of real_roots
    lexical = posixpath.normpath(posixpath.join(real_roots[0], local) if relative else local)
    if not any(_under(lexical, r) for r in lexical_roots):
        if relative:
            raise PathError("'..' escapes the file's folder")
        raise PathError("absolute path outside the file's folder and the allowed roots")
    real = os.path.realpath(lexical)
    if not any(_under(real, r) for r in real_roots):
        raise PathError("symlink leaves the file's folder and the allowed roots")
    return real


def safe_name(name: object) -> str:
    """``name`` when it can be a single file-name component as is; PathError with the reason otherwise."""
    if not isinstance(name, str) or not name:
        raise PathError("empty id")
    if "\0" in name:
        raise PathError("NUL in the id")
    for bad in ("/", "\\", ".."):
        if bad in name:
            raise PathError(f"'{bad}' in the id")
    if name == "." or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise PathError("not a file name (control character or '.')")
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise PathError(f"id longer than {MAX_NAME_BYTES} bytes")
    return name
