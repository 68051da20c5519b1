"""Build frozen dataclasses from plain dicts, checking every key and type.

Errors name the dotted key path (``mine.index.nprobe``) so a caller can add the file name.

Why not pydantic (installed with Ray Serve, used for the HTTP API in ``coral.serve.api``): for the same
bad configs its messages are worse for a person editing YAML. An unknown key says "Extra inputs are not
permitted" where this lists the known keys at that level; a wrongly typed secret prints its value unless
``hide_input_in_errors`` hides every value of the model; list paths read ``encoders.1`` rather than
``encoders[1]``; its default mode turns ``"8"`` and ``true`` into ints. Frozen dataclasses also pickle
small into every Ray actor with nothing to import.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union

from coral.errors import ConfigError


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Return ``cls(**data)`` with nested dataclasses built and types checked."""
    return _convert(cls, data, path)


def _convert(tp: Any, value: Any, path: str) -> Any:
    where = path or "<root>"
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp) if f.init}
        unknown = [k for k in value if k not in fields]
        if unknown:
            key = f"{path}.{unknown[0]}" if path else str(unknown[0])
            raise ConfigError(f"unknown key '{key}' (known under {where}: {', '.join(sorted(fields))})")
        kwargs = {}
        for k, v in value.items():
            key = f"{path}.{k}" if path else k
            try:
                kwargs[k] = _convert(hints[k], v, key)
            except ConfigError:
                if not fields[k].metadata.get("secret"):
                    raise
                raise ConfigError(f"{key}: expected {hints[k]} (value hidden: it is a secret)") from None
        try:
            return tp(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {tp}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: expected one of {list(allowed)}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp, *_rest) = typing.get_args(tp) or (Any,)
        items = [_convert(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        _, val_tp = typing.get_args(tp)
        return {str(k): _convert(val_tp, v, f"{path}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")


def to_dict(obj: Any, redact: bool = True, for_hash: bool = False) -> Any:
    """Plain-data view of a config. Fields marked ``metadata={"secret": True}`` become '***'; with
    ``for_hash``, fields marked ``metadata={"rerun": False}`` (resources, sharding) are left out."""
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            if for_hash and f.metadata.get("rerun") is False:
                continue
            v = getattr(obj, f.name)
            secret = redact and f.metadata.get("secret") and v is not None
            out[f.name] = "***" if secret else to_dict(v, redact, for_hash)
        return out
    if isinstance(obj, list | tuple):
        return [to_dict(v, redact, for_hash) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v, redact, for_hash) for k, v in obj.items()}
    return obj


def is_secret(cls: type, keys: list[str]) -> bool:
    """Whether the dotted path ``keys`` names a field marked secret inside dataclass ``cls``."""
    for i, key in enumerate(keys):
        if not dataclasses.is_dataclass(cls):
            return False
        field = {f.name: f for f in dataclasses.fields(cls)}.get(key)
        if field is None:
            return False
        if i == len(keys) - 1:
            return bool(field.metadata.get("secret"))
        cls = typing.get_type_hints(cls)[key]
    return False


def check(condition: bool, message: str) -> None:
    """Validation helper for ``__post_init__``: raise ConfigError(message) unless condition."""
    if not condition:
        raise ConfigError(message)
