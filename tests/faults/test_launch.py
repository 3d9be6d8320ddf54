"""Launch failures and worker output (spec/faults.md L1-L4, L6).

``addprocs`` through a cluster manager whose launched process never prints its address,
exits at once, or prints junk fails with ``LaunchWorkerError`` and Julia's message within
the worker timeout, and leaves no launched process running: distexec calls the manager's
``kill`` for every worker whose set-up failed, and the default ``kill`` kills a process that
never joined. An SSH host that cannot be reached fails within ssh's ConnectTimeout while the
other hosts of the call come up (a fake ``ssh`` stands in for the network; tests/managers/
test_ssh.py does the same against real sshd servers), and a pre-started worker with another
cookie is refused with ``AuthenticationError`` naming its address. Once a worker runs, each
line it prints reaches the master's stdout as ``      From worker N:\\t<line>``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import distexec
from distexec import AuthenticationError, LaunchWorkerError, SSHManager
from distexec.cluster.manager import ClusterManager, WorkerConfig
from tests.helpers import is_gone, wait_for_output, wait_until

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
WORKER_TIMEOUT = 1.0

NEVER_PRINTS = "import time; time.sleep(60)"
EXITS_AT_ONCE = "print('cannot start: no such thing', flush=True); raise SystemExit(3)"
PRINTS_JUNK = "import time\nfor i in range(1001): print('junk', i, flush=True)\ntime.sleep(60)"
LAUNCH_BUDGET = 2.0
"""Seconds for a launch that fails at once (exit, junk, wrong cookie) to raise (L3, L4, L6)."""


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


@pytest.mark.fault("L2")
def test_worker_that_never_prints_its_address_times_out_and_is_killed():
    error, elapsed = _addprocs_fails(ScriptManager(NEVER_PRINTS))
    assert str(error) == "Timed out waiting to read host:port string from worker."
    assert WORKER_TIMEOUT <= elapsed < WORKER_TIMEOUT + 1


@pytest.mark.fault("L2")
def test_default_kill_kills_a_launched_process_that_never_joined():
    manager = ScriptManager(NEVER_PRINTS, override_kill=False)
    error, elapsed = _addprocs_fails(manager)
    assert str(error) == "Timed out waiting to read host:port string from worker."
    assert WORKER_TIMEOUT <= elapsed < WORKER_TIMEOUT + 1


@pytest.mark.fault("L4")
def test_launch_command_that_exits_reports_its_status_and_output():
    error, elapsed = _addprocs_fails(ScriptManager(EXITS_AT_ONCE))
    text = str(error)
    assert text.startswith("Unable to read host:port string from worker. "
                           "Launch command exited with error?")
    assert "exit status 3" in text
    assert "cannot start: no such thing" in text
    assert elapsed < LAUNCH_BUDGET


@pytest.mark.fault("L3")
def test_launch_command_printing_1001_junk_lines_is_rejected_and_killed():
    error, elapsed = _addprocs_fails(ScriptManager(PRINTS_JUNK))
    assert str(error) == ("Unexpected output from worker launch command. "
                          "Host:port string not found.")
    assert elapsed < LAUNCH_BUDGET


@pytest.mark.fault("L4")
def test_bad_exename_raises_launch_worker_error():
    started = time.monotonic()
    with pytest.raises(LaunchWorkerError, match="/nonexistent/python"):
        distexec.addprocs(1, exename="/nonexistent/python")
    assert time.monotonic() - started < LAUNCH_BUDGET
    assert distexec.workers() == [1]


@pytest.mark.fault("L4")
def test_local_worker_that_exits_at_once_reports_its_status():
    flags = ["-c", "import sys; print('bad flag', file=sys.stderr); raise SystemExit(3)"]
    started = time.monotonic()
    with pytest.raises(LaunchWorkerError, match=r"exited with error\? \(exit status 3\)") as info:
        distexec.addprocs(1, exeflags=flags)
    assert time.monotonic() - started < LAUNCH_BUDGET
    assert "bad flag" in str(info.value)
    assert distexec.workers() == [1]


# --------------------------------------------------------------------------------------------
# L1: an SSH host that cannot be reached, next to one that can
# --------------------------------------------------------------------------------------------
UNREACHABLE = "unreachable.invalid"
CONNECT_TIMEOUT = 2

FAKE_SSH = """#!{python}
# A stand-in for ssh. Host {unreachable}: nothing answers, so after ConnectTimeout seconds
# fail as ssh does (exit status 255). Any other host is this machine: run the remote command
# under sh here, as sshd would there, with stdin (the cookie, then the lifeline) passed on.
import os, sys, time
args, i, connect_timeout = sys.argv[1:], 0, None
while args[i].startswith("-"):
    if args[i] in ("-o", "-p", "-F", "-i", "-l"):
        name, _, value = args[i + 1].partition("=")
        if args[i] == "-o" and name == "ConnectTimeout" and connect_timeout is None:
            connect_timeout = float(value)  # ssh keeps the first value given
        i += 2
    else:
        i += 1
