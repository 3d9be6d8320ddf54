"""Worker death (spec/faults.md W1-W10, C6, C7, C11, C12).

A worker that dies in the middle of a call -- killed, exiting, crashing, out of memory -- fails
exactly the callers that were waiting on it with ``ProcessExitedException`` carrying its id and
how it died, within ``T_det``; the other workers keep serving, the dead id leaves
``workers()``, and every later call to it fails at once. An exception that would end a
process (``SystemExit``, ``MemoryError``) ends only the call. ``CASES`` is the table of ways a
call can end its worker (or not), each with its expected outcome and budget.

``rmprocs`` of a busy worker fails its running calls, and a worker that ignores the request to
exit is terminated, then killed, with a log line for each step.
"""

from __future__ import annotations

import concurrent.futures as cf
import gc
import logging
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import BrokenExecutor
from typing import NamedTuple

import psutil
import pytest

import distexec
from distexec import (AllWorkersExited, DistributedExecutor, ProcessExitedException, RemoteChannel,
                      RemoteException)
from distexec import Future as RemoteFuture
from tests.faults.catalogue import T_DET, T_EXIT
from tests.faults.helpers import (
    MemoryWatchdog,
    TcpLinkedLocalManager,
    bytes_received_from,
    grow_memory,
    kill,
    sleep_marked,
    wait_until_running,
)
from tests.helpers import in_thread, is_gone, os_pid, wait_for_output, wait_gone, wait_until

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20
GiB = 1 << 30


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
# The table: a call on the victim, what the test does to its process meanwhile (if anything),
# and the outcome: the worker dies (Dies) or only the call fails (Fails).
# --------------------------------------------------------------------------------------------
class Fault(NamedTuple):
    call: Callable
    args: tuple = ()
    from_outside: Callable[[int, int], float] | None = None
    """(victim pid, its OS pid) -> the moment of injection; runs while the call is running."""


class Dies(NamedTuple):
    """The worker dies: every call on it fails with this ProcessExitedException."""

    signal: int | None = None
    exitcode: int | None = None

    worker_survives = False

    def check(self, exc: BaseException, victim: int) -> None:
        _assert_exited(exc, victim, signal_=self.signal, exitcode=self.exitcode)
        text = str(exc)
        assert f"Worker {victim} has exited" in text
        if self.signal is not None:
            name = signal.Signals(self.signal).name
            assert f"{name}(-{self.signal})" in text, text
        else:
            assert f"exit code {self.exitcode}" in text, text
        if self.signal == signal.SIGKILL:
            assert "killed by SIGKILL(-9)" in text, text
            # Killed from user space (no OOM kill in the kernel log or the memory cgroup):
            # nothing about memory (tests/unit/test_oom.py has the kernel's kills)
            assert "memory" not in text, text


class Fails(NamedTuple):
    """Only the call fails, with ``type`` (``code`` for SystemExit); the worker serves on."""

    type: type
    code: int | None = None

    worker_survives = True

    def check(self, exc: BaseException, victim: int) -> None:
        assert isinstance(exc, RemoteException), repr(exc)
        assert exc.pid == victim
        assert type(exc.ex) is self.type, repr(exc.ex)
        if self.code is not None:
            assert exc.ex.code == self.code


def _sigkill_once_running(victim: int, victim_os_pid: int) -> float:
    wait_until_running(victim, "fault_call")
    kill(victim_os_pid, signal.SIGKILL)
    return time.monotonic()


def _exit_zero():
    os._exit(0)


def _sys_exit_3():
    import sys
    sys.exit(3)


def _segfault_ctypes():
    import ctypes
    return ctypes.string_at(0)


def _abort():
    os.abort()


def _allocate_over_an_address_space_limit():
    """Cap this process's address space 512 MiB above its current size, then ask for 4 GiB.

    The limit stays: the worker must serve its next calls under it.
    """
    import resource
    with open("/proc/self/statm") as statm:
        size = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (size + 512 * MiB, hard))
    return len(bytearray(4 * GiB))


def _oom_killer(victim: int, victim_os_pid: int) -> float:
    """The kernel's OOM killer, simulated: SIGKILL once the worker holds 256 MiB more."""
    rss = psutil.Process(victim_os_pid).memory_info().rss
    with MemoryWatchdog(victim_os_pid, rss + 256 * MiB) as watchdog:
        assert watchdog.killed.wait(30), "the worker never grew past the watchdog's limit"
        return watchdog.killed_at


