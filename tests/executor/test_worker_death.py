"""A worker of a DistributedExecutor dies (API.md §1, spec §3.1).

Only the futures that were on the dead worker fail, with ``ProcessExitedException`` naming it;
queued and later work runs on the remaining workers and ``_max_workers`` follows. When no
worker is left the executor is broken: queued futures and later submits get
``BrokenExecutor``, and ``shutdown`` still returns.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
from concurrent.futures import BrokenExecutor

import pytest

from distexec import DistributedExecutor, ProcessExitedException
from distexec.executor import MAX_IN_FLIGHT
from tests.executor.helpers import os_pids, sleep_and_return, touch_and_sleep
from tests.helpers import is_gone, wait_until

pytestmark = pytest.mark.timeout(60)

DEATH_BUDGET = 5.0


def _start_blocker(ex, tmp_path, seconds=30.0) -> tuple[cf.Future, int]:
    """Submit a long task; returns it and the OS pid of the worker running it."""
    future = ex.submit(touch_and_sleep, str(tmp_path), "blocker", seconds)
    marker = tmp_path / "blocker"
    wait_until(marker.exists, 10, message="the long task to start")
    wait_until(lambda: marker.read_text() != "", 10)
    return future, int(marker.read_text())


def test_sigkill_fails_only_the_futures_on_that_worker(tmp_path):
    with DistributedExecutor(2) as ex:
        by_os_pid = os_pids(ex.workers())
        blocker, victim_os_pid = _start_blocker(ex, tmp_path)
        victim = by_os_pid[victim_os_pid]
        (survivor_os_pid,) = set(by_os_pid) - {victim_os_pid}
        queued = [ex.submit(sleep_and_return, 0.05, i) for i in range(20)]

        os.kill(victim_os_pid, signal.SIGKILL)
        exc = blocker.exception(timeout=DEATH_BUDGET)
        assert isinstance(exc, ProcessExitedException), repr(exc)
        assert exc.worker_id == victim
        assert exc.signal == signal.SIGKILL
        with pytest.raises(ProcessExitedException):
            blocker.result()

        # Whatever had been sent to the victim fails the same way; the rest runs elsewhere.
        failed = []
        for i, future in enumerate(queued):
            error = future.exception(timeout=10)
            if error is None:
                assert future.result() == i
            else:
                assert isinstance(error, ProcessExitedException) and error.worker_id == victim
                failed.append(i)
        assert len(failed) <= MAX_IN_FLIGHT - 1, failed  # the victim's other slot at most

        wait_until(lambda: ex._max_workers == 1, DEATH_BUDGET)
        assert ex.workers() == [by_os_pid[survivor_os_pid]]
        later = [ex.submit(os.getpid) for _ in range(10)]
        assert [f.result(timeout=10) for f in later] == [survivor_os_pid] * 10
        assert list(ex.map(abs, range(-5, 0))) == [5, 4, 3, 2, 1]
    wait_until(lambda: is_gone(survivor_os_pid), 10)


def test_losing_every_worker_breaks_the_executor(tmp_path):
    ex = DistributedExecutor(1)
    blocker, os_pid = _start_blocker(ex, tmp_path)
    # long enough that the one sent to the worker's free slot is still running at the kill
    queued = [ex.submit(sleep_and_return, 1.0, i) for i in range(10)]
    os.kill(os_pid, signal.SIGKILL)

    assert isinstance(blocker.exception(timeout=DEATH_BUDGET), ProcessExitedException)
    errors = [f.exception(timeout=DEATH_BUDGET) for f in queued]
    assert all(isinstance(e, (ProcessExitedException, BrokenExecutor)) for e in errors), errors
    assert any(isinstance(e, BrokenExecutor) for e in errors)  # never sent anywhere
    assert ex._broken
    with pytest.raises(BrokenExecutor):
        ex.submit(sleep_and_return, 0, "too late")
    ex.shutdown(wait=True)  # returns: there is nothing left to wait for
    wait_until(lambda: is_gone(os_pid), 10)
