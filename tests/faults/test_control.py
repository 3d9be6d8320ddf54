"""Control paths and API semantics (spec/faults.md C1-C5, C8, C9, C13-C15; goals G15, G16).

- C1/G16: ``interrupt`` fails the running calls with ``KeyboardInterrupt`` within 1 s and the
  worker serves on; an idle worker, or one that went on to a new call, is left alone.
- C2/G16: a call that ignores SIGINT or holds the GIL in C code gets its worker terminated
  after the grace (SIGTERM, then SIGKILL), with a log line per step.
- C3: Ctrl-C in a master (a subprocess) during ``pmap`` or ``DistributedExecutor.map``.
- C4/G15: ``shutdown(cancel_futures=True)`` with 1000 queued tasks leaves nothing behind.
- C5: ``shutdown(wait=False)``, then a worker crashes; the interpreter still exits.
- C8, C9: ``pmap`` with and without retries while a worker is killed (G4: every item once in
  the output, re-executions counted).
- C13-C15: ``result(timeout)``, done-callbacks that raise or exit, submit racing shutdown.

Each case asserts its budget: the time from the injection to what the user observes.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import psutil
import pytest

import distexec
from distexec import (
    DistributedExecutor,
    ProcessExitedException,
    RemoteChannel,
    RemoteException,
    WorkerPool,
    pmap,
)
from tests.executor.helpers import sleep_and_return, square
from tests.faults.catalogue import T_DET, T_EXIT
from tests.helpers import drain, kill_worker, new_log, os_pid, wait_gone, wait_until

pytestmark = pytest.mark.timeout(60)

# Functions defined here travel by value, so workers never import this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

ROOT = Path(__file__).resolve().parents[2]
INTERRUPT_BUDGET = 1.0
"""C1: seconds from ``interrupt`` to the interrupted call's error."""
GRACE = 1.0
"""The interrupt grace the C2 tests use (the default, 10 s, would only make them slower)."""


def _assert_serves(pid: int) -> None:
    """P1: the worker answers and computes a small map correctly."""
    assert distexec.remotecall_fetch(lambda xs: [x * 2 for x in xs], pid, range(100)) == [
        x * 2 for x in range(100)]


def _non_daemon_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if not t.daemon and t.is_alive()
            and not t.name.startswith("pytest_timeout")}


# --------------------------------------------------------------------------------------------
# C1: interrupt fails the running calls; the worker serves on
# --------------------------------------------------------------------------------------------
def _spin(started: RemoteChannel) -> None:
    started.put(threading.current_thread() is threading.main_thread())
    while True:
        pass


def _sleep(started: RemoteChannel) -> None:
    started.put(threading.current_thread() is threading.main_thread())
    time.sleep(60)


INTERRUPTIBLE = [
    pytest.param(_spin, 1, id="C1-busy-loop", marks=pytest.mark.fault("C1")),
    pytest.param(_sleep, 1, id="C1-sleep", marks=pytest.mark.fault("C1")),
    # the second call runs on a pool thread (the first holds the main thread): still interrupted
    pytest.param(_spin, 2, id="C1-loop-on-another-thread", marks=pytest.mark.fault("C1")),
]


@pytest.mark.parametrize(("body", "ncalls"), INTERRUPTIBLE)
def test_interrupt_fails_the_running_calls_and_the_worker_serves_on(add_workers, body, ncalls):
    pid, other = add_workers(2)
    process = os_pid(pid)
    started = RemoteChannel(1, ncalls)
    calls = [distexec.remotecall(body, pid, started) for _ in range(ncalls)]
    on_main = [started.take(timeout=10) for _ in calls]
    assert True in on_main and (ncalls == 1 or False in on_main)

    asked = time.monotonic()
    distexec.interrupt(pid)
    done, _ = cf.wait(calls, timeout=INTERRUPT_BUDGET)
    assert len(done) == ncalls, f"still running {INTERRUPT_BUDGET} s after interrupt"
    assert time.monotonic() - asked < INTERRUPT_BUDGET
    for call in calls:
        with pytest.raises(RemoteException) as info:
            call.fetch()
        assert isinstance(info.value.captured.ex, KeyboardInterrupt)
        assert info.value.pid == pid
    assert os_pid(pid) == process and pid in distexec.workers()
    _assert_serves(pid)
    _assert_serves(other)


