"""Process lifetime: no worker outlives its master (spec/faults.md M1, M2, M4, L5).

The master runs as a subprocess script that prints its workers' OS pids; the test then kills
it or lets it end, and watches the worker processes with psutil. A worker started by hand
that no master ever connects to exits on its own after the worker timeout.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import is_gone, wait_gone

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
ORPHAN_BUDGET = 5.0
"""Seconds within which every worker must be gone once its master is (spec G5)."""

MASTER = """
import builtins, os, sys, time
import distexec

def spin():
    builtins.spinning = True
    while True:
        pass

def spinning():
    return getattr(builtins, "spinning", False)

def hold_the_gil(flag):
    import re
    open(flag, "w").close()
    # Catastrophic backtracking: minutes inside the C regex engine, which never releases
    # the GIL, so no Python thread of this worker (reader, stdin lifeline) can run.
    re.match(r"(a+)+$", "a" * 64 + "b")

pids = distexec.addprocs(int(sys.argv[4]))
os_pids = [distexec.remotecall_fetch(os.getpid, p) for p in pids]
if sys.argv[1] == "busy":
    for p in pids:
        distexec.remotecall(spin, p)
    for p in pids:
        while not distexec.remotecall_fetch(spinning, p):
            time.sleep(0.01)
elif sys.argv[1] == "gil":
    flags = [os.path.join(sys.argv[3], str(p)) for p in pids]
    for p, flag in zip(pids, flags):
        distexec.remotecall(hold_the_gil, p, flag)
    while not all(os.path.exists(flag) for flag in flags):
        time.sleep(0.01)
print(*os_pids, flush=True)
if sys.argv[2] == "wait":
    time.sleep(60)  # until the test kills us
"""


def _env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def _read_line(process: subprocess.Popen, timeout: float) -> str:
    """The next stdout line of ``process``, or fail after ``timeout`` seconds."""
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise AssertionError(f"no output from {process.args} within {timeout} s")
    return process.stdout.readline().decode()


def _start_master(state: str, ending: str, tmp_path, n: int) -> subprocess.Popen:
    """A master with ``n`` workers in ``state`` (idle, busy, gil) that exits or waits."""
    return subprocess.Popen([sys.executable, "-c", MASTER, state, ending, str(tmp_path), str(n)],
                            cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)


def _worker_pids(master: subprocess.Popen, n: int) -> list[int]:
    line = _read_line(master, timeout=30)
    os_pids = [int(word) for word in line.split()]
    assert len(os_pids) == n, line
    return os_pids


def _assert_all_gone(os_pids: list[int]) -> None:
    try:
        wait_gone(os_pids, ORPHAN_BUDGET)
    finally:
        for p in os_pids:  # never leave an orphan behind for the next test
            if not is_gone(p):
                os.kill(p, signal.SIGKILL)


@pytest.mark.parametrize(("state", "n"), [
    pytest.param("busy", 4, id="M1-4-busy-in-python", marks=pytest.mark.fault("M1")),
    pytest.param("gil", 2, id="M2-holding-the-gil-in-c", marks=pytest.mark.fault("M2")),
])
def test_workers_exit_when_their_master_is_sigkilled(state, n, tmp_path):
    master = _start_master(state, "wait", tmp_path, n)
    try:
        os_pids = _worker_pids(master, n)
        assert not any(is_gone(p) for p in os_pids)
        master.kill()
        master.wait()
    finally:
        master.kill()
        master.stdout.close()
        master.wait()
    _assert_all_gone(os_pids)


@pytest.mark.fault("M4")
@pytest.mark.parametrize("state", ["idle", "busy"])
def test_workers_exit_when_their_master_exits_without_rmprocs(state, tmp_path):
    master = _start_master(state, "exit", tmp_path, 2)
    try:
        os_pids = _worker_pids(master, 2)
        assert master.wait(timeout=20) == 0
    finally:
        master.kill()
        master.stdout.close()
        master.wait()
    _assert_all_gone(os_pids)


@pytest.mark.fault("L5")
def test_worker_that_no_master_connects_to_exits_on_its_own():
    timeout = 1.0
    worker = subprocess.Popen([sys.executable, "-m", "distexec", "worker"], cwd=ROOT,
                              env=_env(DISTEXEC_WORKER_TIMEOUT=str(timeout)),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
    try:
        worker.stdin.write(b"a-cookie-nobody-will-ever-use-0123456789\n")
        worker.stdin.close()
        address = _read_line(worker, timeout=30)
        listening_at = time.monotonic()
        assert re.fullmatch(r"distexec_worker:\d+#127\.0\.0\.1\n", address), address
        worker.wait(timeout=timeout + 5)
        elapsed = time.monotonic() - listening_at
        rest = worker.stdout.read()
    finally:
        worker.kill()
        worker.wait()
        worker.stdout.close()
    assert worker.returncode == 1
    assert timeout - 0.2 <= elapsed < timeout + 1
    # The worker's stderr goes to its stdout (as in Julia), so that is where to look.
    assert re.search(r"Master process \(id 1\) could not connect within 1(\.0)? seconds\.\n"
                     r"exiting\.", rest.decode()), rest
