"""Reading the code blocks of docs/*.md and running them as programs.

Used by tests/integration/test_docs_snippets.py (every page, local workers) and by
tests/managers/test_ssh.py and test_slurm.py (the blocks marked ``<!-- needs: ssh -->`` or
``<!-- needs: slurm -->``). The conventions the pages follow are described in the docstring
of tests/integration/test_docs_snippets.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

RUNNABLE = "python"
"""The one fence tag whose blocks run."""
PYTHON_ALIASES = {"py", "python3", "py3", "pycon", "ipython", "python-repl", "pytb"}
"""Tags Pygments would also highlight as Python: not allowed, so that "runs" is never unclear."""
SERVICES = ("ssh", "slurm")
"""What ``<!-- needs: ... -->`` may name."""

_FENCE = re.compile(
    r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^\n`]*)\n"
    r"(?P<body>.*?)"
    r"^(?P=indent)(?P=fence)[ \t]*$",
    re.S | re.M)
_MARKER = re.compile(r"<!--\s*(?P<kind>needs|not run):\s*(?P<what>[^>]*?)\s*-->\s*\Z")
_MARK = "@@distexec-docs-block {line}@@"
_MARK_LINE = re.compile(r"^@@distexec-docs-block (\d+)@@\n", re.M)


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    page: str
    """The file name under docs/, e.g. ``"calls.md"``."""
    line: int
    """The page line of the block's first line of code (1-based)."""
    lang: str
    code: str
    expected: str | None = None
    """For a ``python`` block: the ``text`` block right after it (its stdout), if any."""
    needs: str | None = None
    """What ``<!-- needs: ... -->`` right before the block names (``"ssh"``, ``"slurm"``)."""
    not_run: str | None = None
    """Why not, when ``<!-- not run: ... -->`` is right before the block."""

    @property
    def runs_here(self) -> bool:
        """Whether the page's own program runs this block."""
        return self.lang == RUNNABLE and self.needs is None and self.not_run is None

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def read_blocks(page: str) -> list[Block]:
    """Every fenced block of ``docs/page``, in page order, output blocks attached."""
    text = (DOCS / page).read_text(encoding="utf-8")
    raw = []
    for match in _FENCE.finditer(text):
        indent = match.group("indent")
        lines = match.group("body").splitlines(keepends=True)
        code = "".join(line[len(indent):] if line.startswith(indent) else line.lstrip()
                       for line in lines)
        lang = match.group("info").strip().split(" ")[0] if match.group("info").strip() else ""
        before = text[raw[-1][3] if raw else 0:match.start()]
        marker = _MARKER.search(before)
        marks = {marker.group("kind"): marker.group("what")} if marker else {}
        raw.append((lang, code, match.start(), match.end(), marks,
                    text.count("\n", 0, match.start()) + 2))
    blocks = []
    for i, (lang, code, _start, end, marks, line) in enumerate(raw):
        expected = None
        if lang == RUNNABLE and i + 1 < len(raw) and raw[i + 1][0] == "text" and \
                not text[end:raw[i + 1][2]].strip():
            expected = raw[i + 1][1]
        blocks.append(Block(page, line, lang, code, expected, marks.get("needs"),
                            marks.get("not run")))
    return blocks


def python_blocks(page: str) -> list[Block]:
    """Every ``python`` block of the page, whether it runs here, elsewhere or not at all."""
    return [b for b in read_blocks(page) if b.lang == RUNNABLE]


def page_program(page: str) -> list[Block]:
    """The blocks the page's own program runs, in page order."""
    return [b for b in read_blocks(page) if b.runs_here]


def pages() -> list[str]:
    return sorted(p.name for p in DOCS.glob("*.md"))


def blocks_needing(service: str) -> list[Block]:
    """The runnable blocks of every page marked ``<!-- needs: service -->``."""
    return [b for page in pages() for b in python_blocks(page) if b.needs == service]


