"""Worker death (spec/faults.md W1, W2, W4, W5, W7, C6, C7, C11, C12).

A worker that dies in the middle of a call -- killed, exiting, crashing -- fails exactly the
callers that were waiting on it with ``ProcessExitedException`` carrying its id and how it
died, within ``T_det``; the other workers keep serving, the dead id leaves ``workers()``, and
every later call to it fails at once. ``rmprocs`` of a busy worker fails its running calls,
and a worker that ignores the request to exit is terminated, then killed, with a log line
for each step.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import signal
import time

import pytest

import distexec
from distexec import Future as RemoteFuture
from distexec import ProcessExitedException, RemoteChannel
from tests.faults.helpers import DEATH_BUDGET, kill, sleep_marked, wait_until_running
from tests.helpers import in_thread, is_gone, os_pid, wait_for_output, wait_until

pytestmark = pytest.mark.timeout(60)


def _assert_survivor_works(pid: int) -> None:
    """P1: a surviving worker answers and computes a small map correctly."""
    assert distexec.remotecall_fetch(lambda xs: [x * 2 for x in xs], pid, range(100)) == [
        x * 2 for x in range(100)]


def _assert_exited(exc: BaseException, pid: int, *, signal_=None, exitcode=None) -> None:
    assert isinstance(exc, ProcessExitedException), repr(exc)
    assert exc.worker_id == pid
    assert exc.signal == signal_
    assert exc.exitcode == exitcode


# --------------------------------------------------------------------------------------------
# W1: SIGKILL mid-call
# --------------------------------------------------------------------------------------------
def test_sigkill_mid_call_fails_its_callers_and_spares_the_other_worker(add_workers):
    victim, survivor = add_workers(2)
    victim_os_pid = os_pid(victim)
    pending = distexec.remotecall(sleep_marked, victim, "w1_future", 30)
    fetching = in_thread(distexec.remotecall_fetch, sleep_marked, victim, "w1_fetch", 30)
    other = distexec.remotecall(lambda: time.sleep(0.5) or "survived", survivor)
    wait_until_running(victim, "w1_future")
    wait_until_running(victim, "w1_fetch")

    killed_at = time.monotonic()
    kill(victim_os_pid, signal.SIGKILL)
    done, not_done = cf.wait([pending], timeout=DEATH_BUDGET)
    assert pending in done and not not_done
    exc = fetching.exception(timeout=DEATH_BUDGET)
    assert time.monotonic() - killed_at < DEATH_BUDGET

    _assert_exited(exc, victim, signal_=signal.SIGKILL)
    _assert_exited(pending.exception(), victim, signal_=signal.SIGKILL)
    with pytest.raises(ProcessExitedException):
        pending.result()
    assert other.result(timeout=10) == "survived"
    assert victim not in distexec.workers()
    assert survivor in distexec.workers()
    _assert_survivor_works(survivor)


def test_calls_to_a_killed_worker_fail_at_once(add_workers):
    victim, _survivor = add_workers(2)
    victim_os_pid = os_pid(victim)
    kill(victim_os_pid, signal.SIGKILL)
    wait_until(lambda: victim not in distexec.workers(), DEATH_BUDGET,
               message="the killed worker to leave workers()")

    started = time.monotonic()
    with pytest.raises(ProcessExitedException) as fetch_error:
        distexec.remotecall_fetch(os.getpid, victim)
    with pytest.raises(ProcessExitedException) as call_error:
        distexec.remotecall(os.getpid, victim)
    with pytest.raises(ProcessExitedException):
        distexec.remote_do(os.getpid, victim)
    assert time.monotonic() - started < 0.5
    _assert_exited(fetch_error.value, victim, signal_=signal.SIGKILL)
    _assert_exited(call_error.value, victim, signal_=signal.SIGKILL)
    assert "SIGKILL(-9)" in str(fetch_error.value)


# --------------------------------------------------------------------------------------------
# W2, W4, W5: the call itself ends the process
# --------------------------------------------------------------------------------------------
def _exit_zero():
    os._exit(0)


def _segfault():
    import faulthandler
    faulthandler.enable()  # so the C-level traceback reaches the worker's output
    faulthandler._sigsegv()


def _abort():
    os.abort()


@pytest.mark.parametrize(("crash", "signal_", "exitcode"), [
    pytest.param(_exit_zero, None, 0, id="W2-os._exit(0)"),
    pytest.param(_segfault, signal.SIGSEGV, None, id="W4-segfault"),
    pytest.param(_abort, signal.SIGABRT, None, id="W5-abort"),
])
def test_a_call_that_ends_its_process_raises_process_exited(add_workers, crash, signal_, exitcode):
    victim, survivor = add_workers(2)
    pending = distexec.remotecall(time.sleep, victim, 30)

    started = time.monotonic()
    with pytest.raises(ProcessExitedException) as info:
        distexec.remotecall_fetch(crash, victim)
    assert time.monotonic() - started < DEATH_BUDGET
    _assert_exited(info.value, victim, signal_=signal_, exitcode=exitcode)
    _assert_exited(pending.exception(timeout=DEATH_BUDGET), victim, signal_=signal_,
                   exitcode=exitcode)
    assert distexec.workers() == [survivor]
    _assert_survivor_works(survivor)


def test_segfault_traceback_is_relayed_to_the_master_output(add_workers, capfd):
    victim, _survivor = add_workers(2)
    with pytest.raises(ProcessExitedException):
        distexec.remotecall_fetch(_segfault, victim)
    expected = f"      From worker {victim}:\tFatal Python error: Segmentation fault"
    wait_for_output(capfd, expected, timeout=5,
                    message="the worker's fatal error on the master's stdout")


# --------------------------------------------------------------------------------------------
# W7: a crash while collecting garbage, after the result was sent
# --------------------------------------------------------------------------------------------
class CrashAtGCInWorker:
    """Ends the worker process when collected there (never on the master)."""

    def __del__(self):
        import distexec as d
        if d.myid() != 1:
            os._exit(1)


def _make_crasher():
    return CrashAtGCInWorker()


def test_crash_in_del_after_the_result_was_sent(add_workers):
    victim, survivor = add_workers(2)
    assert isinstance(distexec.remotecall_fetch(_make_crasher, victim), CrashAtGCInWorker)
    with pytest.raises(ProcessExitedException) as info:
        distexec.remotecall_fetch(os.getpid, victim)
    _assert_exited(info.value, victim, exitcode=1)
    _assert_survivor_works(survivor)


# --------------------------------------------------------------------------------------------
# C11, C12: channels and futures owned by a worker that dies
# --------------------------------------------------------------------------------------------
def test_waiters_on_a_dead_owners_channel_and_future_wake(add_workers):
    owner, survivor = add_workers(2)
    owner_os_pid = os_pid(owner)
    channel = RemoteChannel(owner)
    future = RemoteFuture(owner)
    taking = in_thread(channel.take)
    fetching = in_thread(future.fetch)
    # Both requests must have reached the owner before it dies: the owner counts the
    # calls blocked on its channel and future.
    wait_until(lambda: distexec.remotecall_fetch(_blocked_calls, owner) >= 2, 5,
               message="take and fetch to block on the owner")

    kill(owner_os_pid, signal.SIGKILL)
    _assert_exited(taking.exception(timeout=DEATH_BUDGET), owner, signal_=signal.SIGKILL)
    _assert_exited(fetching.exception(timeout=DEATH_BUDGET), owner, signal_=signal.SIGKILL)
    with pytest.raises(ProcessExitedException) as put_error:
        channel.put(1)
    _assert_exited(put_error.value, owner, signal_=signal.SIGKILL)
    _assert_survivor_works(survivor)


def _blocked_calls() -> int:
    """Runs on a worker: how many of its threads wait inside a channel or future operation."""
    import sys
    count = 0
    for frame in sys._current_frames().values():
        while frame is not None:
            if frame.f_code.co_name in ("_channel_op", "_fetch_future"):
                count += 1
                break
            frame = frame.f_back
    return count


# --------------------------------------------------------------------------------------------
# C6, C7: rmprocs while busy, and a worker that will not exit
# --------------------------------------------------------------------------------------------
def test_rmprocs_of_a_busy_worker_fails_its_running_calls(add_workers):
    victim, survivor = add_workers(2)
    pending = distexec.remotecall(sleep_marked, victim, "c6_future", 30)
    fetching = in_thread(distexec.remotecall_fetch, sleep_marked, victim, "c6_fetch", 30)
    wait_until_running(victim, "c6_future")
    wait_until_running(victim, "c6_fetch")

    started = time.monotonic()
    distexec.rmprocs(victim, waitfor=5)
    assert time.monotonic() - started < 5
    assert victim not in distexec.procs()
    for exc in (fetching.exception(timeout=DEATH_BUDGET), pending.exception(timeout=DEATH_BUDGET)):
        assert isinstance(exc, ProcessExitedException)
        assert exc.worker_id == victim
    _assert_survivor_works(survivor)
    (new,) = distexec.addprocs(1)
    try:
        assert new > victim  # ids are never reused
    finally:
        distexec.rmprocs(new, waitfor=20)


def _refuse_to_exit():
    """Runs on a worker: ignore the master's exit request and SIGTERM."""
    import ctypes

    import distexec.cluster.worker as worker
    worker.exit_worker = lambda code=0: None
    # libc's signal(), not the signal module's: the call may run on any of the worker's
    # threads, and only the main thread may use signal.signal().
    libc = ctypes.CDLL(None, use_errno=True)
    libc.signal.restype = ctypes.c_void_p
    sig_ign = ctypes.c_void_p(1)
    assert libc.signal(signal.SIGTERM, sig_ign) != ctypes.c_void_p(-1).value


