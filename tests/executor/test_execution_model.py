"""ProcessPoolExecutor's execution model (API.md §1): one task at a time per worker, on its
main thread, in order, with the initializer on every worker the executor uses.

Each test is a program a ProcessPoolExecutor user writes; it must give the same answer here.
Julia-style calls keep their own model on the same workers: they run at once, on another
thread when the main thread is busy (docs/executor.md, "Mixing with Julia-style calls").
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import os
import signal

import pytest

import distexec
from distexec import DistributedExecutor
from tests.executor.helpers import (initialized_in, insert_slowly, interval, mark_initialized,
                                    open_db, record_order, recorded_order, with_alarm)
from tests.helpers import os_pid, wait_until

pytestmark = pytest.mark.timeout(90)


def _overlaps(intervals):
    """Pairs of (start, end) intervals of one process that overlap."""
    ordered = sorted(intervals)
    return [(a, b) for a, b in itertools.pairwise(ordered) if b[0] < a[1]]


def test_a_worker_runs_one_task_at_a_time_on_its_main_thread():
    with DistributedExecutor(2) as ex:
        outcomes = [f.result(timeout=30) for f in [ex.submit(interval, 0.05) for _ in range(24)]]
    by_process: dict[int, list] = {}
    for pid, start, end, on_main, _name in outcomes:
        assert on_main
        by_process.setdefault(pid, []).append((start, end))
    assert len(by_process) == 2  # both workers took tasks
    for pid, intervals in by_process.items():
        assert _overlaps(intervals) == [], f"tasks overlapped on process {pid}"


def test_tasks_run_in_the_order_submitted_whatever_their_size():
    """A local worker's small tasks travel on its task lane, large ones on its connection:
    the order stays the submission order (and ``__main__`` globals, sent once, stay valid)."""
    sizes = [0, 200_000, 0, 0, 1_000_000, 0, 300_000, 300_000, 0] * 5
    with DistributedExecutor(1) as ex:
        futures = [ex.submit(record_order, k, b"x" * size) for k, size in enumerate(sizes)]
        assert [f.result(timeout=30) for f in futures] == sizes
        assert ex.submit(recorded_order).result(timeout=30) == list(range(len(sizes)))


def test_max_workers_bounds_the_tasks_running_at_once():
    with DistributedExecutor(2) as ex:
        outcomes = list(ex.map(interval, [0.03] * 40))
    events = sorted([(s, 1) for _, s, _, _, _ in outcomes] + [(e, -1) for _, _, e, _, _ in outcomes],
                    key=lambda ev: (ev[0], ev[1]))
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert peak <= 2


def test_an_initializer_sqlite_connection_works_in_every_task():
    """The per-process connection of the docs' recipe: thread-affine state must not move."""
    with DistributedExecutor(2, initializer=open_db) as ex:
        counts = list(ex.map(insert_slowly, range(40)))
    assert sorted(counts)[-1] >= 20 and len(counts) == 40  # no ProgrammingError


def test_a_task_can_set_a_signal_handler_and_an_alarm():
    with DistributedExecutor(1) as ex:
        assert ex.submit(with_alarm, 5.0, 0.01).result(timeout=30) == "finished"
        late = ex.submit(with_alarm, 0.1, 10.0)
        with pytest.raises(TimeoutError, match="longer than 0.1 s"):
            late.result(timeout=30)


def test_a_julia_call_runs_at_once_beside_a_busy_task():
    """A remotecall to a worker whose main thread runs a task runs on another thread now."""
    with DistributedExecutor(1) as ex:
        (pid,) = ex.workers()
        long_task = ex.submit(interval, 2.0)
        wait_until(lambda: distexec.remotecall_fetch(_main_thread_busy, pid), 10)
        _, _, _, on_main, name = distexec.remotecall_fetch(interval, pid, 0.0)
        assert not on_main and name.startswith("distexec-call")
        assert not long_task.done()  # it ran while the task did
        assert long_task.result(timeout=30)[3]


def test_a_task_waits_for_a_julia_call_on_the_main_thread():
    """A Julia-style call that found the main thread idle keeps it; the next task queues."""
    with DistributedExecutor(1) as ex:
        (pid,) = ex.workers()
        julia = distexec.remotecall(interval, pid, 0.5)
        wait_until(lambda: distexec.remotecall_fetch(_main_thread_busy, pid), 10)
        task = ex.submit(interval, 0.0)
        _, j_start, j_end, j_main, _ = julia.fetch()
        _, t_start, _, t_main, _ = task.result(timeout=30)
        assert j_main and t_main
        assert t_start >= j_end


