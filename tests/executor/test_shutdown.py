"""DistributedExecutor.shutdown and the context manager (spec §2.1, API.md §1).

``shutdown(wait=True)`` waits for the submitted work and removes the workers the executor
launched, never workers it only wraps; it may be called again; later ``submit``/``map`` raise
``RuntimeError``. ``cancel_futures=True`` cancels what has not started and lets the running
tasks finish. A ``submit`` racing ``shutdown`` either succeeds (and its future resolves) or
raises. ``shutdown(wait=False)`` returns at once and still finishes the work.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import distexec
from distexec import DistributedExecutor, WorkerPool
from tests.executor.helpers import os_pids, sleep_and_return, square
from tests.helpers import wait_gone, wait_until

pytestmark = pytest.mark.timeout(60)

AFTER_SHUTDOWN = r"^cannot schedule new futures after shutdown$"
ROOT = Path(__file__).resolve().parents[2]


def test_context_manager_returns_the_executor_and_shuts_it_down():
    with DistributedExecutor(2) as ex:
        assert isinstance(ex, DistributedExecutor)
        launched = ex.workers()
        processes = os_pids(launched)
        future = ex.submit(sleep_and_return, 0.3, "finished")
    assert future.done() and future.result() == "finished"  # __exit__ waited
    assert not set(launched) & set(distexec.procs())
    wait_gone(processes)
    with pytest.raises(RuntimeError, match=AFTER_SHUTDOWN):
        ex.submit(square, 1)


def test_leaving_the_block_on_an_exception_waits_without_cancelling():
    with pytest.raises(KeyError):
        with DistributedExecutor(1) as ex:
            futures = [ex.submit(sleep_and_return, 0.1, i) for i in range(6)]
            raise KeyError("user error")
    assert [f.result(timeout=0) for f in futures] == list(range(6))


def test_shutdown_removes_only_the_workers_it_launched(add_workers):
    existing = add_workers(2)
    wrapped = DistributedExecutor(pool=WorkerPool(existing))
    owning = DistributedExecutor(2)
    launched = owning.workers()
    launched_processes = os_pids(launched)
    assert sorted(wrapped.workers()) == sorted(existing)
    assert wrapped.submit(square, 3).result(timeout=10) == 9
    assert owning.submit(square, 4).result(timeout=10) == 16

    wrapped.shutdown(wait=True)
    owning.shutdown(wait=True)
    assert set(existing) <= set(distexec.workers())
    assert not set(launched) & set(distexec.procs())
    wait_gone(launched_processes)
    for pid in existing:  # the wrapped workers still serve
        assert distexec.remotecall_fetch(square, pid, 5) == 25


def test_shutdown_twice_is_fine_and_submit_or_map_after_it_raise():
    ex = DistributedExecutor(1)
    ex.shutdown(wait=True)
    ex.shutdown(wait=True)
    ex.shutdown(wait=False, cancel_futures=True)
    with pytest.raises(RuntimeError, match=AFTER_SHUTDOWN):
        ex.submit(square, 1)
    with pytest.raises(RuntimeError, match=AFTER_SHUTDOWN):
        list(ex.map(square, range(3)))


def test_cancel_futures_cancels_the_queue_and_lets_running_tasks_finish():
    ex = DistributedExecutor(2)
    futures = [ex.submit(sleep_and_return, 0.3, i) for i in range(1000)]
    wait_until(lambda: futures[0].running(), 10, message="the first task to be dispatched")
    ex.shutdown(wait=True, cancel_futures=True)

    assert all(f.done() for f in futures)
    cancelled = [f for f in futures if f.cancelled()]
    finished = [f for f in futures if not f.cancelled()]
    assert len(cancelled) >= 990
    assert futures[0] in finished
    for future in finished:  # the running ones completed normally
        assert future.result(timeout=0) == futures.index(future)
    for future in cancelled:
        with pytest.raises(cf.CancelledError):
            future.result(timeout=0)


def test_submit_racing_shutdown_either_succeeds_or_raises():
    ex = DistributedExecutor(2)
    accepted: list[tuple[int, cf.Future]] = []
    refused: list[BaseException] = []
    others: list[BaseException] = []
    go = threading.Barrier(9)

    def submitter(tid: int) -> None:
        go.wait()
        for i in range(10_000):
            try:
                accepted.append((tid * 100_000 + i, ex.submit(square, tid * 100_000 + i)))
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
    wait_until(lambda: len(accepted) >= 50, 10, message="some submits to get in")
    ex.shutdown(wait=True)
    for thread in threads:
        thread.join(10)
    assert not others
    assert len(refused) == 8  # every thread ran into the shutdown
    assert all(str(exc) == "cannot schedule new futures after shutdown" for exc in refused)
    for value, future in accepted:  # shutdown(wait=True) ran everything accepted
        assert future.done()
        assert future.result(timeout=0) == value * value


def test_shutdown_without_wait_returns_at_once_and_finishes_the_work():
    ex = DistributedExecutor(1)
    launched = ex.workers()
    processes = os_pids(launched)
    future = ex.submit(sleep_and_return, 1.0, "done anyway")
    wait_until(future.running, 10)
    asked = time.monotonic()
    ex.shutdown(wait=False)
    assert time.monotonic() - asked < 0.5
    assert not future.done()
    assert future.result(timeout=10) == "done anyway"
    wait_until(lambda: not set(launched) & set(distexec.procs()), 10,
               message="the executor's workers to be removed")
    wait_gone(processes)


def test_shutdown_with_wait_after_one_without_returns_once_the_workers_are_gone():
    ex = DistributedExecutor(2)
    launched = ex.workers()
    processes = os_pids(launched)
    future = ex.submit(sleep_and_return, 0.2, "last")
    ex.shutdown(wait=False)
    ex.shutdown(wait=True)
    assert future.result(timeout=0) == "last"
    assert not set(launched) & set(distexec.procs())
    wait_gone(processes)


@pytest.mark.parametrize("timeout", [None, 10], ids=["result()", "result(timeout)"])
def test_shutdown_with_wait_in_a_done_callback_raises_instead_of_hanging(timeout):
    """ProcessPoolExecutor raises RuntimeError there (its callback thread cannot join itself);
    waiting in a callback, which runs where results arrive, would wait for itself for ever.
    The executor still shuts down, as with wait=False."""
    ex = DistributedExecutor(1)
    raised: list[BaseException] = []

    def shut_down(future):
        try:
            ex.shutdown(wait=True)
        except RuntimeError as exc:
            raised.append(exc)

    future = ex.submit(square, 3)
    future.add_done_callback(shut_down)
    assert future.result(timeout=timeout) == 9
    wait_until(lambda: raised, 10, message="the callback's shutdown to return")
    assert "done-callback" in str(raised[0])
    with pytest.raises(RuntimeError, match=AFTER_SHUTDOWN):
        ex.submit(square, 1)
    ex.shutdown(wait=True)  # from here it waits, and the worker goes
    wait_until(lambda: ex.workers() == [], 10, message="the executor's worker to go")


# --------------------------------------------------------------------------------------------
# Ctrl-C while the executor finishes its work
# --------------------------------------------------------------------------------------------
CTRL_C_SCRIPT = textwrap.dedent("""
    import json
    import sys
    import time

    import distexec

    def read_pid(_):
        import os
        time.sleep(0.05)  # (so that both workers take some)
        return os.getpid()

    ex = distexec.DistributedExecutor(2)
    pids = sorted(set(ex.map(read_pid, range(8))))
    futures = [ex.submit(time.sleep, 60) for _ in range(5)]
    print(json.dumps(pids), flush=True)
    if sys.argv[1] == "shutdown":
        try:
            ex.shutdown(wait=True)
        except KeyboardInterrupt:
            states = ["cancelled" if f.cancelled() else type(f.exception()).__name__
                      for f in futures]
            print(json.dumps(sorted(set(states))), flush=True)
    # else: the program ends with the tasks still running, and waits for them at exit
