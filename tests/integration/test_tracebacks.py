"""What the user of a script sees when a remote call fails and nobody catches the error.

The user's program is written once (``PROGRAM``) and run as a real script (``python
program.py MODE``, or ``python -c``), each failure uncaught, and the tests read what Python
printed on stderr: the remote frames once, with the script's file names and source lines, none
of distexec's own frames among them, the worker named once, and the executor's remote block
the same as ``ProcessPoolExecutor``'s, but for the stdlib's ``_process_worker`` frame.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[2]

PROGRAM = '''\
import linecache
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor

import distexec


def parse(text):
    return int(text)


def work(item):
    value = parse(item)
    return value * 2


def die():
    os.kill(os.getpid(), signal.SIGKILL)


# How IPython defines a cell's functions: a file name only its linecache knows.
CELL_FILE = "/nonexistent/ipykernel_0/cell.py"
CELL = "def in_a_cell(x):\\n    y = x + 1\\n    return y / 0\\n"


def define_in_a_cell():
    linecache.cache[CELL_FILE] = (len(CELL), None, CELL.splitlines(True), CELL_FILE)
    exec(compile(CELL, CELL_FILE, "exec"), globals())
    return globals()["in_a_cell"]


def main(mode):
    if mode == "ProcessPoolExecutor":
        with ProcessPoolExecutor(1) as pool:
            pool.submit(work, "x").result()
    elif mode == "DistributedExecutor":
        with distexec.DistributedExecutor(1) as ex:
            ex.submit(work, "x").result()
    elif mode == "remotecall_fetch":
        distexec.addprocs(1)
        distexec.remotecall_fetch(work, 2, "x")
    elif mode == "pmap":
        distexec.addprocs(1)
        distexec.pmap(parse, ["1", "x", "3"])
    elif mode == "dead worker":
        with distexec.DistributedExecutor(1) as ex:
            ex.submit(die).result()
    elif mode == "notebook cell":
        in_a_cell = define_in_a_cell()
        with distexec.DistributedExecutor(1) as ex:
            ex.submit(in_a_cell, 1).result()


if __name__ == "__main__":
    main(sys.argv[1])
'''

MESSAGE = "ValueError: invalid literal for int() with base 10: 'x'"


def line_of(source: str) -> int:
    """The number of the program's one line that is ``source`` (stripped)."""
    lines = [line.strip() for line in PROGRAM.splitlines()]
    assert lines.count(source) == 1, source
    return lines.index(source) + 1


@pytest.fixture(scope="module")
def printed(tmp_path_factory):
    """``printed(mode, dash_c=False)``: the lines the failing program printed on stderr, and
    the path its frames name. Each mode runs once per module."""
    folder = tmp_path_factory.mktemp("user")
    script = folder / "program.py"
    script.write_text(PROGRAM, encoding="utf-8")
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    runs: dict[tuple[str, bool], list[str]] = {}

    def run(mode: str, dash_c: bool = False) -> tuple[list[str], str]:
        if (mode, dash_c) not in runs:
            program = ["-c", PROGRAM] if dash_c else [str(script)]
            done = subprocess.run([sys.executable, *program, mode], cwd=folder, env=env,
                                  capture_output=True, text=True, timeout=150)
            assert done.returncode == 1, done.stderr
            runs[mode, dash_c] = [line.rstrip() for line in done.stderr.splitlines()]
        return runs[mode, dash_c], "<string>" if dash_c else str(script)

    return run


def traceback_of(lines: list[str]) -> list[str]:
    """The printed traceback, without the log lines before it."""
    for i, line in enumerate(lines):
        if line == "Traceback (most recent call last):" or line.endswith("RemoteTraceback:"):
            return lines[i:]
    raise AssertionError("no traceback printed:\n" + "\n".join(lines))


def remote_block(lines: list[str]) -> list[str]:
    """The remote traceback: the lines between the first two lines of triple quotes."""
    start = lines.index('"""')
    return lines[start + 1:lines.index('"""', start + 1)]


def frame(path: str, source: str, function: str) -> str:
    return f'  File "{path}", line {line_of(source)}, in {function}'


def expected_block(path: str) -> list[str]:
    return ["Traceback (most recent call last):",
            frame(path, "value = parse(item)", "work"),
            "    value = parse(item)",
            "            ^^^^^^^^^^^",
            frame(path, "return int(text)", "parse"),
            "    return int(text)",
            "           ^^^^^^^^^",
            MESSAGE]