def _main_thread_busy():
    """On a worker, from a Julia-style call: whether its main thread runs user code now."""
    import threading

    from distexec.runtime.context import current_context
    runner = current_context().runner
    main = threading.main_thread().ident
    return threading.get_ident() != main and main in runner._in_user_code


def test_the_initializer_runs_in_workers_that_join_a_pool_later():
    first, = distexec.addprocs(1)
    pool = distexec.WorkerPool([first])
    try:
        with DistributedExecutor(pool=pool, initializer=mark_initialized,
                                 initargs=("pool",)) as ex:
            assert ex.submit(initialized_in).result(timeout=30)[1][0] == "pool"
            second, = distexec.addprocs(1)
            pool.push(second)
            second_os_pid = os_pid(second)
            seen = {}
            while second_os_pid not in seen:  # until a task lands on the newcomer
                for pid_here, mark in ex.map(initialized_in, [0.01] * 4):
                    seen[pid_here] = mark
            assert seen[second_os_pid] == ("pool", second_os_pid)
    finally:
        distexec.rmprocs(distexec.workers())


def test_max_tasks_per_child_recycles_workers_and_reruns_the_initializer():
    with DistributedExecutor(2, initializer=mark_initialized, max_tasks_per_child=3) as ex:
        outcomes = list(ex.map(initialized_in, [0.005] * 30))
        wait_until(lambda: len(ex.workers()) == 2, 15, message="the last retired replaced")
    per_process: dict[int, int] = {}
    for pid, mark in outcomes:
        assert mark == ("init", pid)  # the initializer ran in this very process
        per_process[pid] = per_process.get(pid, 0) + 1
    assert max(per_process.values()) <= 3
    assert len(per_process) >= 10


def test_max_tasks_per_child_with_a_backlog_and_shutdown_without_waiting():
    """CPython's gh-115634: the pool hung here once the first worker retired."""
    ex = DistributedExecutor(1, max_tasks_per_child=2)
    futures = [ex.submit(initialized_in, 0.01) for _ in range(7)]
    ex.shutdown(wait=False)
    done, not_done = cf.wait(futures, timeout=60)
    assert not not_done
    assert len({f.result()[0] for f in futures}) == 4  # 2 + 2 + 2 + 1
    wait_until(lambda: distexec.workers() == [1], 20, message="every worker removed")


@pytest.mark.parametrize("value, error, message", [
    (0, ValueError, "max_tasks_per_child must be >= 1"),
    (-1, ValueError, "max_tasks_per_child must be >= 1"),
    ("2", TypeError, "max_tasks_per_child must be an integer"),
    (1.5, TypeError, "max_tasks_per_child must be an integer"),
])
def test_invalid_max_tasks_per_child_gets_process_pool_executors_errors(value, error, message):
    for executor_type in (cf.ProcessPoolExecutor, DistributedExecutor):
        with pytest.raises(error, match=message):
            executor_type(1, max_tasks_per_child=value)
    assert distexec.workers() == [1]  # nothing was launched


def test_the_constructor_takes_process_pool_executors_positional_order():
    import multiprocessing
    with DistributedExecutor(1, multiprocessing.get_context("spawn"), mark_initialized,
                             ("positional",)) as ex:
        assert ex.submit(initialized_in).result(timeout=30)[1][0] == "positional"


@pytest.mark.parametrize("method", ["spawn", "forkserver", "fork"])
def test_every_start_method_is_accepted(method):
    import multiprocessing
    with DistributedExecutor(1, mp_context=multiprocessing.get_context(method),
                             max_tasks_per_child=1) as ex:
        assert ex.submit(abs, -3).result(timeout=30) == 3


def test_an_unknown_keyword_is_a_type_error_as_for_process_pool_executor():
    for executor_type in (cf.ProcessPoolExecutor, DistributedExecutor):
        with pytest.raises(TypeError, match="unexpected keyword argument 'max_worker'"):
            executor_type(max_worker=2)
    assert distexec.workers() == [1]


def test_an_os_signal_alarm_ends_only_its_own_task():
    """The alarm of one task must not reach the next one (the handler is restored)."""
    with DistributedExecutor(1) as ex:
        results = [ex.submit(with_alarm, 0.05, 1.0), ex.submit(with_alarm, 5.0, 0.2)]
        assert isinstance(results[0].exception(timeout=30), TimeoutError)
        assert results[1].result(timeout=30) == "finished"
        assert signal.getsignal(signal.SIGALRM) is signal.SIG_DFL  # the master untouched
