"""A worker of a DistributedExecutor dies (API.md §1, spec §3.1).

Only the futures that were on the dead worker fail, with ``ProcessExitedException`` naming it
(also a ``BrokenProcessPool``); queued and later work runs on the other workers, and a worker
the executor launched is replaced. When a ``pool=`` executor has no worker left it is broken:
queued futures and later submits get ``BrokenProcessPool``, and ``shutdown`` still returns.
"""

from __future__ import annotations

import concurrent.futures as cf
import fcntl
import logging
import os
import select
import signal
import struct
import termios
import threading
from concurrent.futures import BrokenExecutor
from concurrent.futures.process import BrokenProcessPool

import pytest

import distexec
from distexec import DistributedExecutor, ProcessExitedException
from distexec.executor import MAX_IN_FLIGHT
from distexec.runtime.context import current_context
from tests.executor.helpers import os_pids, sleep_and_getpid, sleep_and_return, touch_and_sleep
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

        # The executor launched the victim, so it launches a replacement: two workers again.
        wait_until(lambda: len(ex.workers()) == 2 and victim not in ex.workers(), DEATH_BUDGET,
                   message="a replacement for the dead worker")
        (replacement,) = set(ex.workers()) - {by_os_pid[survivor_os_pid]}
        assert replacement > victim  # a new id: ids are never reused
        later = [ex.submit(sleep_and_getpid, 0.2) for _ in range(4)]
        ran_on = {f.result(timeout=10) for f in later}
        assert survivor_os_pid in ran_on and victim_os_pid not in ran_on
        assert len(ran_on) == 2
        assert list(ex.map(abs, range(-5, 0))) == [5, 4, 3, 2, 1]
    wait_until(lambda: is_gone(survivor_os_pid), 10)


def test_the_only_worker_dying_is_replaced_and_the_queue_runs_on_its_replacement(tmp_path):
    with DistributedExecutor(1) as ex:
        (victim,) = ex.workers()
        blocker, os_pid = _start_blocker(ex, tmp_path)
        queued = [ex.submit(sleep_and_return, 0.01, i) for i in range(10)]
        os.kill(os_pid, signal.SIGKILL)

        assert isinstance(blocker.exception(timeout=DEATH_BUDGET), ProcessExitedException)
        outcomes = [f.exception(timeout=DEATH_BUDGET + 10) or f.result() for f in queued]
        lost = [e for e in outcomes if isinstance(e, BaseException)]
        assert all(isinstance(e, ProcessExitedException) and e.worker_id == victim
                   for e in lost), lost
        assert len(lost) <= MAX_IN_FLIGHT - 1  # only what had been sent to the victim
        assert [v for v in outcomes if not isinstance(v, BaseException)] == \
            [i for i in range(10) if outcomes[i] == i]
        assert ex.workers() != [victim] and not ex._broken
        assert ex.submit(os.getpid).result(timeout=10) != os_pid
    wait_until(lambda: is_gone(os_pid), 10)


def test_losing_every_worker_of_a_pool_breaks_the_executor(tmp_path):
    """Workers the executor did not launch are not replaced."""
    (pid,) = distexec.addprocs(1)
    ex = DistributedExecutor(pool=distexec.WorkerPool([pid]))
    blocker, os_pid = _start_blocker(ex, tmp_path)
    # long enough that the one sent to the worker's free slot is still running at the kill
    queued = [ex.submit(sleep_and_return, 1.0, i) for i in range(10)]
    os.kill(os_pid, signal.SIGKILL)

    assert isinstance(blocker.exception(timeout=DEATH_BUDGET), ProcessExitedException)
    errors = [f.exception(timeout=DEATH_BUDGET) for f in queued]
    assert all(isinstance(e, (ProcessExitedException, BrokenExecutor)) for e in errors), errors
    assert any(isinstance(e, BrokenExecutor) for e in errors)  # never sent anywhere
    assert all(isinstance(e, BrokenProcessPool) for e in errors)  # ProcessPoolExecutor's type
    assert ex._broken
    with pytest.raises(BrokenProcessPool):
        ex.submit(sleep_and_return, 0, "too late")
    ex.shutdown(wait=True)  # returns: there is nothing left to wait for
    assert distexec.workers() == [1]  # nobody launched a replacement
    wait_until(lambda: is_gone(os_pid), 10)


