"""The joblib backend's own workers, kept for the next ``Parallel`` call: loky's reusable executor.

Owns the module-level :data:`shared` (one per master process) and :func:`shutdown_workers`.
Imports :mod:`distexec.executor` only (never joblib), so it can be tested and shut down alone.

    Parallel call ──acquire(n)──► the current executor, when it has n workers and works
                                  otherwise a new DistributedExecutor(n); the old one is
                                  retired: shut down now, or when its last call ends
    end of the call ──release──► the last call out starts the idle clock
    idle for idle_worker_timeout s ──► shut down (its workers exit); the next call starts anew
    a worker dies ──► the executor replaces it; one that broke or lost workers for good is
                      retired at the next acquire
    shutdown_workers(), interpreter exit ──► every executor shut down, every worker removed

Like loky's, the workers keep their state between calls (modules imported, globals set).
Several calls at once (from several threads) share the executor; one that asks for another
size gets a new executor while the others finish on the old one.
"""

from __future__ import annotations

import atexit
import threading
import time

from ..executor import DistributedExecutor

__all__ = ["IDLE_WORKER_TIMEOUT", "SharedExecutor", "shared", "shutdown_workers"]

IDLE_WORKER_TIMEOUT = 300.0
"""Seconds the workers stay unused before they exit (loky's default, joblib's name for it)."""


class SharedExecutor:
    """One executor of ``n`` local workers, lent to each ``Parallel`` call that needs one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: DistributedExecutor | None = None
        self._size = 0
        self._calls: dict[DistributedExecutor, int] = {}  # executor -> calls using it now
        self._retired: set[DistributedExecutor] = set()  # shut down when their calls end
        self._idle_since = 0.0
        self._idle_timeout = IDLE_WORKER_TIMEOUT
        self._timer: threading.Timer | None = None
        self._timer_due = 0.0
        self._hooked = False

    def acquire(self, n: int, idle_timeout: float = IDLE_WORKER_TIMEOUT) -> DistributedExecutor:
        """An executor of ``n`` workers for one call; hand it back with :meth:`release`.

        ``idle_timeout``: how long the workers stay unused after this call, before they exit.
        """
        stale: list[DistributedExecutor] = []
        try:
            with self._lock:
                current = self._current
                if current is not None and (self._size != n or not _healthy(current, n)):
                    stale = self._retire(current)
                    current = None
                if current is None:
                    # Launched under the lock: a concurrent call waits for these workers
                    # rather than launching its own.
                    current = self._current = DistributedExecutor(n)
                    self._size = n
                    self._hook_exit()
                self._calls[current] = self._calls.get(current, 0) + 1
                self._idle_timeout = idle_timeout
        finally:  # the old workers go even when the new ones could not start
            _shut(stale)
        return current

    def release(self, executor: DistributedExecutor) -> None:
        """The call that acquired ``executor`` is over."""
        with self._lock:
            left = self._calls[executor] = self._calls.get(executor, 1) - 1
            if left > 0:
                return
            del self._calls[executor]
            stale = []
            if executor in self._retired:
                self._retired.discard(executor)
                stale = [executor]
            elif executor is self._current:
                self._idle_since = time.monotonic()
                self._arm_timer(self._idle_timeout)
        _shut(stale)

    def calls(self, executor: DistributedExecutor) -> int:
        """How many calls use ``executor`` now."""
        with self._lock:
            return self._calls.get(executor, 0)

    def worker_pids(self) -> set[int]:
        """Every worker of the executors held here (the current one, retired ones)."""
        with self._lock:
            executors = [e for e in (self._current, *self._retired) if e is not None]
        return {pid for executor in executors for pid in executor.workers()}

    def shutdown(self, everything: bool = False) -> None:
        """Shut the current executor down now if no call uses it, else when the last one ends.

        ``everything`` (interpreter exit): every executor now, calls or not; their work
        is waited for, as ``ProcessPoolExecutor`` does at exit.
        """
        with self._lock:
            stale = self._retire(self._current) if self._current is not None else []
            if everything:
                stale, self._retired = stale + list(self._retired), set()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        _shut(stale)

    # -- with the lock held ------------------------------------------------------------------
    def _retire(self, executor: DistributedExecutor) -> list[DistributedExecutor]:
        """Stop lending ``executor``; returns it when it can be shut down at once."""
        if executor is self._current:
            self._current = None
        if self._calls.get(executor):
            self._retired.add(executor)
            return []
        return [executor]

    def _arm_timer(self, seconds: float) -> None:
        """Make sure a timer fires within ``seconds``: one thread per idle period, not per call."""
        due = time.monotonic() + seconds
        if self._timer is not None:
            if self._timer_due <= due:
                return  # it fires in time and checks the idle clock then
            self._timer.cancel()
        timer = threading.Timer(seconds, self._on_timer)
        timer.daemon = True  # never keeps the interpreter alive
        timer.name = "distexec-joblib-idle"
        self._timer, self._timer_due = timer, due
        timer.start()

    def _on_timer(self) -> None:
        with self._lock:
            self._timer = None
            current = self._current
            if current is None or self._calls.get(current):
                return  # in use again: the call's release arms the next timer
            remaining = self._idle_since + self._idle_timeout - time.monotonic()
            if remaining > 0:  # used meanwhile: wait for the rest of the new idle period
                self._arm_timer(remaining)
                return
            self._current = None
        _shut([current])

    def _hook_exit(self) -> None:
        # Registered after addprocs registered the cluster's own exit hook (on the first
        # launch), so it runs before it: the executor is shut down while its workers live.
        if not self._hooked:
            self._hooked = True
            atexit.register(self.shutdown, True)


def _healthy(executor: DistributedExecutor, n: int) -> bool:
    """Whether ``executor`` can take a call of ``n`` workers: not broken or shut down, and
    its ``n`` workers there (or a lost one being replaced)."""
    if executor._broken or executor._shutdown:
        return False
    return len(executor.workers()) >= n or executor._workers.replacing()


def _shut(executors: list[DistributedExecutor]) -> None:
    for executor in executors:
        executor.shutdown(wait=True, cancel_futures=True)


shared = SharedExecutor()
"""The process's one lender of joblib workers."""


def shutdown_workers() -> None:
    """Let the joblib backend's own workers exit now (when the calls using them end).

    They would otherwise stay for the next ``Parallel`` call until ``idle_worker_timeout``
    seconds pass unused, or until the interpreter exits. Workers the backend was given (an
    executor, the process's own workers) are not its to stop.
    """
    shared.shutdown()