# A fresh interpreter runs the blocks one after another in its own ``__main__`` (so that what
# they define there is shipped to workers by value, as from a user's script), each compiled
# with its page as file name and its page line numbers, so that a traceback points into the
# page. Before each block a marker line goes to stdout and stderr, which splits the output.
_BOOTSTRAP = r'''
def _docs_main():
    import json, sys
    namespace = sys.modules["__main__"].__dict__
    del namespace["_docs_main"]
    for path, line, code in json.load(sys.stdin):
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
            print(MARK.format(line=line), file=stream, flush=True)
        exec(compile("\n" * (line - 1) + code, path, "exec"), namespace)
    sys.stdout.flush()
    sys.stderr.flush()
_docs_main()
'''.replace("MARK", repr(_MARK))


@dataclass
class Outcome:
    returncode: int
    failure: str
    """How the program ended, in words (an exit status, or the timeout)."""
    stdout: dict[int, str]
    """Each block's stdout, by its line."""
    stderr: dict[int, str]
    last: int | None
    """The line of the last block that started."""
    raw_stderr: str


def _split(text: str) -> tuple[dict[int, str], int | None]:
    parts = _MARK_LINE.split(text)
    # parts: [before the first marker, line, output, line, output, ...]
    found = {int(parts[i]): parts[i + 1] for i in range(1, len(parts) - 1, 2)}
    last = int(parts[-2]) if len(parts) > 1 else None
    return found, last


def run_program(blocks: list[Block], timeout: float) -> Outcome:
    """Run ``blocks`` in one fresh interpreter from the repository root."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    program = [(f"docs/{b.page}", b.line, b.code) for b in blocks]
    try:
        done = subprocess.run([sys.executable, "-c", _BOOTSTRAP], input=json.dumps(program),
                              capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                              env=env)
        returncode, out, err = done.returncode, done.stdout, done.stderr
        failure = f"exit status {returncode}"
    except subprocess.TimeoutExpired as exc:  # killed; its workers die with it
        returncode, failure = -1, f"still running after {timeout} s, killed"
        out, err = (_text(exc.stdout), _text(exc.stderr))
    stdout, _ = _split(out)
    stderr, last = _split(err)
    return Outcome(returncode, failure, stdout, stderr, last, err)


def _text(data: str | bytes | None) -> str:
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data or ""


def missing_modules(blocks: list[Block]) -> list[str]:
    """Top-level modules the blocks import that are not installed here (joblib, dask, ...)."""
    names = {m.group(1) for b in blocks
             for m in re.finditer(r"^[ \t]*(?:import|from)[ \t]+([A-Za-z_]\w*)", b.code, re.M)}
    return sorted(n for n in names if importlib.util.find_spec(n) is None)


def matches(expected: str, actual: str) -> bool:
    """``actual == expected``, except that ``...`` in ``expected`` matches any text."""
    pattern = ".*?".join(map(re.escape, expected.split("...")))
    return re.fullmatch(pattern, actual, re.S) is not None


def problems(blocks: list[Block], outcome: Outcome, require_output_blocks: bool = True
             ) -> list[str]:
    """What went wrong, block by block: a failure, output unlike the page's, and (with
    ``require_output_blocks``) output the page does not show."""
    found = []
    if outcome.returncode != 0:
        where = next((b for b in blocks if b.line == outcome.last), None)
        stderr = outcome.stderr.get(outcome.last, "") if where else outcome.raw_stderr
        found.append(f"{where or 'the program'} failed ({outcome.failure}):\n{stderr}")
    for block in blocks:
        if block.line not in outcome.stdout or \
                (outcome.returncode != 0 and block.line == outcome.last):
            continue
        actual = outcome.stdout[block.line]
        if block.expected is None:
            if actual and require_output_blocks:
                found.append(f"{block} prints, but the page shows no output block after it; "
                             f"it printed:\n{actual}")
        elif not matches(block.expected, actual):
            found.append(f"{block} printed\n{actual!r}\nbut the page shows\n"
                         f"{block.expected!r}\n(stderr of the block:\n"
                         f"{outcome.stderr.get(block.line, '')})")
    return found
