"""Heartbeats: a peer that stops talking while its connection stays open (faults W11, M5).

A stopped process (SIGSTOP) keeps its sockets open and its kernel acknowledges our bytes, so
only the application's heartbeats notice it. Budget ``T_hb + 1 s``, with ``T_hb`` the
``DISTEXEC_HEARTBEAT_TIMEOUT`` (2 s here, set before the workers start so they inherit it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

import distexec
from distexec import ProcessExitedException
from tests.helpers import is_gone, wait_gone

pytestmark = pytest.mark.timeout(60)

TIMEOUT = 2.0
"""``T_hb`` in these tests."""
BUDGET = TIMEOUT + 1.0
"""``T_hb + 1 s``: the silence, one heartbeat interval to notice it, and the clean-up."""


@pytest.fixture
def short_heartbeats(monkeypatch):
    monkeypatch.setenv("DISTEXEC_HEARTBEAT_TIMEOUT", str(TIMEOUT))
    monkeypatch.setenv("DISTEXEC_HEARTBEAT_INTERVAL", "0.25")


def _stop_one_of_two_mid_call(add_workers):
    """SIGSTOP one of two new workers during a long call: (stopped id, its OS pid, the other
    id, the call's error, seconds from the stop to the error)."""
    stopped, alive = add_workers(2)
    os_pid = distexec.remotecall_fetch(os.getpid, stopped)
    call = distexec.remotecall(time.sleep, stopped, 30)
    os.kill(os_pid, signal.SIGSTOP)
    start = time.monotonic()
    with pytest.raises(ProcessExitedException) as info:
        call.fetch(timeout=30)
    return stopped, os_pid, alive, info.value, time.monotonic() - start


@pytest.mark.fault("W11")
def test_a_stopped_worker_fails_its_calls_and_is_killed(short_heartbeats, add_workers):
    stopped, os_pid, alive, error, waited = _stop_one_of_two_mid_call(add_workers)
    assert waited < BUDGET
    assert error.worker_id == stopped
    assert "heartbeat" in str(error)
    assert stopped not in distexec.workers()
    wait_gone([os_pid], 5)  # killed, so a SIGCONT cannot bring it back
    assert distexec.remotecall_fetch(distexec.myid, alive) == alive


def test_a_stopped_worker_is_declared_lost_on_time_however_far_apart_the_pings(monkeypatch,
                                                                             add_workers):
    """The silence is checked when it could reach the timeout, not only at the next ping:
    with pings 3.5 s apart, a check at each ping alone would notice up to 3.5 s late."""
    timeout = 4.0
    monkeypatch.setenv("DISTEXEC_HEARTBEAT_TIMEOUT", str(timeout))
    monkeypatch.setenv("DISTEXEC_HEARTBEAT_INTERVAL", "3.5")
    _, os_pid, alive, error, waited = _stop_one_of_two_mid_call(add_workers)
    assert waited < timeout + 1.0
    assert "heartbeat" in str(error)
    wait_gone([os_pid], 5)
    assert distexec.remotecall_fetch(distexec.myid, alive) == alive  # pinged often enough


def test_a_long_quiet_call_is_not_mistaken_for_silence(short_heartbeats, add_workers):
    (pid,) = add_workers(1)
    # The call runs three heartbeat timeouts; the worker's other threads keep answering.
    assert distexec.remotecall_fetch(lambda: time.sleep(3 * TIMEOUT) or "done", pid) == "done"
    assert pid in distexec.workers()


MASTER = textwrap.dedent("""
    import os, sys, time
    import distexec
    pids = distexec.addprocs(2)
    print(*[distexec.remotecall_fetch(os.getpid, p) for p in pids], flush=True)
    sys.stdin.readline()                      # the test stops and resumes us meanwhile
    print(sum(distexec.remotecall_fetch(lambda: 1, p) for p in pids), flush=True)
""")


def _start_master(env_timeout: float):
    env = dict(os.environ, DISTEXEC_HEARTBEAT_TIMEOUT=str(env_timeout),
               DISTEXEC_HEARTBEAT_INTERVAL="0.25")
    master = subprocess.Popen([sys.executable, "-c", MASTER], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    workers = [int(x) for x in master.stdout.readline().split()]
    assert len(workers) == 2
    return master, workers


def _end(master: subprocess.Popen) -> None:
    master.kill()
    master.wait()
    master.stdin.close()
    master.stdout.close()


@pytest.mark.fault("M5")
def test_workers_survive_a_short_stop_of_the_master():
    master, workers = _start_master(TIMEOUT)
    try:
        os.kill(master.pid, signal.SIGSTOP)
        time.sleep(TIMEOUT / 4)  # the stop itself is the scenario: shorter than the timeout
        os.kill(master.pid, signal.SIGCONT)
        master.stdin.write("go\n")
        master.stdin.flush()
        assert master.stdout.readline().strip() == "2"  # both workers answered after the stop
    finally:
        _end(master)
    wait_gone(workers, 10)


@pytest.mark.fault("M5")
def test_workers_leave_a_master_stopped_longer_than_the_timeout():
    master, workers = _start_master(TIMEOUT)
    try:
        os.kill(master.pid, signal.SIGSTOP)
        start = time.monotonic()
        wait_gone(workers, BUDGET)
        assert time.monotonic() - start < BUDGET
    finally:
        os.kill(master.pid, signal.SIGCONT)
        _end(master)
    assert all(not psutil.pid_exists(p) or is_gone(p) for p in workers)


def test_heartbeats_never_reach_a_worker_before_its_join(monkeypatch, add_workers):
    """A worker still joining must see JOIN first: a PING then would make it drop the master."""
    monkeypatch.setenv("DISTEXEC_HEARTBEAT_TIMEOUT", "30")
    monkeypatch.setenv("DISTEXEC_HEARTBEAT_INTERVAL", "0.001")
    for _ in range(3):
        pids = add_workers(3)
        assert [distexec.remotecall_fetch(distexec.myid, p) for p in pids] == pids
