"""The Python blocks of the pages in ``PAGES`` run, and print what the page says they print.

A page opts in by being listed below; then every ```` ```python ```` block on it is a complete
program. When a ```` ```text ```` block follows it directly, that is the program's exact stdout.
Each block runs as ``python -c`` in a fresh interpreter (a ``__main__`` of its own, as a user's
script would be) from the repository root.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = ["migrating.md", "executor.md", "pool.md"]  # every python block runs (a signature is a py block)

_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)


def snippets(page: str) -> list[tuple[str, str, str | None]]:
    """``(id, code, expected stdout or None)`` for each Python block of ``page``."""
    text = (DOCS / page).read_text(encoding="utf-8")
    blocks = [(m.group(1), m.group(2), m.start(), m.end()) for m in _FENCE.finditer(text)]
    found = []
    for i, (lang, code, start, _end) in enumerate(blocks):
        if lang != "python":
            continue
        expected = None
        if i + 1 < len(blocks) and blocks[i + 1][0] == "text" and \
                not text[blocks[i][3]:blocks[i + 1][2]].strip():
            expected = blocks[i + 1][1]
        line = text.count("\n", 0, start) + 1
        found.append((f"{page}:{line}", code, expected))
    return found


CASES = [pytest.param(code, expected, id=name)
         for page in PAGES for name, code, expected in snippets(page)]


def test_the_pages_have_snippets():
    for page in PAGES:
        assert snippets(page), f"no python blocks found in docs/{page}"


@pytest.mark.parametrize(("code", "expected"), CASES)
def test_snippet_runs_and_prints_what_the_page_shows(code, expected):
    if "joblib" in code:
        pytest.importorskip("joblib", reason="joblib is in the test extra")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=100, cwd=ROOT, env=env)
    assert done.returncode == 0, f"the snippet failed:\n{done.stdout}\n{done.stderr}"
    if expected is not None:
        assert done.stdout == expected, f"stderr:\n{done.stderr}"
