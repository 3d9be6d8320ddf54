"""Interpreter exit with a live DistributedExecutor: CPython's three subprocess tests.

CPython's ``ExecutorShutdownTest`` starts ``python -c "from concurrent.futures import <name>"``
for these, so ``compat/`` skips them; here they are with ``from distexec import
DistributedExecutor``. Each script prints its workers' OS pids, and every test checks that
none of those processes outlives the script:

* exiting with a pending task runs it (its output appears) and exits cleanly;
* ``submit`` from an ``atexit`` hook raises ``RuntimeError('cannot schedule new futures after
  interpreter shutdown')``;
* ``shutdown(wait=False)`` then exit does not hang, and the task's output appears (gh-83386).
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers import wait_gone

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]

PRELUDE = """
import os
import sys
import time

import distexec
from distexec import DistributedExecutor


def sleep_and_print(t, msg):
    time.sleep(t)
    print(msg)
    sys.stdout.flush()


def print_worker_pids(executor):
    pids = [distexec.remotecall_fetch(os.getpid, p) for p in executor.workers()]
    print("WORKER_PIDS", *pids, flush=True)
"""

APPLE_LINE = re.compile(r"^\s*From worker \d+:\s+apple$", re.MULTILINE)


def _run(body: str) -> subprocess.CompletedProcess:
    script = textwrap.dedent(PRELUDE) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


def _worker_pids(stdout: str) -> list[int]:
    (line,) = [ln for ln in stdout.splitlines() if ln.startswith("WORKER_PIDS")]
    pids = [int(p) for p in line.split()[1:]]
    assert pids
    return pids


def test_interpreter_shutdown_runs_the_pending_task():
    proc = _run("""
        if __name__ == "__main__":
            t = DistributedExecutor(5)
            print_worker_pids(t)
            t.submit(sleep_and_print, 1.0, "apple")
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert APPLE_LINE.search(proc.stdout), proc.stdout
    assert len(_worker_pids(proc.stdout)) == 5
    wait_gone(_worker_pids(proc.stdout))


def test_submit_from_an_atexit_hook_raises():
    proc = _run("""
        import atexit

        @atexit.register
        def run_last():
            try:
                t.submit(id, None)
            except RuntimeError:
                print("runtime-error")
                raise

        if __name__ == "__main__":
            t = DistributedExecutor(5)
            print_worker_pids(t)
            t.submit(id, 42).result()
    """)
    assert proc.returncode == 0, proc.stderr  # errors in atexit hooks keep the exit code
    assert ("RuntimeError: cannot schedule new futures after interpreter shutdown"
            in proc.stderr), proc.stderr
    assert proc.stdout.splitlines()[-1] == "runtime-error"
    wait_gone(_worker_pids(proc.stdout))


def test_shutdown_without_wait_then_exit_does_not_hang():
    proc = _run("""
        if __name__ == "__main__":
            t = DistributedExecutor(max_workers=3)
            print_worker_pids(t)
            t.submit(sleep_and_print, 1.0, "apple")
            t.shutdown(wait=False)
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert APPLE_LINE.search(proc.stdout), proc.stdout
    wait_gone(_worker_pids(proc.stdout))