def _wait_for_log(caplog, text: str, timeout: float) -> logging.LogRecord:
    return wait_until(lambda: next((r for r in caplog.records if text in r.getMessage()), None),
                      timeout, message=f"a log line containing {text!r}")


@pytest.mark.fault("C1")
def test_interrupting_an_idle_worker_changes_nothing(add_workers, caplog):
    caplog.set_level(logging.DEBUG, logger="distexec")
    (pid,) = add_workers(1)
    process = os_pid(pid)
    distexec.interrupt(pid, grace=GRACE)
    # the escalation watch looked after the grace, and found nothing to stop
    _wait_for_log(caplog, f"Worker {pid} stopped its interrupted calls", GRACE + 5)
    assert os_pid(pid) == process and pid in distexec.workers()
    _assert_serves(pid)


@pytest.mark.fault("C1")
def test_a_new_call_after_an_interrupt_outlives_the_grace_unharmed(add_workers, caplog):
    caplog.set_level(logging.DEBUG, logger="distexec")
    (pid,) = add_workers(1)
    started = RemoteChannel(1, 1)
    interrupted = distexec.remotecall(_sleep, pid, started)
    started.take(timeout=10)
    distexec.interrupt(pid, grace=GRACE)
    with pytest.raises(RemoteException):
        interrupted.fetch(timeout=INTERRUPT_BUDGET)
    # the worker went on to a new call that is still running when the grace ends
    later = distexec.remotecall(sleep_and_return, pid, GRACE + 2, "finished")
    _wait_for_log(caplog, f"Worker {pid} stopped its interrupted calls", GRACE + 5)
    assert later.fetch(timeout=10) == "finished"
    assert pid in distexec.workers()