""")


def _blocked_in_a_wait(pid: int) -> bool:
    """The process's main thread sleeps in a futex wait (x86-64 and arm64 syscall numbers)."""
    try:
        with open(f"/proc/{pid}/syscall") as f:
            number = f.read().split()[0]
    except (OSError, IndexError):
        return False
    return number in ("202", "98")


@pytest.mark.parametrize("where", ["shutdown", "exit"])
def test_a_ctrl_c_while_the_executor_finishes_its_work_stops_it(tmp_path, where):
    """A Ctrl-C while shutdown(wait=True) waits (leaving a ``with`` block, often after a first
    Ctrl-C) or while the program's end waits for the tasks: stop, not wait. Queued tasks are
    cancelled, the running ones' workers terminated, and the program ends at once, where
    ProcessPoolExecutor hangs (python/cpython#125886)."""
    script = tmp_path / "job.py"
    script.write_text(CTRL_C_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), where], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        workers = json.loads(proc.stdout.readline())
        wait_until(lambda: _blocked_in_a_wait(proc.pid), message="the wait for the tasks")
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)  # the terminal's Ctrl-C reaches the master only
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert time.monotonic() - started < 20, "the program waited for the 60 s tasks"
    assert proc.returncode == 0, err
    if where == "shutdown":  # 2 running tasks failed with their workers, 2 sent, 1 queued
        assert json.loads(out) == ["ProcessExitedException", "cancelled"]
    else:  # the end the user asked for, without a traceback from the wait that was cut short
        assert "Traceback" not in err
    wait_gone(workers)
