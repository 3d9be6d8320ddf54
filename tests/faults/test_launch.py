"""Launch failures and worker output (spec/faults.md L2-L4).

``addprocs`` through a cluster manager whose launched process never prints its address,
exits at once, or prints junk fails with ``LaunchWorkerError`` and Julia's message within
the worker timeout, and leaves no launched process running: distexec calls the manager's
``kill`` for every worker whose set-up failed, and the default ``kill`` kills a process that
never joined. Once a worker runs, each line it prints reaches the master's stdout as
``      From worker N:\\t<line>``.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

import distexec
from distexec import LaunchWorkerError
from distexec.cluster.manager import ClusterManager, WorkerConfig
from tests.helpers import is_gone, wait_for_output, wait_until

pytestmark = pytest.mark.timeout(60)

WORKER_TIMEOUT = 1.0

NEVER_PRINTS = "import time; time.sleep(60)"
EXITS_AT_ONCE = "print('cannot start: no such thing', flush=True); raise SystemExit(3)"
PRINTS_JUNK = "import time\nfor i in range(1000): print('junk', i, flush=True)\ntime.sleep(60)"


class ScriptManager(ClusterManager):
    """Launches one process running ``code``; records which pids it was asked to kill."""

    def __init__(self, code: str, *, override_kill: bool = True):
        self.code = code
        self.override_kill = override_kill
        self.processes: list[subprocess.Popen] = []
        self.killed: list[int] = []

    def launch(self, params, launched, launch_ntfy) -> None:
        process = subprocess.Popen([sys.executable, "-c", self.code], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.processes.append(process)
        with launch_ntfy:
            launched.append(WorkerConfig(io=process.stdout, process=process))
            launch_ntfy.notify()

    def manage(self, pid, config, op) -> None:
        pass

    def kill(self, pid, config) -> None:
        self.killed.append(pid)
        if self.override_kill:
            config.process.kill()
            config.process.wait()
        else:
            super().kill(pid, config)


@pytest.fixture(autouse=True)
def short_worker_timeout(monkeypatch):
    monkeypatch.setenv("DISTEXEC_WORKER_TIMEOUT", str(WORKER_TIMEOUT))


def _addprocs_fails(manager: ScriptManager) -> tuple[LaunchWorkerError, float]:
    workers_before = distexec.workers()
    started = time.monotonic()
    with pytest.raises(LaunchWorkerError) as info:
        distexec.addprocs(manager)
    elapsed = time.monotonic() - started
    assert distexec.workers() == workers_before
    (process,) = manager.processes
    wait_until(lambda: is_gone(process.pid), 5, message="the launched process to be gone")
    assert len(manager.killed) == 1, "the manager's kill is called for the failed set-up"
    return info.value, elapsed


def test_worker_that_never_prints_its_address_times_out_and_is_killed():
    error, elapsed = _addprocs_fails(ScriptManager(NEVER_PRINTS))
    assert str(error) == "Timed out waiting to read host:port string from worker."
    assert WORKER_TIMEOUT <= elapsed < WORKER_TIMEOUT + 1


def test_default_kill_kills_a_launched_process_that_never_joined():
    manager = ScriptManager(NEVER_PRINTS, override_kill=False)
    error, _elapsed = _addprocs_fails(manager)
    assert str(error) == "Timed out waiting to read host:port string from worker."


def test_launch_command_that_exits_reports_its_status_and_output():
    error, elapsed = _addprocs_fails(ScriptManager(EXITS_AT_ONCE))
    text = str(error)
    assert text.startswith("Unable to read host:port string from worker. "
                           "Launch command exited with error?")
    assert "exit status 3" in text
    assert "cannot start: no such thing" in text
    assert elapsed < 2


def test_launch_command_printing_junk_is_rejected_and_killed():
    error, elapsed = _addprocs_fails(ScriptManager(PRINTS_JUNK))
    assert str(error) == ("Unexpected output from worker launch command. "
                          "Host:port string not found.")
    assert elapsed < 2


def test_bad_exename_raises_launch_worker_error():
    with pytest.raises(LaunchWorkerError, match="/nonexistent/python"):
        distexec.addprocs(1, exename="/nonexistent/python")
    assert distexec.workers() == [1]


def test_local_worker_that_exits_at_once_reports_its_status():
    flags = ["-c", "import sys; print('bad flag', file=sys.stderr); raise SystemExit(3)"]
    with pytest.raises(LaunchWorkerError, match=r"exited with error\? \(exit status 3\)") as info:
        distexec.addprocs(1, exeflags=flags)
    assert "bad flag" in str(info.value)
    assert distexec.workers() == [1]


def test_worker_output_is_relayed_with_its_id(add_workers, capfd):
    pids = add_workers(2)
    for pid in pids:
        distexec.remotecall_fetch(print, pid, f"hello from {pid}", flush=True)
    distexec.remotecall_fetch(lambda: print("to stderr", file=sys.stderr, flush=True), pids[0])
    expected = [f"      From worker {pid}:\thello from {pid}\n" for pid in pids]
    expected.append(f"      From worker {pids[0]}:\tto stderr\n")
    wait_for_output(capfd, *expected, timeout=5)
