"""The files shipped inside the package, found by name where a given path does not exist.

``coral/data/workflows/`` holds the workflows (``demo.yaml``, ``megapairs.yaml``, ``merit.yaml``,
``ci_small.yaml``, ``overlays/local.yaml``) and ``coral/data/deepspeed/`` the DeepSpeed JSONs
(``zero2.json``, ``zero2_bf16.json``, ``zero3.json``). A source checkout links its ``workflows/`` and
``cluster/deepspeed/`` to these folders, and ``pip install .`` copies them into the installed package, so
an installed ``coral run --config demo.yaml`` works from any folder.

The rule (``find``): a path that exists, relative to the current folder or absolute, is that file. Any
other relative path names a shipped file: the checkout's prefix (``workflows/``, ``cluster/deepspeed/``)
may be left out and so may ``.yaml``, and a name that is not a workflow may be an overlay. So
``demo``, ``demo.yaml`` and ``workflows/demo.yaml`` are the shipped demo; ``local`` and
``workflows/overlays/local.yaml`` the shipped overlay; ``zero3.json`` and ``cluster/deepspeed/zero3.json``
the shipped ZeRO-3 config.
"""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
WORKFLOWS = DATA / "workflows"
DEEPSPEED = DATA / "deepspeed"


def _candidates(path: str, folder: Path, prefix: str, suffix: str, subfolders: tuple[str, ...]) -> list[Path]:
    rel = path.removeprefix("./").removeprefix(prefix)
    names = [rel] + ([rel + suffix] if suffix and not rel.endswith(suffix) else [])
    return [folder / sub / name for sub in ("", *subfolders) for name in names]


def find(
    path: str | Path, folder: Path, prefix: str = "", suffix: str = "", subfolders: tuple[str, ...] = ()
) -> Path:
    """``path`` when it is a file or absolute, else the first shipped file under ``folder`` it names (see
    the module's rule); ``path`` unchanged when none does, so that the caller's error names it."""
    given = Path(path)
    if given.is_file() or given.is_absolute() or ".." in given.parts:
        return given
    for candidate in _candidates(given.as_posix(), folder, prefix, suffix, subfolders):
        if candidate.is_file():
            return candidate
    return given


def workflow(path: str | Path) -> Path:
    """A workflow or overlay YAML: ``path`` itself, or the shipped one it names."""
    return find(path, WORKFLOWS, "workflows/", ".yaml", ("overlays",))


def deepspeed(path: str | Path) -> Path:
    """A DeepSpeed JSON: ``path`` itself, or the shipped one it names."""
    return find(path, DEEPSPEED, "cluster/deepspeed/", ".json")


def names(folder: Path = WORKFLOWS) -> list[str]:
    """The shipped files under ``folder``, as they may be named (``demo.yaml``, ``overlays/local.yaml``)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
