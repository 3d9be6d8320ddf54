"""What tasks print, as the user sees it: stdout to stdout, stderr to stderr, whole lines,
a ``\\r`` progress line while it runs, and the ``From worker N:`` prefix as configured.

Each scenario is the user's script, run in a fresh interpreter under ``ProcessPoolExecutor``
and under ``DistributedExecutor`` (the executor is the script's first argument), with its
stdout and stderr read apart, or on a pseudo-terminal where a terminal matters.
"""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import distexec
from distexec.cluster.console import LineSplitter, render
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "      From worker "

HEADER = """
    import os, sys, time
    from concurrent.futures import ProcessPoolExecutor
    import distexec

    def executor(**params):
        if sys.argv[1] == "ppe":
            return ProcessPoolExecutor(2)
        return distexec.DistributedExecutor(2, **params)
"""


def _script(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent(HEADER) + textwrap.dedent(body), encoding="utf-8")
    return script


def _environment(**extra: str) -> dict:
    """The user's environment: Python's own buffering (no PYTHONUNBUFFERED), distexec importable."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONUNBUFFERED", "DISTEXEC_OUTPUT_PREFIX")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**env, **extra}


def run(tmp_path: Path, body: str, backend: str, *args: str,
        **env: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(_script(tmp_path, body)), backend, *args],
                          capture_output=True, text=True, timeout=100, cwd=tmp_path,
                          env=_environment(**env))
    assert done.returncode == 0, f"the script failed:\n{done.stdout}\n{done.stderr}"
    return done


def unlabelled(text: str) -> list[str]:
    """The lines of ``text`` without the worker prefix, sorted (workers race each other)."""
    return sorted(line.split(":\t", 1)[1] if line.startswith(PREFIX) else line
                  for line in text.splitlines())


class Terminal:
    """A script run on a pseudo-terminal (stdout and stderr both on it), read as it goes."""

    def __init__(self, script: Path, backend: str, **env: str):
        controller, terminal = pty.openpty()
        self.process = subprocess.Popen([sys.executable, str(script), backend], stdin=terminal,
                                        stdout=terminal, stderr=terminal, cwd=script.parent,
                                        env=_environment(**env), close_fds=True)
        os.close(terminal)
        self.controller = controller
        self.output = b""

    def expect(self, needle: str, timeout: float = 30) -> str:
        """Read until ``needle`` has appeared; the output so far (the terminal's ``\\r\\n``
        as ``\\n``)."""
        deadline = time.monotonic() + timeout
        while needle.encode() not in self.output:
            left = deadline - time.monotonic()
            assert left > 0, f"{needle!r} not on the terminal after {timeout} s: {self.text!r}"
            if select.select([self.controller], [], [], left)[0]:
                try:
                    data = os.read(self.controller, 65536)
                except OSError:  # the script ended and closed the terminal
                    data = b""
                assert data, f"the script ended before {needle!r}: {self.text!r}"
                self.output += data
        return self.text

    @property
    def text(self) -> str:
        """What the terminal shows: ``\r`` and "clear to the end of the row" applied."""
        raw = self.output.decode(errors="replace").replace("\r\n", "\n").replace("\x1b[K", "")
        return "\n".join(render(line) for line in raw.split("\n"))

    def finish(self, timeout: float = 60) -> str:
        """Read to the end; the whole output."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"the script did not end: {self.text!r}"
            if not select.select([self.controller], [], [], left)[0]:
                continue
            try:
                data = os.read(self.controller, 65536)
            except OSError:
                data = b""
            if not data:
                break
            self.output += data
        assert self.process.wait(timeout=10) == 0, self.text
        os.close(self.controller)
        return self.text


TWO_STREAMS = """
    def task(i):
        print(f"out {i}")
        print(f"err {i}", file=sys.stderr)
        return i

    if __name__ == "__main__":
        with executor() as ex:
            assert list(ex.map(task, range(4))) == [0, 1, 2, 3]
"""


def test_a_tasks_stdout_and_stderr_reach_the_masters_stdout_and_stderr(tmp_path):
    ppe, ours = (run(tmp_path, TWO_STREAMS, backend) for backend in ("ppe", "distexec"))
    assert unlabelled(ours.stdout) == unlabelled(ppe.stdout) == [f"out {i}" for i in range(4)]
    assert unlabelled(ours.stderr) == unlabelled(ppe.stderr) == [f"err {i}" for i in range(4)]
    assert all(line.startswith(PREFIX) for line in ours.stdout.splitlines())


PRINT_THEN_RETURN = """
    def task(i):
        print(f"task {i} says hello")
        return i

    if __name__ == "__main__":
        with executor() as ex:
            for i in range(20):
                print(f"result {ex.submit(task, i).result()}", flush=True)
"""


@pytest.mark.parametrize("backend", ["ppe", "distexec"])
def test_what_a_task_printed_comes_before_its_result_on_a_terminal(tmp_path, backend):
    terminal = Terminal(_script(tmp_path, PRINT_THEN_RETURN), backend)
    lines = [line.split(":\t", 1)[-1] for line in terminal.finish().splitlines()]
    assert lines == [text for i in range(20)
                     for text in (f"task {i} says hello", f"result {i}")], lines