host, command = args[i], " ".join(args[i + 1:])
if host.rpartition("@")[2] == "{unreachable}":
    time.sleep(connect_timeout)
    print(f"ssh: connect to host {{host}} port 22: Connection timed out", file=sys.stderr)
    sys.exit(255)
os.environ["SSH_CONNECTION"] = "127.0.0.1 50000 127.0.0.1 22"
os.execvp("sh", ["sh", "-c", command])
"""


@pytest.fixture
def fake_ssh(tmp_path, monkeypatch) -> str:
    # The worker timeout must exceed ConnectTimeout, as it does by default (60 s and 10 s).
    monkeypatch.setenv("DISTEXEC_WORKER_TIMEOUT", str(5 * CONNECT_TIMEOUT))
    path = tmp_path / "ssh"
    path.write_text(FAKE_SSH.format(python=sys.executable, unreachable=UNREACHABLE))
    path.chmod(0o755)
    return str(path)


@pytest.mark.fault("L1")
def test_an_unreachable_ssh_host_fails_within_connect_timeout_and_the_other_comes_up(
        fake_ssh, no_workers):
    manager = SSHManager([UNREACHABLE, "localhost"])
    started = time.monotonic()
    try:
        with pytest.raises(LaunchWorkerError) as info:
            distexec.addprocs(manager, ssh=fake_ssh, dir=str(ROOT),
                              sshflags=["-o", f"ConnectTimeout={CONNECT_TIMEOUT}"])
        elapsed = time.monotonic() - started
        text = str(info.value)
        assert text.startswith("Unable to read host:port string from worker. "
                               "Launch command exited with error? (exit status 255)"), text
        assert f"ssh: connect to host {UNREACHABLE} port 22: Connection timed out" in text
        assert elapsed < CONNECT_TIMEOUT + 2, f"{elapsed:.1f} s"
        (pid,) = distexec.workers()  # the reachable host's worker came up and stays
        assert distexec.remotecall_fetch(distexec.myid, pid) == pid
    finally:
        left = [p for p in distexec.procs() if p != 1]
        if left:
            distexec.rmprocs(left, waitfor=20)


# --------------------------------------------------------------------------------------------
# L6: the master has the wrong cookie for a pre-started worker
# --------------------------------------------------------------------------------------------
class PreStartedManager(ClusterManager):
    """Hands over a worker someone else started, by its address (no process of ours)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port

    def launch(self, params, launched, launch_ntfy) -> None:
        with launch_ntfy:
            launched.append(WorkerConfig(host=self.host, port=self.port))
            launch_ntfy.notify()

    def manage(self, pid, config, op) -> None:
        pass


@pytest.mark.fault("L6")
def test_a_pre_started_worker_with_another_cookie_is_refused_by_address():
    worker = subprocess.Popen([sys.executable, "-m", "distexec", "worker"], cwd=ROOT,
                              env={**os.environ, "DISTEXEC_WORKER_TIMEOUT": "30"},
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
    try:
        worker.stdin.write(b"the-cookie-of-another-cluster-0123456789abcdef\n")
        worker.stdin.flush()
        address = worker.stdout.readline().decode()
        match = re.fullmatch(r"distexec_worker:(\d+)#(127\.0\.0\.1)\n", address)
        assert match, address
        port, host = int(match.group(1)), match.group(2)

        started = time.monotonic()
        with pytest.raises(AuthenticationError) as info:
            distexec.addprocs(PreStartedManager(host, port))
        assert time.monotonic() - started < LAUNCH_BUDGET
        assert f"{host}:{port}" in str(info.value)
        assert distexec.workers() == [1]
        assert worker.poll() is None, "the refused worker is not ours to end; it serves on"
    finally:
        worker.kill()
        worker.wait()
        worker.stdin.close()
        worker.stdout.close()


def test_worker_output_is_relayed_with_its_id(add_workers, capfd):
    pids = add_workers(2)
    for pid in pids:
        distexec.remotecall_fetch(print, pid, f"hello from {pid}", flush=True)
    distexec.remotecall_fetch(lambda: print("to stderr", file=sys.stderr, flush=True), pids[0])
    expected = [f"      From worker {pid}:\thello from {pid}\n" for pid in pids]
    out = wait_for_output(capfd, *expected, timeout=5, consume=False)
    err = wait_for_output(capfd, f"      From worker {pids[0]}:\tto stderr\n", stream="err")
    assert "to stderr" not in out and "hello" not in err
