"""Every Python block of docs/*.md runs, in page order, and prints what the page shows.

How the pages are written, and what this module checks (tests/docs_blocks.py does the
reading and running):

* **A block tagged ``python`` runs.** Signatures, class skeletons and other text that is not
  a program are tagged ``text``. Other tags that would highlight as Python (``py``,
  ``python3``, ``pycon``, ...) are refused, so that whether a block runs is never in doubt.
* **Each page is one program.** Its ``python`` blocks run one after another, in page order,
  in one fresh interpreter started from the repository root with no workers, in one
  ``__main__`` namespace, as if a reader pasted them into one script. So a block may use what
  earlier blocks of its page defined (``d``, ``pids``, the workers they added) and pids count
  up through the page; a page whose blocks depend on each other says so near its top.
  Each block is compiled with the page as its file name and its page line numbers, so a
  traceback points into the page.
* **Output is shown and checked.** A ``text`` block right after a ``python`` block (nothing but
  blank lines between) is that block's standard output, compared exactly, except that
  ``...`` in it matches any text (for what changes from run to run: a job id, a line number of
  the reader's script, a pid that depends on what ran before). A block that prints must be
  followed by such an output block (see ``OUTPUT_NOT_REQUIRED`` for the exception).
  Standard error (log records, warnings) is not compared; it is shown when a block fails.
* **Markers.** An HTML comment on the line(s) right before a block (invisible on the site and
  on code hosts) changes how it is run:

  - ``<!-- needs: ssh -->`` / ``<!-- needs: slurm -->``: the block needs that service. It is
    left out of its page's program and runs as a program of its own (so it must not use the
    page's other blocks, nor they it), with its output block checked, in
    tests/managers/test_ssh.py or test_slurm.py, which skip when the test sshd or Slurm is
    not up (``.ci/setup-sshd.sh`` and ``.ci/setup-slurm.sh`` start them).
  - ``<!-- not run: REASON -->``: valid Python that cannot run here (it needs files the
    reader makes first, say). It is only compiled.

Keep each block quick: the whole module runs in well under two minutes on two cores.
"""

from __future__ import annotations

import pytest

from tests.docs_blocks import (PYTHON_ALIASES, RUNNABLE, SERVICES, Block, matches,
                               missing_modules, page_program, pages, problems, read_blocks,
                               run_program)

pytestmark = pytest.mark.timeout(120)

PAGE_TIMEOUT = 100.0
"""Seconds one page's program may take (the slowest takes about 15)."""

EXCLUDED: dict[str, str] = {}
"""Pages whose blocks are not run, with the reason. None at present."""

OUTPUT_NOT_REQUIRED = {
    "errors.md": "edited separately; its committed version shows what its blocks print in "
                 "comments (drop this entry once its output blocks are in)",
}
"""Pages whose printing blocks may lack an output block (those that have one are checked)."""

PAGES = [page for page in pages() if page not in EXCLUDED and page_program(page)]


@pytest.mark.parametrize("page", PAGES)
def test_the_page_runs_in_order_and_prints_what_it_shows(page):
    blocks = page_program(page)
    missing = missing_modules(blocks)
    if missing:
        pytest.skip(f"docs/{page} imports {missing}, which are not installed (the test extra "
                    "installs them)")
    outcome = run_program(blocks, timeout=PAGE_TIMEOUT)
    found = problems(blocks, outcome, require_output_blocks=page not in OUTPUT_NOT_REQUIRED)
    assert not found, "\n\n".join(found)


def test_the_code_blocks_follow_the_conventions():
    wrong = []
    for page in pages():
        for block in read_blocks(page):
            if block.lang in PYTHON_ALIASES:
                wrong.append(f"{block}: tagged {block.lang!r}: tag code that runs "
                             f"{RUNNABLE!r} and signatures or fragments 'text'")
            if (block.needs or block.not_run) and block.lang != RUNNABLE:
                wrong.append(f"{block}: a marker on a {block.lang!r} block, which never runs")
            if block.needs is not None and block.needs not in SERVICES:
                wrong.append(f"{block}: needs {block.needs!r}; known: {', '.join(SERVICES)}")
            if block.not_run is not None:
                if not block.not_run:
                    wrong.append(f"{block}: '<!-- not run: -->' without a reason")
                try:
                    compile(block.code, f"docs/{page}", "exec")
                except SyntaxError as exc:
                    wrong.append(f"{block}: not run, and not even Python: {exc}")
    assert not wrong, "\n".join(wrong)


def test_every_page_with_python_blocks_runs_or_is_excluded_with_a_reason():
    assert all(reason for reason in EXCLUDED.values())
    assert set(EXCLUDED) <= set(pages()), "EXCLUDED names a page that does not exist"
    for page in pages():
        if page in EXCLUDED:
            continue
        runs = page_program(page)
        if any(b.lang == RUNNABLE for b in read_blocks(page)):
            assert runs or all(b.needs or b.not_run for b in read_blocks(page)
                               if b.lang == RUNNABLE), page
    assert len(PAGES) >= 10  # the reader found the pages' blocks at all


def test_output_blocks_match_exactly_except_for_ellipses():
    assert matches("[0, 1]\n", "[0, 1]\n")
    assert not matches("[0, 1]\n", "[0, 1]\n\n")
    assert matches("Worker ... has exited.\n", "Worker 12 has exited.\n")
    assert matches("a\n...\nz\n", "a\nb\nc\nz\n")
    assert not matches("Worker ... has exited.\n", "Worker 12 has exited (exit code 1).\n")


def test_markers_and_output_blocks_are_read_from_the_page(tmp_path, monkeypatch):
    import tests.docs_blocks as docs_blocks

    (tmp_path / "page.md").write_text(
        "Intro.\n\n```python\nprint(1)\n```\n\n```text\n1\n```\n\n"
        "- a list item:\n\n  ```python\n  x = 2\n  ```\n\n"
        "<!-- needs: ssh -->\n```python\nprint('remote')\n```\n\n"
        "<!-- not run: needs a file -->\n```python\nopen('f')\n```\n\n"
        "Prose.\n\n```text\nsig(a, b)\n```\n", encoding="utf-8")
    monkeypatch.setattr(docs_blocks, "DOCS", tmp_path)
    blocks = read_blocks("page.md")
    assert [(b.line, b.lang) for b in blocks] == \
        [(4, "python"), (8, "text"), (14, "python"), (19, "python"), (24, "python"),
         (30, "text")]
    first, _, item, remote, fragment, _ = blocks
    assert first.expected == "1\n" and item.code == "x = 2\n" and item.expected is None
    assert remote.needs == "ssh" and not remote.runs_here
    assert fragment.not_run == "needs a file" and not fragment.runs_here
    assert [b.line for b in page_program("page.md")] == [4, 14]
    assert isinstance(first, Block)