def test_lines_written_piece_by_piece_by_two_workers_arrive_whole(tmp_path):
    # Each character its own write: under ProcessPoolExecutor two children writing so to
    # one file mix their lines; distexec relays each line whole.
    done = run(tmp_path, """
        def task(i):
            for n in range(50):
                for char in f"worker task {i} line {n} " + "x" * 60 + "\\n":
                    sys.stdout.write(char)
                    sys.stdout.flush()
            return i

        if __name__ == "__main__":
            with executor() as ex:
                list(ex.map(task, range(2)))
    """, "distexec")
    lines = unlabelled(done.stdout)
    assert len(lines) == 100
    expected = sorted(f"worker task {i} line {n} " + "x" * 60 for i in range(2) for n in range(50))
    assert lines == expected


PARTIAL_LINE = """
    def task(i):
        print(f"hello {i}")
        return i

    if __name__ == "__main__":
        print("the master's line ", end="")
        with executor() as ex:
            list(ex.map(task, range(2)))
        print("ends here")
"""


def test_the_masters_unfinished_line_on_a_terminal_is_never_cut(tmp_path):
    # ProcessPoolExecutor differs here: multiprocessing flushes the master's streams before
    # it starts a child, so the children's lines land after "the master's line ".
    terminal = Terminal(_script(tmp_path, PARTIAL_LINE), "distexec")
    text = terminal.finish()
    lines = text.splitlines()
    assert "the master's line ends here" in lines, text
    assert sorted(line.split(":\t", 1)[-1] for line in lines if "hello" in line) == \
        ["hello 0", "hello 1"], text


PROGRESS = """
    def task(go):
        sys.stderr.write("\\rworking: 10%")
        sys.stderr.flush()
        while not os.path.exists(go):  # the test reads the terminal, then lets it finish
            time.sleep(0.01)
        sys.stderr.write("\\rworking: 100%\\n")
        return "done"

    if __name__ == "__main__":
        with executor() as ex:
            print(ex.submit(task, sys.argv[2]).result())
"""


@pytest.mark.parametrize("backend", ["ppe", "distexec"])
def test_a_progress_line_reaches_the_terminal_while_the_task_runs(tmp_path, backend):
    go = tmp_path / "go"
    script = _script(tmp_path, PROGRESS.replace("sys.argv[2]", repr(str(go))))
    terminal = Terminal(script, backend)
    terminal.expect("working: 10%")
    assert "100%" not in terminal.text
    go.touch()
    text = terminal.finish()
    assert "working: 100%\n" in text and text.endswith("done\n"), text


def test_the_prefix_can_be_changed_or_turned_off_by_parameter_or_environment(tmp_path):
    body = """
        def task(i):
            print(f"out {i}")
            return i

        if __name__ == "__main__":
            params = {"output_prefix": sys.argv[2]} if sys.argv[2:] else {}
            with executor(**params) as ex:
                list(ex.map(task, range(2)))
    """
    ppe = run(tmp_path, body, "ppe")
    bare = run(tmp_path, body, "distexec", "")
    assert sorted(bare.stdout.splitlines()) == sorted(ppe.stdout.splitlines())
    for done in (run(tmp_path, body, "distexec", DISTEXEC_OUTPUT_PREFIX="[{pid}] "),
                 run(tmp_path, body, "distexec", "[{pid}] ", DISTEXEC_OUTPUT_PREFIX="x")):
        lines = done.stdout.splitlines()
        assert sorted(line[4:] for line in lines) == ["out 0", "out 1"], lines
        assert all(line[:4] in ("[2] ", "[3] ") for line in lines), lines


@pytest.mark.parametrize("prefix", ["{name}", "{pid", 7])
def test_a_bad_prefix_fails_before_any_worker_starts(no_workers, prefix):
    error = TypeError if not isinstance(prefix, str) else ValueError
    with pytest.raises(error, match="output_prefix"):
        distexec.addprocs(1, output_prefix=prefix)
    assert distexec.procs() == [1]


def test_a_bad_prefix_in_the_environment_is_named(no_workers, monkeypatch):
    monkeypatch.setenv("DISTEXEC_OUTPUT_PREFIX", "{worker}")
    with pytest.raises(ValueError, match="DISTEXEC_OUTPUT_PREFIX"):
        distexec.addprocs(1)
    assert distexec.procs() == [1]


def test_a_prefix_given_to_addprocs_labels_that_workers_lines(add_workers, capfd):
    (pid,) = add_workers(1, output_prefix="<{pid}> ")
    distexec.remotecall_fetch(print, pid, "tagged", flush=True)
    wait_until(lambda: f"<{pid}> tagged\n" in _peek(capfd), 10)


def _peek(capfd) -> str:
    return os.pread(capfd._capture.out.tmpfile.fileno(), 1 << 20, 0).decode(errors="replace")


# -- the splitting itself -------------------------------------------------------------------
def test_carriage_returns_are_rendered_as_a_terminal_shows_them():
    assert render("abc\rd") == "dbc"
    assert render("10%\r100%\r") == "100%"
    splitter = LineSplitter()
    assert splitter.feed("half a ") == []
    assert splitter.feed("line\n\r 5%") == [("line", "half a line"), ("progress", " 5%")]
    assert splitter.feed("\r 50%") == [("progress", " 50%")]
    assert splitter.feed("\r100%\r\n") == [("line", "100%")]
    assert splitter.feed("no newline") == []
    assert splitter.close() == [("line", "no newline")]