def test_rmprocs_escalates_to_sigterm_then_sigkill(add_workers, caplog):
    (stubborn,) = add_workers(1, exit_timeout=0.5)
    stubborn_os_pid = os_pid(stubborn)
    distexec.remotecall_fetch(_refuse_to_exit, stubborn)

    caplog.set_level(logging.WARNING, logger="distexec")
    started = time.monotonic()
    distexec.rmprocs(stubborn, waitfor=10)
    elapsed = time.monotonic() - started

    assert stubborn not in distexec.procs()
    assert is_gone(stubborn_os_pid)
    assert 0.9 <= elapsed < 5  # two escalation steps of exit_timeout each
    messages = [r.getMessage() for r in caplog.records if r.name == "distexec"]
    assert f"Failed to gracefully kill worker {stubborn}, sending SIGTERM" in messages
    assert f"Worker {stubborn} ignored SIGTERM, sending SIGKILL" in messages


def test_rmprocs_waitfor_returns_in_time_and_the_escalation_goes_on(add_workers):
    (stubborn,) = add_workers(1, exit_timeout=0.5)
    stubborn_os_pid = os_pid(stubborn)
    distexec.remotecall_fetch(_refuse_to_exit, stubborn)

    started = time.monotonic()
    with pytest.raises(distexec.DistributedError, match="not terminated after 0.2 seconds"):
        distexec.rmprocs(stubborn, waitfor=0.2)
    assert time.monotonic() - started < 0.5
    wait_until(lambda: is_gone(stubborn_os_pid), 5, message="the escalation to kill the worker")
    with pytest.raises(ProcessExitedException) as info:
        distexec.remotecall_fetch(os.getpid, stubborn)
    assert info.value.signal == signal.SIGKILL