class _KillsWhilePickled:
    """An argument whose pickling, on the master, SIGKILLs worker ``pid`` and waits until the
    master's ends of its link and task lane hang up: the task it belongs to is then sent to a
    worker that died after its last reply."""

    def __init__(self, pid: int, os_pid: int):
        self.pid, self.os_pid = pid, os_pid

    def __reduce__(self):
        record = current_context().peers.get(self.pid)  # (pickled again: gone by then)
        conn = record.conn if record is not None else None
        ends = [] if conn is None else [conn.sock] + (
            [conn.task_lane._sock] if conn.task_lane is not None else [])
        if ends and not all(_hung_up(end) for end in ends):
            os.kill(self.os_pid, signal.SIGKILL)
            wait_until(lambda: all(_hung_up(end) for end in ends), 10,
                       message="the worker's ends to close")
        return (int, (7,))


def _hung_up(sock) -> bool:
    if sock.fileno() == -1:  # closed here already: the master has seen the end
        return True
    poller = select.poll()
    poller.register(sock, select.POLLHUP)
    return any(event & select.POLLHUP for _, event in poller.poll(0))


@pytest.mark.parametrize("second", ["small", "large"])
def test_a_task_sent_after_its_worker_died_unseen_goes_to_the_replacement(second):
    """The worker dies between its reply and the next task, which the thread reading that
    reply sends, before that thread has read the worker's end. The task never reached the
    worker, so it runs on the replacement: whether it waited behind the small task before it
    (by the task lane) or went after the large one (by the connection, where the send fails:
    it used to be sent to the dead worker again and again, the reading thread too busy with
    that to read the end)."""
    second_value = "second" if second == "small" else b"x" * 40_000  # (over the lane's limit)
    with DistributedExecutor(1) as ex:
        (pid,) = ex.workers()
        wpid = ex.submit(os.getpid).result(timeout=30)
        first = ex.submit(sleep_and_return, 0.3, "first")
        running = ex.submit(sleep_and_return, 0.3, second_value)  # the worker's both slots
        last = ex.submit(abs, _KillsWhilePickled(pid, wpid))  # queued: pumped at first's reply
        assert first.result(timeout=30) == "first"
        assert last.result(timeout=DEATH_BUDGET) == 7  # on the replacement
        with pytest.raises(ProcessExitedException):
            running.result(timeout=DEATH_BUDGET)
        assert ex.submit(os.getpid).result(timeout=30) != wpid


def test_a_task_whose_send_meets_its_workers_death_is_failed_once(caplog):
    """A thread sends a large task as its worker dies: the send fails, and the worker's loss,
    on its reader thread, has taken the task's waiter and failed it meanwhile. The task ends
    there, with ``ProcessExitedException``. It used to be requeued as well and run on the
    replacement, whose result then met a finished future: an InvalidStateError that dropped
    the replacement's connection too."""
    with DistributedExecutor(1) as ex:
        (pid,) = ex.workers()
        wpid = ex.submit(os.getpid).result(timeout=30)
        sock = current_context().peers[pid].conn.sock
        os.kill(wpid, signal.SIGSTOP)  # it reads nothing: the send below fills the socket
        sent: list[cf.Future] = []
        sender = threading.Thread(target=lambda: sent.append(ex.submit(len, b"x" * 50_000_000)))
        sender.start()
        wait_until(lambda: _unsent_bytes(sock) > 64 * 1024, 10, message="the send to block")
        os.kill(wpid, signal.SIGKILL)
        sender.join(DEATH_BUDGET)
        assert sent, "submit did not return"
        with pytest.raises(ProcessExitedException):
            sent[0].result(timeout=DEATH_BUDGET)
        replacement = ex.submit(os.getpid).result(timeout=30)
        assert replacement != wpid
        assert [ex.submit(os.getpid).result(timeout=30) for _ in range(3)] == [replacement] * 3
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def _unsent_bytes(sock) -> int:
    """Bytes written to ``sock`` that its peer has not read yet (SIOCOUTQ)."""
    if sock.fileno() == -1:
        return 0
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