CASES = [
    pytest.param(Fault(sleep_marked, ("fault_call", 30), _sigkill_once_running),
                 Dies(signal=signal.SIGKILL), T_DET, id="W1-sigkill",
                 marks=pytest.mark.fault("W1")),
    pytest.param(Fault(_exit_zero), Dies(exitcode=0), T_DET, id="W2-os._exit(0)",
                 marks=pytest.mark.fault("W2")),
    pytest.param(Fault(_sys_exit_3), Fails(SystemExit, code=3), 1.0, id="W3-sys.exit(3)",
                 marks=pytest.mark.fault("W3")),
    pytest.param(Fault(_segfault_ctypes), Dies(signal=signal.SIGSEGV), T_DET, id="W4-segfault",
                 marks=pytest.mark.fault("W4")),
    pytest.param(Fault(_abort), Dies(signal=signal.SIGABRT), T_DET, id="W5-abort",
                 marks=pytest.mark.fault("W5")),
    pytest.param(Fault(_allocate_over_an_address_space_limit), Fails(MemoryError), 5.0,
                 id="W6a-MemoryError-under-RLIMIT_AS", marks=pytest.mark.fault("W6a")),
    pytest.param(Fault(grow_memory, (32 * MiB, 2 * GiB), _oom_killer),
                 Dies(signal=signal.SIGKILL), T_DET, id="W6b-oom-killer-sigkill",
                 marks=pytest.mark.fault("W6b")),
]


@pytest.mark.parametrize(("fault", "outcome", "budget"), CASES)
def test_a_fault_mid_call_fails_only_the_calls_it_touches(add_workers, fault, outcome, budget):
    victim, survivor = add_workers(2)
    victim_os_pid = os_pid(victim)
    bystander = distexec.remotecall(sleep_marked, victim, "bystander", 30)  # also on the victim
    elsewhere = distexec.remotecall(lambda: time.sleep(0.5) or "survived", survivor)
    wait_until_running(victim, "bystander")

    injected_at = time.monotonic()
    caller = in_thread(distexec.remotecall_fetch, fault.call, victim, *fault.args)
    if fault.from_outside is not None:
        injected_at = fault.from_outside(victim, victim_os_pid)
    error = caller.exception(timeout=30)
    outcome.check(error, victim)
    if outcome.worker_survives:
        elapsed = time.monotonic() - injected_at
        assert not bystander.done(), "the worker's other call still runs"
        assert victim in distexec.workers()
        _assert_survivor_works(victim)
    else:
        outcome.check(bystander.exception(timeout=budget), victim)
        elapsed = time.monotonic() - injected_at
        assert victim not in distexec.workers()
        assert is_gone(victim_os_pid)
        started = time.monotonic()
        with pytest.raises(ProcessExitedException) as later:
            distexec.remotecall_fetch(os.getpid, victim)
        assert time.monotonic() - started < 0.5
        outcome.check(later.value, victim)
    assert elapsed < budget, f"{elapsed:.2f} s from the fault to its callers' errors"
    assert elsewhere.fetch(timeout=10) == "survived"
    assert survivor in distexec.workers()
    _assert_survivor_works(survivor)