def assert_no_distexec_frames(block: list[str]) -> None:
    files = [line for line in block if line.startswith("  File ")]
    assert files and not [f for f in files if f"distexec{os.sep}" in f], block


def test_an_executor_task_reads_as_under_ProcessPoolExecutor(printed):
    ours, path = printed("DistributedExecutor")
    theirs, _ = printed("ProcessPoolExecutor")
    ours, theirs = traceback_of(ours), traceback_of(theirs)
    assert ours[:2] == ["distexec.errors.RemoteTraceback:", '"""']
    assert theirs[:2] == ["concurrent.futures.process._RemoteTraceback:", '"""']
    block = remote_block(ours)
    assert block == expected_block(path)
    # ProcessPoolExecutor's block has one frame more, its own that called the function
    their_block = remote_block(theirs)
    users = next(i for i, line in enumerate(their_block) if line.startswith(f'  File "{path}"'))
    assert their_block[:1] + their_block[users:] == block
    assert ours[-2:] == [MESSAGE, "(raised on worker 2)"]
    assert frame(path, "ex.submit(work, \"x\").result()", "main") in ours
    assert sum("in work" in line for line in ours) == 1  # the remote frames once
    assert sum("worker 2" in line.lower() for line in ours) == 1


def test_remotecall_fetch_prints_the_remote_frames_once(printed):
    lines, path = printed("remotecall_fetch")
    lines = traceback_of(lines)
    assert lines[:2] == ["distexec.errors.RemoteTraceback:", '"""']
    assert remote_block(lines) == expected_block(path)
    assert lines[-1] == f"distexec.errors.RemoteException: On worker 2: {MESSAGE}"
    assert sum("in work" in line for line in lines) == 1
    assert sum("worker 2" in line.lower() for line in lines) == 1
    assert sum(line == "Traceback (most recent call last):" for line in lines) == 2


def test_a_failed_pmap_shows_the_users_function_alone(printed):
    lines, path = printed("pmap")
    lines = traceback_of(lines)
    block = remote_block(lines)
    assert block == ["Traceback (most recent call last):",
                     frame(path, "return int(text)", "parse"),
                     "    return int(text)",
                     "           ^^^^^^^^^",
                     MESSAGE]
    assert_no_distexec_frames(block)
    assert lines[-1] == f"distexec.errors.RemoteException: On worker 2: {MESSAGE}"
    assert sum("in parse" in line for line in lines) == 1
    # on this side: the program's frames, then pmap's, not the machinery that carried the news
    caller = lines[len(lines) - lines[::-1].index("Traceback (most recent call last):"):]
    files = [line for line in caller if line.startswith("  File ")]
    assert [f for f in files if f"distexec{os.sep}" in f] == files[-1:], caller
    assert files[-1].endswith(", in pmap")
    assert frame(path, 'distexec.pmap(parse, ["1", "x", "3"])', "main") in files


def test_a_dead_worker_is_one_exception_without_a_remote_block(printed):
    lines, path = printed("dead worker")
    lines = traceback_of(lines)
    assert lines[0] == "Traceback (most recent call last):"
    assert frame(path, "ex.submit(die).result()", "main") in lines
    last = "distexec.errors.ProcessExitedException: Worker 2 has exited"
    assert lines[-1].startswith(last) and "SIGKILL(-9)" in lines[-1], lines[-1]
    assert '"""' not in lines and sum(line.startswith("Traceback") for line in lines) == 1


def test_a_notebook_cell_shows_its_source_from_the_master(printed):
    lines, _ = printed("notebook cell")
    assert remote_block(traceback_of(lines)) == [
        "Traceback (most recent call last):",
        '  File "/nonexistent/ipykernel_0/cell.py", line 3, in in_a_cell',
        "    return y / 0",
        "           ~~^~~",
        "ZeroDivisionError: division by zero"]


def test_python_dash_c_names_its_frames_as_python_does(printed):
    lines, path = printed("DistributedExecutor", dash_c=True)
    # no source to show, as for any function of a ``python -c`` program, but file and lines
    assert remote_block(traceback_of(lines)) == [
        "Traceback (most recent call last):",
        frame(path, "value = parse(item)", "work"),
        frame(path, "return int(text)", "parse"),
        MESSAGE]
