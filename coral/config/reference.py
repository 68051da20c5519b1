"""The configuration reference (docs/configuration.md), generated from the config classes themselves:
every key with its type, default and the comment beside it in the source, section by section.

    python -m coral.config.reference > docs/configuration.md

A test fails when the committed page differs from what this prints, so the reference cannot go stale.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
import types
import typing
from typing import Any, Literal, Union

from coral.config.load import Config

HEADER = """# Configuration reference

Generated from the config classes (`python -m coral.config.reference > docs/configuration.md`); a test
fails when it is stale. A workflow YAML sets any of these keys; `key.path=value` on the command line
overrides one. Unknown keys and wrong types stop the run before anything is written, naming the file and
the key. Keys marked *placement* (resources, sharding, batch sizes) never rerun a completed stage; any
other change reruns that stage and the ones after it.
"""
_FIELD = re.compile(r"^\s+(\w+):\s*[^=#]+(?:=.*?)?(?:#\s*(?P<comment>.*))?$")


def comments(cls: type) -> dict[str, str]:
    """Field name -> the comment on its line, or on the comment lines just above it, in ``cls``'s source
    and its dataclass bases'."""
    out: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        above: list[str] = []
        for line in inspect.getsource(klass).splitlines():
            stripped = line.strip()
            if stripped.startswith("#"):
                above.append(stripped.lstrip("# "))
                continue
            m = _FIELD.match(line)
            if m and m.group(1) in {f.name for f in dataclasses.fields(klass)}:
                out[m.group(1)] = m.group("comment") or " ".join(above)
            above = []
    return out


def type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " \\| ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " \\| ".join("null" if a is type(None) else type_name(a) for a in args)
    if origin in (tuple, list):
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping of {type_name(args[1])}"
    if dataclasses.is_dataclass(tp):
        return "section"
    return getattr(tp, "__name__", str(tp))


def default_of(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return ""
    if dataclasses.is_dataclass(value) or (
        isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0])
    ):
        return "(below)"
    if f.metadata.get("secret"):
        return "(secret: from the environment)" if value is None else "***"
    text = repr(list(value) if isinstance(value, tuple) else value)
    return f"`{text}`" if text != "''" else '`""`'


def rows(cls: type, path: str) -> tuple[list[str], list[tuple[str, type]]]:
    """Markdown rows of ``cls``'s keys under ``path``, and the nested sections to document after it."""
    hints, notes = typing.get_type_hints(cls), comments(cls)
    out, nested = [], []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        inner = [a for a in (typing.get_args(tp) or (tp,)) if dataclasses.is_dataclass(a)]
        if inner:
            many = typing.get_origin(tp) in (tuple, list)
            nested.append((f"{path}.{f.name}" + ("[]" if many else ""), inner[0]))
        note = notes.get(f.name, "").replace("|", "\\|")
        if f.metadata.get("rerun") is False:
            note = f"*placement* {note}".strip()
        out.append(f"| `{f.name}` | {type_name(tp)} | {default_of(f)} | {note} |")
    return out, nested


def doc(cls: type) -> str:
    return " ".join((inspect.getdoc(cls) or "").split())


def render() -> str:
    parts = [HEADER]
    for section in dataclasses.fields(Config):
        todo = [(section.name, typing.get_type_hints(Config)[section.name])]
        while todo:
            path, cls = todo.pop(0)
            body, nested = rows(cls, path)
            parts.append(f"\n## `{path}`\n\n{doc(cls)}\n\n| key | type | default | what |\n|---|---|---|---|")
            parts.append("\n".join(body))
            todo = nested + todo
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
