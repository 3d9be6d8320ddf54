"""The two ways a process runs incoming calls (``distexec.runtime.runner``), without sockets.

Executor tasks (``submit_in_order``) run one at a time, in order, on the thread that serves as
the main thread; Julia-style calls (``submit``) run at once, beside a busy main thread. The
same behaviour with real workers is in tests/executor/test_execution_model.py.
"""

from __future__ import annotations

import threading
import time

import pytest

from distexec.runtime.runner import CallRunner
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(30)


class _Served:
    """A runner whose "main thread" is a thread of this test, serving until ``close``."""

    def __init__(self):
        self.runner = CallRunner(ctx=None)
        self.stopping = False
        self.thread = threading.Thread(target=self.runner.serve_main_thread,
                                       args=(lambda: self.stopping,), name="served-main")
        self.thread.start()
        wait_until(lambda: self.runner._main_queue is not None, 5)

    def close(self):
        self.stopping = True
        self.runner.stop()
        self.thread.join(5)


@pytest.fixture
def served(monkeypatch):
    monkeypatch.setattr("distexec.runtime.context.use_context", lambda ctx: None)
    served = _Served()
    yield served
    served.close()


def _recorder(log, lock, name, seconds=0.0):
    def task():
        start = time.monotonic()
        time.sleep(seconds)
        with lock:
            log.append((name, threading.current_thread().name, start, time.monotonic()))
    return task


def test_in_order_tasks_run_one_at_a_time_in_order_on_the_main_thread(served):
    log, lock = [], threading.Lock()
    for i in range(30):
        served.runner.submit_in_order(_recorder(log, lock, i, 0.002))
    wait_until(lambda: len(log) == 30, 10)
    assert [name for name, *_ in log] == list(range(30))
    assert {thread for _, thread, _, _ in log} == {"served-main"}
    assert all(b[2] >= a[3] for a, b in zip(log, log[1:]))  # never overlapping


def test_a_call_beside_a_busy_main_thread_runs_at_once_on_another_thread(served):
    log, lock = [], threading.Lock()
    started, release = threading.Event(), threading.Event()

    def task():
        started.set()
        release.wait(10)
        _recorder(log, lock, "task")()

    served.runner.submit_in_order(task)
    assert started.wait(5)
    served.runner.submit(_recorder(log, lock, "call"))
    wait_until(lambda: len(log) == 1, 5)  # the call ran while the task was still running
    release.set()
    wait_until(lambda: len(log) == 2, 5)
    (call,), (task_entry,) = ([e for e in log if e[0] == name] for name in ("call", "task"))
    assert call[1] != "served-main" and task_entry[1] == "served-main"


def test_in_order_tasks_without_a_served_main_thread_use_one_lane_thread(monkeypatch):
    monkeypatch.setattr("distexec.runtime.context.use_context", lambda ctx: None)
    runner = CallRunner(ctx=None)
    log, lock = [], threading.Lock()
    for i in range(20):
        runner.submit_in_order(_recorder(log, lock, i, 0.001))
    wait_until(lambda: len(log) == 20, 10)
    assert [name for name, *_ in log] == list(range(20))
    assert len({thread for _, thread, _, _ in log}) == 1
    assert all(b[2] >= a[3] for a, b in zip(log, log[1:]))
    wait_until(lambda: not runner._lane_running, 5)  # the lane thread ends when idle


def test_calls_that_arrive_before_the_main_thread_serves_wait_for_it(monkeypatch):
    """A worker reserves its main thread before it can be reached: its first call and first
    executor task run there even when they arrive while it is still starting up."""
    monkeypatch.setattr("distexec.runtime.context.use_context", lambda ctx: None)
    runner = CallRunner(ctx=None)
    log, lock = [], threading.Lock()
    reserved, submitted, stopping = threading.Event(), threading.Event(), []

    def main():
        runner.reserve_main_thread()
        reserved.set()
        submitted.wait(5)  # still starting up while the calls arrive
        runner.serve_main_thread(lambda: bool(stopping))

    thread = threading.Thread(target=main, name="served-main")
    thread.start()
    try:
        assert reserved.wait(5)
        runner.submit(_recorder(log, lock, "call"))
        runner.submit_in_order(_recorder(log, lock, "task"))
        assert log == []
        submitted.set()
        wait_until(lambda: len(log) == 2, 5)
        assert [(name, where) for name, where, _, _ in log] == [("call", "served-main"),
                                                               ("task", "served-main")]
    finally:
        stopping.append(True)
        runner.stop()
        thread.join(5)


def test_a_call_right_after_the_idle_main_thread_is_told_of_its_lane_runs_there(served):
    """A worker's JOIN gives its idle main thread a task lane and wakes it to read it too
    (``wake_idle_main``). A call arriving while it looks is still the main thread's: it
    runs there, where SIGINT can stop it, not on a pool thread (C1 failed 1 time in ~100)."""
    log, lock = [], threading.Lock()
    for i in range(20):
        wait_until(lambda: served.runner._main_idle, 5)
        served.runner.wake_idle_main()
        served.runner.submit(_recorder(log, lock, i))
        wait_until(lambda: len(log) == i + 1, 5)
    assert {thread for _, thread, _, _ in log} == {"served-main"}