# --------------------------------------------------------------------------------------------
# C2: a call that does not stop: SIGTERM, then SIGKILL
# --------------------------------------------------------------------------------------------
def _ignore_at_c_level(*signums: int) -> None:
    """SIG_IGN through libc: works from any thread, and bypasses Python's own handler."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.signal.restype = ctypes.c_void_p
    for signum in signums:
        assert libc.signal(signum, ctypes.c_void_p(1)) != ctypes.c_void_p(-1).value


def _announce(flag: str) -> None:
    """Create the file ``flag``: the call is where the test waits for it to be."""
    os.close(os.open(flag, os.O_CREAT | os.O_WRONLY))


def _spin_ignoring_sigint(flag: str) -> None:
    _ignore_at_c_level(signal.SIGINT)
    _announce(flag)
    while True:
        pass


def _spin_ignoring_sigint_and_sigterm(flag: str) -> None:
    _ignore_at_c_level(signal.SIGINT, signal.SIGTERM)
    _announce(flag)
    while True:
        pass


def _hold_the_gil_forever(flag: str) -> None:
    """Block in C without releasing the GIL: lock a pthread mutex twice through PyDLL.

    A signal does not end the wait (futex waits restart), and no other Python thread of the
    worker -- the connection's reader included -- can run. The announcement is a local file,
    not a message, so only a few bytecodes separate it from the C call: an interrupt sent
    after it finds the worker stuck.
    """
    import ctypes
    lock = ctypes.PyDLL(None).pthread_mutex_lock
    mutex = ctypes.create_string_buffer(64)  # all zeros: PTHREAD_MUTEX_INITIALIZER (glibc)
    lock(mutex)
    _announce(flag)
    lock(mutex)


SIGTERM_STEP = "sending SIGTERM"
SIGKILL_STEP = "ignored SIGTERM, sending SIGKILL"

STUBBORN = [
    pytest.param(_spin_ignoring_sigint, "keyword", signal.SIGTERM, [SIGTERM_STEP],
                 id="C2-sigint-ignored", marks=pytest.mark.fault("C2")),
    pytest.param(_spin_ignoring_sigint, "environment", signal.SIGTERM, [SIGTERM_STEP],
                 id="C2-sigint-ignored-grace-from-env", marks=pytest.mark.fault("C2")),
    pytest.param(_hold_the_gil_forever, "keyword", signal.SIGTERM, [SIGTERM_STEP],
                 id="C2-c-code-holding-the-gil", marks=pytest.mark.fault("C2")),
    pytest.param(_spin_ignoring_sigint_and_sigterm, "keyword", signal.SIGKILL,
                 [SIGTERM_STEP, SIGKILL_STEP], id="C2-sigterm-ignored-too",
                 marks=pytest.mark.fault("C2")),
]


@pytest.mark.parametrize(("body", "grace_from", "killed_by", "steps"), STUBBORN)
def test_a_call_that_ignores_interrupt_gets_its_worker_terminated_after_the_grace(
        add_workers, caplog, monkeypatch, tmp_path, body, grace_from, killed_by, steps):
    caplog.set_level(logging.WARNING, logger="distexec")
    victim, survivor = add_workers(2)
    victim_process = os_pid(victim)
    flag = tmp_path / "started"
    stubborn = distexec.remotecall(body, victim, str(flag))
    wait_until(flag.exists, 10, message="the stubborn call to start")
    bystander = distexec.remotecall(sleep_and_return, survivor, 0.5, "unaffected")

    asked = time.monotonic()
    if grace_from == "environment":
        monkeypatch.setenv("DISTEXEC_INTERRUPT_GRACE", str(GRACE))
        distexec.interrupt(victim)
    else:
        distexec.interrupt(victim, grace=GRACE)
    error = stubborn.exception(timeout=GRACE + T_DET + 5)
    took = time.monotonic() - asked

    assert isinstance(error, ProcessExitedException), repr(error)
    assert error.worker_id == victim and error.signal == killed_by
    assert "interrupt" in str(error)
    assert took < GRACE + T_DET, f"terminated {took:.2f} s after interrupt"
    assert took >= GRACE
    messages = [r.getMessage() for r in caplog.records if r.name == "distexec"]
    for step in steps:
        assert any(f"Worker {victim}" in m and step in m for m in messages), (step, messages)
    wait_gone([victim_process], T_DET)
    assert victim not in distexec.workers()
    assert bystander.fetch(timeout=10) == "unaffected"
    _assert_serves(survivor)


@pytest.mark.parametrize("grace", [-1, float("nan"), "10", True])
def test_interrupt_rejects_a_bad_grace(add_workers, grace):
    (pid,) = add_workers(1)
    with pytest.raises(ValueError, match="grace"):
        distexec.interrupt(pid, grace=grace)


def test_interrupt_rejects_a_bad_grace_in_the_environment(add_workers, monkeypatch):
    (pid,) = add_workers(1)
    monkeypatch.setenv("DISTEXEC_INTERRUPT_GRACE", "soon")
    with pytest.raises(ValueError, match="DISTEXEC_INTERRUPT_GRACE"):
        distexec.interrupt(pid)


# --------------------------------------------------------------------------------------------
# C3: Ctrl-C in the master during pmap / executor.map (a master of its own, in a subprocess)
# --------------------------------------------------------------------------------------------
CTRL_C_MASTER = r'''
import json, math, os, signal, sys, threading, time
import distexec as d

signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal-started python has
mode = sys.argv[1]
log = d.RemoteChannel(lambda: d.Channel(math.inf), 1)

def item(x):
    log.put(("start", x, time.monotonic()))
    time.sleep(0.2)
    log.put(("done", x, time.monotonic()))
    return x

entries, lock = [], threading.Lock()

def collect():
    announced = False
    while True:
        entry = log.take()
        with lock:
            entries.append(entry)
            started = sum(e[0] == "start" for e in entries)
        if started >= 6 and not announced:
            announced = True
            print("PROGRESS", flush=True)

pids = d.addprocs(2)
print("WORKERS", json.dumps([d.remotecall_fetch(os.getpid, p) for p in pids]), flush=True)
before = {t for t in threading.enumerate() if not t.daemon}
threading.Thread(target=collect, daemon=True).start()
executor = d.DistributedExecutor(pool=d.WorkerPool(pids)) if mode == "executor" else None
try:
    if executor is None:
        d.pmap(item, range(1000))
    else:
        list(executor.map(item, range(1000)))
    print("NOT INTERRUPTED", flush=True)
    sys.exit(1)
except KeyboardInterrupt:
    interrupted_at = time.monotonic()
    print("INTERRUPTED", flush=True)

# Quiescence: nothing of the first map may run any more.
deadline = time.monotonic() + 10
if executor is None:
    while any(t.name == "distexec-pmap" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "pmap threads still running"
        time.sleep(0.01)
else:
    executor.shutdown(wait=True)  # its own queue was cancelled; waits for the running tasks
while True:  # the collector may still be receiving the last entries
    with lock:
        done = {e[1] for e in entries if e[0] == "done"}
        started = {e[1]: e[2] for e in entries if e[0] == "start"}
    if set(started) <= done or time.monotonic() > deadline:
        break
    time.sleep(0.01)
second = (d.pmap(lambda x: 2 * x, range(100)) if executor is None else
          list(d.DistributedExecutor(pool=d.WorkerPool(pids)).map(lambda x: 2 * x, range(100))))
threads = [t.name for t in threading.enumerate() if not t.daemon and t not in before]
report = {
    "started": len(started),
    "started_after_interrupt": sum(t > interrupted_at for t in started.values()),
    "started_late": sum(t > interrupted_at + 0.5 for t in started.values()),
    "unfinished": sorted(set(started) - done),
    "second_ok": second == [2 * x for x in range(100)],
    "pmap_threads": [t.name for t in threading.enumerate() if t.name == "distexec-pmap"],
    "new_threads": threads,
    "workers": [d.remotecall_fetch(os.getpid, p) for p in pids],
}
print("REPORT", json.dumps(report), flush=True)
'''


def _next_line(process: subprocess.Popen, prefix: str, timeout: float) -> tuple[str, float]:
    """The next stdout line of ``process`` starting with ``prefix``, and when it was read."""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                raise AssertionError(f"no {prefix!r} line from the master within {timeout} s")
            line = process.stdout.readline().decode()
            if not line:
                raise AssertionError(f"the master exited before printing {prefix!r}")
            if line.startswith(prefix):
                return line[len(prefix):].strip(), time.monotonic()


# in flight when Ctrl-C comes: pmap holds each worker for one item, the executor two
CTRL_C = [
    pytest.param("pmap", 2, id="C3-pmap", marks=pytest.mark.fault("C3")),
    pytest.param("executor", 4, id="C3-executor-map", marks=pytest.mark.fault("C3")),
]


@pytest.mark.parametrize(("mode", "in_flight"), CTRL_C)
def test_ctrl_c_in_the_master_during_a_map(tmp_path, mode, in_flight):
    script = tmp_path / "master.py"
    script.write_text(CTRL_C_MASTER)
    errors = (tmp_path / "stderr").open("wb")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                  os.environ.get("PYTHONPATH")]))}
    # Its own session, like a shell's foreground job: the Ctrl-C goes to its process group.
    master = subprocess.Popen([sys.executable, str(script), mode], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=errors, start_new_session=True)
    try:
        workers = json.loads(_next_line(master, "WORKERS", 60)[0])
        assert all(os.getsid(w) != os.getsid(master.pid) for w in workers)
        _next_line(master, "PROGRESS", 30)
        pressed = time.monotonic()
        os.killpg(master.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        _, left_at = _next_line(master, "INTERRUPTED", 10)
        report = json.loads(_next_line(master, "REPORT", 40)[0])
        assert master.wait(timeout=20) == 0
    except BaseException:
        master.kill()
        master.wait()
        raise AssertionError((tmp_path / "stderr").read_text()[-3000:]) from None
    finally:
        master.stdout.close()
        errors.close()
    assert left_at - pressed < 1.0, f"{mode} left {left_at - pressed:.2f} s after Ctrl-C"
    assert report["started"] < 100  # it stopped early: 1000 items would take 100 s
    assert report["started_after_interrupt"] <= in_flight, report  # only what was on its way
    assert report["started_late"] == 0, report
    assert report["unfinished"] == [], report  # the workers saw no SIGINT: items ran through
    assert report["workers"] == workers  # the same processes serve on
    assert report["second_ok"], report
    assert report["pmap_threads"] == [] and report["new_threads"] == [], report
    wait_gone(workers)


# --------------------------------------------------------------------------------------------
# C4 / G15: shutdown(wait=True, cancel_futures=True) with 1000 queued tasks
# --------------------------------------------------------------------------------------------
@pytest.mark.fault("C4")
def test_shutdown_cancelling_1000_queued_tasks_leaves_nothing_behind():
    me = psutil.Process()
    fds_before = me.num_fds()
    threads_before = _non_daemon_threads()
    task = 0.3
    ex = DistributedExecutor(2)
    processes = [os_pid(p) for p in ex.workers()]
    futures = [ex.submit(sleep_and_return, task, i) for i in range(1000)]
    wait_until(lambda: futures[0].running(), 10, message="the first task to be dispatched")

    asked = time.monotonic()
    ex.shutdown(wait=True, cancel_futures=True)
    assert time.monotonic() - asked < task + T_EXIT
    assert all(f.done() for f in futures)
    finished = [f for f in futures if not f.cancelled()]
    assert len(finished) <= 4  # two per worker were dispatched; the rest never started
    for future in finished:
        assert future.result(timeout=0) == futures.index(future)
    for future in futures:
        if future.cancelled():
            with pytest.raises(cf.CancelledError):
                future.result(timeout=0)
    with pytest.raises(RuntimeError, match=r"^cannot schedule new futures after shutdown$"):
        ex.submit(square, 1)
    wait_gone(processes, max(0.1, asked + task + T_EXIT - time.monotonic()))
    connections = getattr(me, "net_connections", None) or me.connections  # psutil < 6
    assert not any(c.status == psutil.CONN_LISTEN for c in connections(kind="all"))
    assert _non_daemon_threads() <= threads_before
    wait_until(lambda: me.num_fds() <= fds_before, T_EXIT,
               message=f"the master's fds back to {fds_before} (now {me.num_fds()})")


# --------------------------------------------------------------------------------------------
# C5: shutdown(wait=False), then a worker segfaults
# --------------------------------------------------------------------------------------------
def _segfault_when_told(started: RemoteChannel, gate: RemoteChannel) -> None:
    import faulthandler
    started.put("waiting")
    gate.take()
    faulthandler.disable()  # keep the test's output clean
    faulthandler._sigsegv()


@pytest.mark.fault("C5")
def test_a_crash_after_shutdown_without_wait_fails_its_future_and_the_shutdown_ends():
    ex = DistributedExecutor(2)
    processes = [os_pid(p) for p in ex.workers()]
    started, gate = RemoteChannel(1, 1), RemoteChannel(1, 1)
    doomed = ex.submit(_segfault_when_told, started, gate)
    fine = ex.submit(sleep_and_return, 0.2, "fine")
    started.take(timeout=10)
    ex.shutdown(wait=False)

    crashed_at = time.monotonic()
    gate.put("now")
    error = doomed.exception(timeout=5)
    assert time.monotonic() - crashed_at < 5
    assert isinstance(error, ProcessExitedException) and error.signal == signal.SIGSEGV
    assert fine.result(timeout=5) == "fine"
    wait_until(lambda: not any(t.name == "distexec-shutdown" for t in threading.enumerate()),
               max(0.1, crashed_at + 5 - time.monotonic()), message="the shutdown thread to end")
    wait_gone(processes, 5)


C5_MASTER = r'''
import faulthandler, os, sys
import distexec as d

def crash(gate):
    gate.take()
    faulthandler.disable()
    faulthandler._sigsegv()

ex = d.DistributedExecutor(2)
print(*[d.remotecall_fetch(os.getpid, p) for p in ex.workers()], flush=True)
gate = d.RemoteChannel(1, 1)
doomed = ex.submit(crash, gate)
ex.shutdown(wait=False)
gate.put("now")
print(type(doomed.exception(timeout=5)).__name__, flush=True)
# and now the interpreter exits, with the shutdown still finishing in the background
'''


@pytest.mark.fault("C5")
def test_the_interpreter_exits_after_shutdown_without_wait_and_a_crash(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                  os.environ.get("PYTHONPATH")]))}
    master = subprocess.Popen([sys.executable, "-c", C5_MASTER], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        workers = [int(w) for w in _next_line(master, "", 60)[0].split()]
        outcome, crashed_at = _next_line(master, "", 10)
        assert outcome == "ProcessExitedException"
        assert master.wait(timeout=5) == 0
        assert time.monotonic() - crashed_at < 5
    finally:
        master.kill()
        master.wait()
        master.stdout.close()
    wait_gone(workers, 5)


# --------------------------------------------------------------------------------------------
# C8, C9: pmap while a worker is killed (G4: each item exactly once in the output)
# --------------------------------------------------------------------------------------------
def _blocks_on(victim: int, log: RemoteChannel, started: RemoteChannel, gate: RemoteChannel):
    """``x -> x * x``; every execution is logged; on ``victim`` it reports and waits."""
    def fn(x):
        log.put(x)
        if distexec.myid() == victim:
            started.put(x)
            gate.take()
        return x * x
    return fn


class _PmapRun:
    """``pmap(fn, items, **options)`` on a thread, with the moment it returned or raised."""

    def __init__(self, fn, items, **options):
        self.ended_at = None
        self.value = self.error = None
        self.thread = threading.Thread(target=self._run, args=(fn, items, options), daemon=True)
        self.thread.start()

    def _run(self, fn, items, options):
        try:
            self.value = pmap(fn, items, **options)
        except BaseException as exc:  # the test inspects it
            self.error = exc
        self.ended_at = time.monotonic()

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"pmap did not return within {timeout} s"


POOLS = [
    pytest.param(False, id="C8-pmap-own-pool", marks=pytest.mark.fault("C8")),
    pytest.param(True, id="C8-worker-pool", marks=pytest.mark.fault("C8")),
]


@pytest.mark.parametrize("explicit_pool", POOLS)
def test_pmap_retries_a_killed_workers_item_and_gives_the_sequential_result(
        no_workers, add_workers, caplog, explicit_pool):
    caplog.set_level(logging.WARNING, logger="distexec")
    pids = add_workers(4)
    victim = pids[1]
    log, started, gate = new_log(), RemoteChannel(1, 1), RemoteChannel(1, 1)
    options = {"retry_delays": [0.1] * 3}
    pool = WorkerPool(pids) if explicit_pool else None
    if pool is not None:
        options["pool"] = pool
    run = _PmapRun(_blocks_on(victim, log, started, gate), range(200), **options)
    held = started.take(timeout=10)  # the victim holds an item...
    killed_at = time.monotonic()
    kill_worker(victim)  # ...and dies with it
    run.join(10 + 5)
    assert run.error is None, repr(run.error)
    assert run.ended_at - killed_at < 10
    assert run.value == [x * x for x in range(200)]
    executions = drain(log)
    assert sorted(set(executions)) == list(range(200))
    reexecuted = len(executions) - 200
    assert executions.count(held) >= 2 and 1 <= reexecuted <= 3
    print(f"C8: {reexecuted} re-execution(s) of 200 items")
    assert victim not in distexec.workers()
    if pool is not None:
        assert victim not in pool.workers()
    assert any("Retrying" in r.getMessage() and "ProcessExitedException" in r.getMessage()
               for r in caplog.records)
    for pid in pids:
        if pid != victim:
            _assert_serves(pid)


def _record_handled(calls: list):
    def on_error(exc):
        calls.append((time.monotonic(), exc))
        return ("handled", type(exc).__name__)
    return on_error


NO_RETRY = [
    pytest.param(False, id="C9-raises", marks=pytest.mark.fault("C9")),
    pytest.param(True, id="C9-on-error", marks=pytest.mark.fault("C9")),
]


@pytest.mark.parametrize("with_handler", NO_RETRY)
def test_pmap_without_retries_reports_a_killed_worker(no_workers, add_workers, with_handler):
    survivor, victim = add_workers(2)
    log, started, gate = new_log(), RemoteChannel(1, 1), RemoteChannel(1, 1)
    handled: list = []
    options = {"on_error": _record_handled(handled)} if with_handler else {}
    run = _PmapRun(_blocks_on(victim, log, started, gate), range(50), **options)
    held = started.take(timeout=10)
    killed_at = time.monotonic()
    kill_worker(victim)
    run.join(T_DET + 10)
    if with_handler:
        assert run.error is None, repr(run.error)
        assert [t for t, _ in handled][0] - killed_at < T_DET
        assert [type(e) for _, e in handled] == [ProcessExitedException]
        assert handled[0][1].worker_id == victim
        expected = [x * x for x in range(50)]
        expected[held] = ("handled", "ProcessExitedException")
        assert run.value == expected
    else:
        assert run.ended_at - killed_at < T_DET
        assert isinstance(run.error, ProcessExitedException) and run.error.worker_id == victim
    _assert_serves(survivor)


# --------------------------------------------------------------------------------------------
# C13: result(timeout=0.1) on a long task
# --------------------------------------------------------------------------------------------
def _submit_long(ex: DistributedExecutor, pid: int):
    return ex.submit(sleep_and_return, 1.0, "late")


def _remotecall_long(ex: DistributedExecutor, pid: int):
    return distexec.remotecall(sleep_and_return, pid, 1.0, "late")


FUTURES = [
    pytest.param(_submit_long, id="C13-executor-future", marks=pytest.mark.fault("C13")),
    pytest.param(_remotecall_long, id="C13-remotecall-future", marks=pytest.mark.fault("C13")),
]


@pytest.fixture(scope="module")
def control_executor():
    ex = DistributedExecutor(2)
    yield ex
    ex.shutdown(wait=True)


@pytest.mark.parametrize("start", FUTURES)
def test_result_timeout_raises_and_the_task_runs_on(control_executor, start):
    future = start(control_executor, control_executor.workers()[0])
    asked = time.monotonic()
    with pytest.raises(TimeoutError):
        future.result(timeout=0.1)
    assert time.monotonic() - asked < 0.2
    assert not future.done()
    assert future.result(timeout=10) == "late"


# --------------------------------------------------------------------------------------------
# C14: a done-callback raises or exits
# --------------------------------------------------------------------------------------------
def _raise(_future):
    raise RuntimeError("callback failed")


def _exit(_future):
    sys.exit(3)


CALLBACKS = [
    pytest.param(_submit_long, _raise, RuntimeError, id="C14-executor-raises",
                 marks=pytest.mark.fault("C14")),
    pytest.param(_submit_long, _exit, SystemExit, id="C14-executor-sys-exit",
                 marks=pytest.mark.fault("C14")),
    pytest.param(_remotecall_long, _raise, RuntimeError, id="C14-remotecall-raises",
                 marks=pytest.mark.fault("C14")),
    pytest.param(_remotecall_long, _exit, SystemExit, id="C14-remotecall-sys-exit",
                 marks=pytest.mark.fault("C14")),
]


@pytest.mark.parametrize(("start", "callback", "raised"), CALLBACKS)
def test_a_failing_done_callback_is_logged_and_everything_goes_on(control_executor, caplog,
                                                                  start, callback, raised):
    caplog.set_level(logging.ERROR, logger="concurrent.futures")
    workers = control_executor.workers()
    future = start(control_executor, workers[0])
    future.add_done_callback(callback)  # added before completion: runs where it completes
    assert future.result(timeout=10) == "late"
    record = _wait_for_log(caplog, "exception calling callback", 10)
    assert isinstance(record.exc_info[1], raised)
    assert control_executor.workers() == workers
    assert list(control_executor.map(square, range(20))) == [x * x for x in range(20)]
    for pid in workers:
        _assert_serves(pid)


# --------------------------------------------------------------------------------------------
# C15: submit racing shutdown from 8 threads
# --------------------------------------------------------------------------------------------
@pytest.mark.fault("C15")
def test_submits_racing_shutdown_either_resolve_or_raise():
    ex = DistributedExecutor(2)
    accepted: list[tuple[int, cf.Future]] = []
    refused: list[BaseException] = []
    others: list[BaseException] = []
    go = threading.Barrier(9)

    def submitter(tid: int) -> None:
        go.wait()
        for i in range(1_000_000):
            value = tid * 1_000_000 + i
            try:
                accepted.append((value, ex.submit(square, value)))
            except RuntimeError as exc:
                refused.append(exc)
                return
            except BaseException as exc:  # reported by the assertions below
                others.append(exc)
                return

    threads = [threading.Thread(target=submitter, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    go.wait()
    wait_until(lambda: len(accepted) >= 100, 10, message="some submits to get in")
    asked = time.monotonic()
    ex.shutdown(wait=True)
    assert time.monotonic() - asked < 5
    for thread in threads:
        thread.join(5)
        assert not thread.is_alive()
    assert not others
    assert len(refused) == 8
    assert all(str(exc) == "cannot schedule new futures after shutdown" for exc in refused)
    assert all(future.done() for _, future in accepted)  # none stuck
    assert all(future.result(timeout=0) == value * value for value, future in accepted)