@pytest.mark.fault("W1")
def test_every_kind_of_call_to_a_killed_worker_fails_at_once(add_workers):
    victim, _survivor = add_workers(2)
    victim_os_pid = os_pid(victim)
    kill(victim_os_pid, signal.SIGKILL)
    wait_until(lambda: victim not in distexec.workers(), T_DET,
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


def _segfault_with_faulthandler():
    import faulthandler
    faulthandler.enable()  # so the C-level traceback reaches the worker's output
    faulthandler._sigsegv()


@pytest.mark.fault("W4")
def test_segfault_traceback_is_relayed_to_the_master_output(add_workers, capfd):
    victim, _survivor = add_workers(2)
    with pytest.raises(ProcessExitedException):
        distexec.remotecall_fetch(_segfault_with_faulthandler, victim)
    expected = f"      From worker {victim}:\tFatal Python error: Segmentation fault"
    wait_for_output(capfd, expected, timeout=5, stream="err",
                    message="the worker's fatal error on the master's stderr")


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


@pytest.mark.fault("W7")
def test_crash_in_del_after_the_result_was_sent(add_workers):
    victim, survivor = add_workers(2)
    assert isinstance(distexec.remotecall_fetch(_make_crasher, victim), CrashAtGCInWorker)
    started = time.monotonic()
    with pytest.raises(ProcessExitedException) as info:
        distexec.remotecall_fetch(os.getpid, victim)
    assert time.monotonic() - started < T_DET
    _assert_exited(info.value, victim, exitcode=1)
    _assert_survivor_works(survivor)


# --------------------------------------------------------------------------------------------
# W8: killed while sending a 1 GiB result
# --------------------------------------------------------------------------------------------
def _huge_result(size: int) -> bytes:
    return b"\x01" * size


@pytest.mark.slow
@pytest.mark.fault("W8")
@pytest.mark.timeout(120)
def test_a_worker_killed_while_sending_a_huge_result(add_workers):
    victim, survivor = add_workers(TcpLinkedLocalManager(2))  # TCP: see bytes_received_from
    sender = os_pid(victim)
    master = psutil.Process()
    gc.collect()
    rss_before = master.memory_info().rss
    received_before = bytes_received_from(victim)

    caller = in_thread(distexec.remotecall_fetch, _huge_result, victim, GiB)
    # Mid-send: a quarter of the result has reached the master, not all of it.
    wait_until(lambda: bytes_received_from(victim) - received_before > GiB // 4, 60,
               interval=0.001, message="the worker to start sending its result")
    received = bytes_received_from(victim) - received_before
    kill(sender, signal.SIGKILL)
    killed_at = time.monotonic()
    assert received < GiB, "the whole result had arrived before the kill"
    assert master.memory_info().rss > rss_before + GiB // 4  # the partial frame, held
    error = caller.exception(timeout=30)
    elapsed = time.monotonic() - killed_at

    _assert_exited(error, victim, signal_=signal.SIGKILL)  # no partial object delivered
    assert elapsed < T_DET
    del caller, error
    gc.collect()
    # The master read part of the frame into a buffer; it is freed with the connection.
    wait_until(lambda: master.memory_info().rss < rss_before * 1.1, 10,
               message=f"master RSS back within 10 % of {rss_before >> 20} MiB")
    _assert_survivor_works(survivor)


# --------------------------------------------------------------------------------------------
# W9: crash races -- n workers each SIGKILL a peer at the same moment
# --------------------------------------------------------------------------------------------
RACE_BUDGET = 10.0


def _kill_peer_when_told(ready: str, go: str, peer_os_pid: int) -> str:
    """Runs on a worker: say it is ready, wait for the go, SIGKILL the peer."""
    import time as time_
    open(ready, "w").close()
    while not os.path.exists(go):
        time_.sleep(0.001)
    os.kill(peer_os_pid, signal.SIGKILL)
    return "killed"


@pytest.mark.parametrize("n", [
    pytest.param(n, id=f"W9-{n}-workers", marks=pytest.mark.fault("W9")) for n in (1, 2, 5, 13)
])
def test_crash_races_workers_killing_each_other(add_workers, tmp_path, n):
    racers = add_workers(n)
    os_pids = {p: os_pid(p) for p in racers}
    go = tmp_path / "go"
    calls = {}
    for i, pid in enumerate(racers):
        peer = racers[(i + 1) % n]  # n == 1: the worker kills itself
        calls[pid] = distexec.remotecall(_kill_peer_when_told, pid, str(tmp_path / f"ready{i}"),
                                         str(go), os_pids[peer])
    wait_until(lambda: all((tmp_path / f"ready{i}").exists() for i in range(n)), 30,
               message="every racer to be ready")

    go.touch()
    started = time.monotonic()
    done, not_done = cf.wait(calls.values(), timeout=RACE_BUDGET)
    assert not not_done, f"{len(not_done)} calls still pending after {RACE_BUDGET} s"
    dead = set()
    for pid, call in calls.items():
        error = call.exception(timeout=0)
        if error is None:
            assert call.result() == "killed"
        else:
            _assert_exited(error, pid, signal_=signal.SIGKILL)
            dead.add(pid)
    wait_until(lambda: not dead & set(distexec.workers()), RACE_BUDGET,
               message="the dead to leave workers()")
    assert time.monotonic() - started < RACE_BUDGET
    assert dead, "the first kill always lands"
    assert dead == {p for p in racers if is_gone(os_pids[p])}
    for pid in set(racers) - dead:
        _assert_survivor_works(pid)
    (fresh,) = add_workers(1)  # the cluster still grows
    _assert_survivor_works(fresh)


# --------------------------------------------------------------------------------------------
# W10: every worker killed with 1000 tasks queued
# --------------------------------------------------------------------------------------------
@pytest.mark.fault("W10")
def test_killing_every_worker_with_1000_tasks_queued_fails_them_all(no_workers):
    """Workers the executor did not launch (pool=) are not replaced, so nothing is left to run
    the queue; an executor's own workers are replaced (W10 below)."""
    executor = DistributedExecutor(pool=distexec.WorkerPool(distexec.addprocs(2)))
    try:
        workers = executor.workers()
        os_pids = [os_pid(p) for p in workers]
        futures = [executor.submit(sleep_marked, "w10", 30) for _ in range(1000)]
        for pid in workers:
            wait_until_running(pid, "w10")

        for target in os_pids:
            kill(target, signal.SIGKILL)
        killed_at = time.monotonic()
        done, not_done = cf.wait(futures, timeout=T_DET)
        elapsed = time.monotonic() - killed_at
        assert not not_done, f"{len(not_done)} of 1000 futures still pending after {T_DET} s"
        assert elapsed < T_DET

        errors = [f.exception() for f in futures]
        assert all(isinstance(e, ProcessExitedException) for e in errors), {
            type(e).__name__ for e in errors}
        assert {e.worker_id for e in errors} <= set(workers)
        assert all(e.signal == signal.SIGKILL for e in errors)
        # The tasks never sent anywhere broke the executor: AllWorkersExited, a BrokenExecutor
        # too (as every ProcessExitedException is, being a BrokenProcessPool).
        assert all(isinstance(e, BrokenExecutor) for e in errors)
        never_sent = [e for e in errors if isinstance(e, AllWorkersExited)]
        assert len(never_sent) >= 1000 - 2 * len(workers)
        assert str(never_sent[0]).startswith("All workers of this executor have exited; the last: "
                                             "Worker ")
        assert executor.workers() == []
        assert len(executor.pool) == 0
        with pytest.raises(BrokenExecutor):
            executor.submit(os.getpid)
    finally:
        started = time.monotonic()
        executor.shutdown(wait=True)
        assert time.monotonic() - started < T_EXIT
    wait_gone(os_pids, T_DET)


@pytest.mark.fault("W10")
def test_killing_every_worker_of_an_executor_with_1000_tasks_queued_replaces_them(no_workers):
    """The executor's own workers come back; only the tasks they were running fail."""
    with DistributedExecutor(2) as executor:
        workers = executor.workers()
        os_pids = [os_pid(p) for p in workers]
        futures = [executor.submit(sleep_marked, "w10b", 0.005) for _ in range(1000)]
        for target in os_pids:
            kill(target, signal.SIGKILL)
        done, not_done = cf.wait(futures, timeout=T_DET + 30)
        assert not not_done, f"{len(not_done)} of 1000 futures still pending"
        errors = [f.exception() for f in futures if f.exception() is not None]
        assert all(isinstance(e, ProcessExitedException) and e.worker_id in workers
                   for e in errors), errors[:3]
        assert len(errors) < len(futures)  # the rest ran on the replacements
        assert len(executor.workers()) == 2 and not set(executor.workers()) & set(workers)
    wait_gone(os_pids, T_DET)


# --------------------------------------------------------------------------------------------
# C11, C12: channels and futures owned by a worker that dies
# --------------------------------------------------------------------------------------------
@pytest.mark.fault("C11", "C12")
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
    _assert_exited(taking.exception(timeout=T_DET), owner, signal_=signal.SIGKILL)
    _assert_exited(fetching.exception(timeout=T_DET), owner, signal_=signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(ProcessExitedException) as put_error:
        channel.put(1)
    assert time.monotonic() - started < T_DET
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
@pytest.mark.fault("C6")
def test_rmprocs_of_a_busy_worker_fails_its_running_calls(add_workers):
    victim, survivor = add_workers(2)
    pending = distexec.remotecall(sleep_marked, victim, "c6_future", 30)
    fetching = in_thread(distexec.remotecall_fetch, sleep_marked, victim, "c6_fetch", 30)
    wait_until_running(victim, "c6_future")
    wait_until_running(victim, "c6_fetch")

    started = time.monotonic()
    distexec.rmprocs(victim, waitfor=T_EXIT)
    assert time.monotonic() - started < T_EXIT
    assert victim not in distexec.procs()
    for exc in (fetching.exception(timeout=T_DET), pending.exception(timeout=T_DET)):
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

    import distexec.cluster.manager as manager
    manager.exit_worker = lambda code=0: None
    # libc's signal(), not the signal module's: the call may run on any of the worker's
    # threads, and only the main thread may use signal.signal().
    libc = ctypes.CDLL(None, use_errno=True)
    libc.signal.restype = ctypes.c_void_p
    sig_ign = ctypes.c_void_p(1)
    assert libc.signal(signal.SIGTERM, sig_ign) != ctypes.c_void_p(-1).value


@pytest.mark.fault("C7")
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
    assert 0.9 <= elapsed < 5  # two escalation steps of exit_timeout (0.5 s) each, then SIGKILL
    messages = [r.getMessage() for r in caplog.records if r.name == "distexec"]
    assert f"Failed to gracefully kill worker {stubborn}, sending SIGTERM" in messages
    assert f"Worker {stubborn} ignored SIGTERM, sending SIGKILL" in messages


@pytest.mark.fault("C7")
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
    # distexec's own SIGKILL is no sign of memory trouble
    assert str(info.value) == f"Worker {stubborn} has exited (killed by SIGKILL(-9))."
