"""Helpers shared by the test suite.

Import them as ``from tests.helpers import wait_until`` (the repository root is on
``sys.path`` through ``pythonpath`` in ``pyproject.toml``). Fixtures live in
``tests/conftest.py``; helpers only one area uses stay in ``tests/<area>/helpers.py``.

Tests never ``sleep`` to let something happen: they wait for the event itself, or poll its
observable effect with :func:`wait_until`, which has a deadline and fails loudly.

Workers import this module by reference when a value defined here travels to them (they share
the master's ``sys.path``), so it imports nothing a worker lacks.
"""

from __future__ import annotations

import concurrent.futures as cf
import math
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import psutil

import distexec
from distexec.runtime.owned import owned_clients

T = TypeVar("T")

DEADLINE = 10.0
"""Default seconds the helpers below give something that must happen."""


# --------------------------------------------------------------------------------------------
# waiting
# --------------------------------------------------------------------------------------------
def wait_until(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.02,
    *,
    message: str | None = None,
) -> T:
    """Return as soon as ``predicate()`` is true; raise ``AssertionError`` after ``timeout`` s.

    Args:
        predicate: called repeatedly, without arguments, until it returns a true value.
        timeout: seconds before giving up.
        interval: seconds between two calls of ``predicate``.
        message: what was being waited for, for the failure message.

    Returns:
        The first true value ``predicate()`` returned.

    Raises:
        AssertionError: ``predicate()`` was still false when the deadline passed.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            what = message or getattr(predicate, "__name__", repr(predicate))
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(min(interval, remaining))


def wait_for_output(capfd, *needles: str, timeout: float = 5.0,
                    message: str | None = None, stream: str = "out",
                    consume: bool = True) -> str:
    """Wait until every one of ``needles`` appeared on the captured stdout (``stream="err"``:
    stderr); return all of it.

    Workers' output reaches the master's stdout and stderr through relay threads, a little
    after the worker printed it. ``capfd.readouterr()`` reads and then truncates its files, so
    a line a relay writes between those two steps would be lost; instead the captured file is
    read without moving its offset (``os.pread``) until the needles are there, and consumed
    once.

    Args:
        capfd: pytest's ``capfd`` fixture of the test.
        needles: substrings that must all appear (a line such as ``"From worker 2:\\thi"``).
        timeout: seconds before giving up.
        message: what was being waited for, for the failure message.
        stream: ``"out"`` (the master's stdout, where workers' stdout goes) or ``"err"``
            (its stderr, where workers' stderr and their log records go).
        consume: False leaves everything captured in place (``readouterr`` consumes both
            streams at once: wait for the other stream's needles first this way).

    Returns:
        What was captured of that stream so far.
    """
    name = {"out": "stdout", "err": "stderr"}[stream]
    fd = getattr(capfd._capture, stream).tmpfile.fileno()  # pytest internals: the file behind it

    def captured() -> str:
        return os.pread(fd, 1 << 24, 0).decode(errors="replace")

    try:
        wait_until(lambda: all(n in captured() for n in needles), timeout,
                   message=message or f"{needles} on the master's {name}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the captured {name} was:\n{captured()}") from None
    return getattr(capfd.readouterr(), stream) if consume else captured()


# --------------------------------------------------------------------------------------------
# background steps
# --------------------------------------------------------------------------------------------
def in_thread(fn, *args, **kwargs) -> cf.Future:
    """Run ``fn`` on a daemon thread; the returned future holds its result or exception.

    The future is marked running once the thread has started, so a test can wait for that.
    """
    future: cf.Future = cf.Future()
    future.set_running_or_notify_cancel()

    def run():
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # the test inspects it
            future.set_exception(exc)

    threading.Thread(target=run, daemon=True, name="test-caller").start()
    return future


class InThread:
    """Run ``fn(*args, **kwargs)`` on a daemon thread; ``done`` is set with ``result`` or ``error``.

    Unlike :func:`in_thread`, ``done`` is a ``threading.Event``: "still blocked" is observed as
    ``not runner.done.wait(BLOCKED)``.
    """

    def __init__(self, fn, *args, **kwargs):
        self.done = threading.Event()
        self.result = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn, args, kwargs), daemon=True)
        self.thread.start()

    def _run(self, fn, args, kwargs):
        try:
            self.result = fn(*args, **kwargs)
        except BaseException as exc:  # the test inspects it
            self.error = exc
        finally:
            self.done.set()

    def join(self):
        """Wait for ``fn`` to finish (deadline :data:`DEADLINE`); re-raise its error or return."""
        assert self.done.wait(DEADLINE), "thread did not finish"
        if self.error is not None:
            raise self.error
        return self.result


# --------------------------------------------------------------------------------------------
# worker processes
# --------------------------------------------------------------------------------------------
def os_pid(pid: int) -> int:
    """The OS process id of worker ``pid``, as the worker itself reports it."""
    return distexec.remotecall_fetch(os.getpid, pid)


def kill_worker(pid: int, sig: int = signal.SIGKILL) -> int:
    """Send ``sig`` to worker ``pid``'s OS process (found by asking it); return that OS pid."""
    target = os_pid(pid)
    os.kill(target, sig)
    return target


def kill_and_wait(pid: int, timeout: float = DEADLINE) -> None:
    """SIGKILL worker ``pid`` and wait until the master has deregistered it."""
    kill_worker(pid)
    wait_until(lambda: pid not in distexec.procs(), timeout, message=f"worker {pid} to leave")


def is_gone(os_pid_: int) -> bool:
    """True once the process has exited (a zombie nobody reaped yet counts as gone)."""
    try:
        return psutil.Process(os_pid_).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(os_pids, timeout: float = DEADLINE) -> None:
    """Wait until every process in ``os_pids`` has exited (see :func:`is_gone`)."""
    wait_until(lambda: all(is_gone(p) for p in os_pids), timeout,
               message=f"worker processes {sorted(os_pids)} to exit")


# --------------------------------------------------------------------------------------------
# owner-side reference tables
# --------------------------------------------------------------------------------------------
TEMPLATE_MODULE = "distexec.cluster.template_server"


def reap(proc) -> None:
    """After a test that ran a master as a subprocess: kill it if it still runs, and close
    its pipes."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            stream.close()


def is_template(proc: psutil.Process) -> bool:
    """Whether ``proc`` is a template process of local workers (distexec.cluster.template)."""
    try:
        return TEMPLATE_MODULE in proc.cmdline()
    except psutil.Error:
        return False


def launcher_of(os_pid_: int) -> int:
    """The process that launched local worker ``os_pid_``: its parent, or, for a worker
    forked from a template, the template's parent."""
    parent = psutil.Process(os_pid_).parent()
    assert parent is not None, f"process {os_pid_} has no parent"
    if is_template(parent):
        grandparent = parent.parent()
        assert grandparent is not None
        return grandparent.pid
    return parent.pid


def local_workers_of(proc: psutil.Process) -> list[int]:
    """OS pids of the processes ``proc`` launched: its children, those of its template
    in place of the template."""
    found = []
    for child in proc.children():
        found += [c.pid for c in child.children()] if is_template(child) else [child.pid]
    return sorted(found)


def owner_clients(pid: int, ref) -> frozenset[int] | None:
    """The client set ``pid`` keeps for ``ref`` (None once freed), asked by id, not by reference.

    Sending the id rather than ``ref`` itself keeps the question from adding a holder.
    """
    rrid = tuple(distexec.remoteref_id(ref))
    return distexec.remotecall_fetch(owned_clients, pid, rrid)


def owns(pid: int, ref) -> bool:
    """Whether ``pid`` still keeps the value behind ``ref``."""
    return owner_clients(pid, ref) is not None


def wait_freed(pid: int, ref, timeout: float = DEADLINE) -> None:
    """Wait until ``pid`` has freed the value behind ``ref``."""
    wait_until(lambda: not owns(pid, ref), timeout, message=f"{ref!r} freed on {pid}")


# --------------------------------------------------------------------------------------------
# values that travel
# --------------------------------------------------------------------------------------------
def new_log() -> distexec.RemoteChannel:
    """A master-owned unbounded RemoteChannel that remote code logs what it did into."""
    return distexec.RemoteChannel(lambda: distexec.Channel(math.inf), 1)


def drain(log: distexec.RemoteChannel) -> list:
    """Take every item ready in ``log`` now, in order."""
    items = []
    while log.isready():
        items.append(log.take())
    return items


pickles: list[int] = []
"""One entry each time a ``PickleCounter`` is pickled on the master (i.e. sent somewhere)."""


class PickleCounter:
    """Counts its own pickling on this process; a closure capturing it counts its shipping."""

    def __reduce__(self):
        pickles.append(1)
        return (PickleCounter, ())


class ZeroCopyBytes(bytearray):
    """A buffer-protocol type that pickles its memory as a PickleBuffer (pickle docs' example)."""

    def __reduce_ex__(self, protocol):
        return type(self)._reconstruct, (pickle.PickleBuffer(self),)

    @classmethod
    def _reconstruct(cls, data):
        with memoryview(data) as view:
            return cls(view)


def assert_terminate_stops_a_sleeping_task(pool, report_then_sleep) -> None:
    """``pool.terminate()`` (a ``distexec.Pool``) ends, within 10 s, the worker process of a
    task that sleeps 60 s, and the task's result raises ``BrokenProcessPool``.

    ``report_then_sleep(channel, seconds)`` runs on a worker: it puts a tuple whose first item
    is its OS pid on ``channel``, then sleeps.
    """
    import pytest
    from concurrent.futures.process import BrokenProcessPool

    started = distexec.RemoteChannel(1, 10)
    sleeping = pool.apply_async(report_then_sleep, (started, 60))
    sleeper = started.take(timeout=15)[0]
    start = time.monotonic()
    pool.terminate()
    wait_gone([sleeper], 10)
    assert time.monotonic() - start < 10
    with pytest.raises(BrokenProcessPool):
        sleeping.get(timeout=10)
