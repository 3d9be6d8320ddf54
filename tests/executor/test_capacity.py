"""Keeping an executor whole: replacements, crash loops, bad initializers, stopping, callbacks.

ProcessPoolExecutor breaks the whole pool when one worker dies; here only the dead worker's
tasks fail (with ``ProcessExitedException``, which is also a ``BrokenProcessPool``) and a
replacement restores the capacity. What cannot go on (a failing initializer, workers that
keep dying) breaks the executor with ``BrokenDistributedExecutor``, a ``BrokenProcessPool``.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import threading
import time
from concurrent.futures.process import BrokenProcessPool

import pytest

import distexec
from distexec import BrokenDistributedExecutor, DistributedExecutor, ProcessExitedException
from distexec.executor_workers import MAX_REPLACEMENTS
from tests.executor.helpers import (exit_now, fail_initializer, initialized_in, mark_initialized,
                                    sleep_and_return)
from tests.helpers import is_gone, kill_worker, os_pid, wait_until

pytestmark = pytest.mark.timeout(90)


def test_killing_a_worker_restores_two_workers_with_the_initializer():
    with DistributedExecutor(2, initializer=mark_initialized, initargs=("again",)) as ex:
        before = ex.workers()
        killed_os_pid = kill_worker(before[0])
        wait_until(lambda: len(ex.workers()) == 2 and before[0] not in ex.workers(), 15,
                   message="a replacement worker")
        os_pids = {os_pid(p) for p in ex.workers()}
        assert len(os_pids) == 2 and killed_os_pid not in os_pids
        seen = {}
        while len(seen) < 2:
            for pid_here, mark in ex.map(initialized_in, [0.01] * 4):
                seen[pid_here] = mark
        assert all(mark == ("again", pid) for pid, mark in seen.items())
    wait_until(lambda: distexec.workers() == [1], 10)


def test_except_broken_process_pool_catches_a_task_whose_worker_died():
    with DistributedExecutor(1) as ex:
        future = ex.submit(exit_now, 7)
        try:
            future.result(timeout=30)
        except BrokenProcessPool as exc:  # what code written for ProcessPoolExecutor catches
            assert isinstance(exc, ProcessExitedException) and exc.exitcode == 7
        else:
            pytest.fail("the task of a dead worker returned")
        assert ex.submit(abs, -1).result(timeout=30) == 1  # a replacement ran it


def test_workers_that_keep_dying_break_the_executor():
    with DistributedExecutor(1) as ex:
        deaths = 0
        with pytest.raises(BrokenDistributedExecutor, match="keep dying") as broken:
            for _ in range(MAX_REPLACEMENTS + 3):
                try:
                    future = ex.submit(exit_now, 3)
                except BrokenDistributedExecutor:
                    raise
                with pytest.raises(BrokenProcessPool):
                    future.result(timeout=30)
                deaths += 1
                wait_until(lambda: ex._broken or ex.workers(), 15)
        assert isinstance(broken.value, BrokenProcessPool)
        assert deaths == MAX_REPLACEMENTS + 1
    wait_until(lambda: distexec.workers() == [1], 10)


def test_a_failing_initializer_breaks_the_executor_for_every_submit(caplog):
    ex = DistributedExecutor(2, initializer=fail_initializer)
    futures = [ex.submit(abs, -i) for i in range(5)]
    for future in futures:
        with pytest.raises(BrokenProcessPool, match="initializer failed"):
            future.result(timeout=30)
    with pytest.raises(BrokenDistributedExecutor,
                       match=r"initializer failed on worker \d+ \(ValueError: no database here\)"):
        ex.submit(abs, 1)
    assert "no database here" in caplog.text  # the worker's traceback is logged
    ex.shutdown(wait=True)
    assert distexec.workers() == [1]


def test_unpicklable_initargs_fail_at_once_and_say_what_to_use():
    counter = multiprocessing.Value("i", 0)
    lock = multiprocessing.Lock()
    started = time.monotonic()
    with pytest.raises(TypeError, match="RemoteChannel") as error:
        DistributedExecutor(2, initializer=mark_initialized, initargs=(counter, lock))
    assert time.monotonic() - started < 5
    assert "inheritance" in str(error.value)
    assert distexec.workers() == [1]  # nothing launched, nothing left to hang


def test_terminate_workers_stops_running_tasks_and_replaces_nothing(capfd):
    ex = DistributedExecutor(2)
    workers = ex.workers()
    os_pids = [os_pid(p) for p in workers]
    running = [ex.submit(sleep_and_return, 60, i) for i in range(2)]
    queued = [ex.submit(sleep_and_return, 60, i) for i in range(6)]
    wait_until(lambda: all(f.running() for f in running), 10)
    started = time.monotonic()
    ex.terminate_workers()
    for future in running:
        assert isinstance(future.exception(timeout=15), BrokenProcessPool)
    assert time.monotonic() - started < 15
    assert all(f.cancelled() or isinstance(f.exception(timeout=15), BrokenProcessPool)
               for f in queued)
    wait_until(lambda: all(is_gone(p) for p in os_pids), 15)
    wait_until(lambda: distexec.workers() == [1], 15, message="no replacement")
    with pytest.raises(RuntimeError):
        ex.submit(abs, 1)
    # stopped on purpose: not reported as deaths ("Worker 2 terminated."), as by the stdlib
    assert "terminated" not in capfd.readouterr().err


def test_kill_workers_stops_a_task_that_ignores_sigterm():
    ex = DistributedExecutor(1)
    (worker,) = ex.workers()
    worker_os_pid = os_pid(worker)
    future = ex.submit(_ignore_sigterm_and_sleep, 60)
    wait_until(future.running, 10)
    ex.kill_workers()
    error = future.exception(timeout=15)
    assert isinstance(error, ProcessExitedException) and error.signal == 9
    wait_until(lambda: is_gone(worker_os_pid), 10)
    wait_until(lambda: distexec.workers() == [1], 15)


def _ignore_sigterm_and_sleep(seconds):
    import signal
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(seconds)


def test_done_callbacks_never_run_two_at_a_time():
    state = {"count": 0, "active": 0, "peak": 0}
    guard = threading.Lock()

    def callback(_future):
        with guard:
            state["active"] += 1
            state["peak"] = max(state["peak"], state["active"])
        count = state["count"]  # unprotected on purpose, as a user's counter would be
        time.sleep(0.0005)
        state["count"] = count + 1
        with guard:
            state["active"] -= 1

    with DistributedExecutor(2) as ex:
        futures = [ex.submit(abs, -i) for i in range(300)]
        for future in futures:
            future.add_done_callback(callback)
        cf.wait(futures, timeout=60)
    wait_until(lambda: state["count"] == 300 or state["active"] == 0, 10)
    assert state["peak"] == 1
    assert state["count"] == 300


class _NoReplacement(distexec.LocalManager):
    """A manager that cannot replace its workers (a custom manager's default)."""

    def replacement(self, config):
        return None


class _ReplacementFails(distexec.LocalManager):
    """A manager whose replacements never start (a host that went away, a full queue)."""

    def replacement(self, config):
        return _LaunchFails(1)


class _LaunchFails(distexec.LocalManager):
    def launch(self, params, launched, launch_ntfy):
        raise distexec.LaunchWorkerError("the host is gone")


def _lose_the_only_worker(manager):
    """An executor on ``manager``'s one worker, killed under a running task and five queued
    ones: returns the executor and the queued futures (the running one failed as it should)."""
    ex = DistributedExecutor(manager=manager)
    (worker,) = ex.workers()
    blocker = ex.submit(sleep_and_return, 60, "blocker")
    queued = [ex.submit(abs, -i) for i in range(5)]
    wait_until(blocker.running, 10)
    kill_worker(worker)
    assert isinstance(blocker.exception(timeout=15), ProcessExitedException)
    return ex, queued


def test_without_replacements_the_queue_fails_once_every_worker_is_gone():
    ex, queued = _lose_the_only_worker(_NoReplacement(1))
    for future in queued:
        assert isinstance(future.exception(timeout=15), BrokenProcessPool)
    with pytest.raises(BrokenDistributedExecutor):
        ex.submit(abs, 1)
    ex.shutdown(wait=True)
    assert distexec.workers() == [1]


def test_a_replacement_that_cannot_start_breaks_the_executor_and_says_why():
    ex, queued = _lose_the_only_worker(_ReplacementFails(1))
    errors = [f.exception(timeout=15) for f in queued]
    sent_along = [e for e in errors if isinstance(e, ProcessExitedException)]
    assert len(sent_along) <= 1  # the one in the dead worker's second slot
    never_sent = [e for e in errors if e not in sent_along]
    assert never_sent and all(isinstance(e, BrokenDistributedExecutor) for e in never_sent)
    assert "no replacement could be launched: the host is gone" in str(never_sent[0])
    ex.shutdown(wait=True)
    assert distexec.workers() == [1]
