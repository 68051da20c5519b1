"""The code blocks of a docs page that a test runs as they are written (``<!-- snippet: name -->`` on the
line before the fenced block), so the docs cannot drift from what the code does."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_BLOCK = re.compile(r"<!-- snippet: (\S+) -->\n```python\n(.*?)```", re.S)


def snippets(page: str) -> dict[str, str]:
    """name -> the code of each marked block of ``docs/{page}``."""
    return dict(_BLOCK.findall((REPO / "docs" / page).read_text()))


def run_snippet(page: str, name: str, model_dir: str | Path) -> dict:
    """Execute a block with its ``model_dir = "..."`` line pointed at ``model_dir``; its globals."""
    code = snippets(page)[name]
    line = re.search(r'^model_dir = "[^"]*"$', code, re.M)
    assert line, f"docs/{page} snippet {name}: no model_dir line to point at the test's model"
    scope: dict = {"__name__": f"snippet_{name}"}
    exec(
        compile(code.replace(line.group(), f"model_dir = {str(model_dir)!r}"), f"docs/{page}", "exec"), scope
    )
    return scope
