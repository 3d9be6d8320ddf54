"""The joblib parallel backend ``"distexec"``: ``joblib.Parallel`` on distexec workers.

Owns :class:`DistexecBackend`. Imports joblib (this module is only imported once joblib is: see
:mod:`distexec.integrations._joblib_hook`, which ``import distexec`` installs) and
:mod:`distexec.executor`, :mod:`distexec.pools`, :mod:`distexec.api` below it.

    Parallel ──configure(n_jobs)──► the executor for this call:
                                      executor=ex given ─────────► ex (never shut down here)
                                      the cluster has workers ───► an executor on n of them
                                      otherwise ─────────────────► DistributedExecutor(n), owned
    Parallel ──submit(batch, callback)──► executor.submit(batch) ──► worker
    worker's result ──► reader thread completes the future ──► callback thread ──► joblib's
        callback (records the result, dispatches the next batch: auto-batching)
    a task fails ──► abort_everything: cancel the queued batches; interrupt the running
                     ones on workers this backend launched
    end of the call ──► terminate: shut the owned executor down (its workers exit)

joblib's callbacks run on a thread of this backend, never on distexec's reader threads: they
dispatch the next batch, which pulls the user's iterator (any code, possibly a distexec call
whose reply that very reader thread would have to read).

Inside a worker, nested ``Parallel`` calls run on threads (then sequentially one level deeper),
and an explicit ``backend="distexec"`` there falls back to threads too: a worker never waits
for other workers on joblib's behalf, so nesting cannot deadlock.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import joblib
from joblib._parallel_backends import (
    AutoBatchingMixin,
    FallbackToBackend,
    ParallelBackendBase,
    SequentialBackend,
    ThreadingBackend,
)

from .. import api
from ..executor import DistributedExecutor
from ..pools import WorkerPool
from . import _joblib_hook

__all__ = ["DistexecBackend", "register"]

log = logging.getLogger("distexec")

ABORT_INTERRUPT_SECONDS = 2.0
"""How long an abort keeps interrupting this backend's workers while its batches still run."""


def register() -> None:
    """Register the backend as ``"distexec"`` (``import distexec`` already does this)."""
    _joblib_hook.register(joblib)


class DistexecBackend(AutoBatchingMixin, ParallelBackendBase):
    """joblib's ``Parallel`` on distexec workers: ``parallel_config(backend="distexec")``.

    Args:
        executor: a :class:`DistributedExecutor` to run on; it is left running after the
            call. Without it, a call uses the workers the process's cluster already has
            (``addprocs``, ``distexec run -p N``), or launches ``n_jobs`` local workers for
            the duration of the call (reused by ``with Parallel(...) as parallel:`` blocks).
        nesting_level, inner_max_num_threads: joblib's usual backend arguments.

    ``n_jobs=-1`` means every CPU when this backend launches its workers, and every available
    worker otherwise; ``n_jobs=-2`` one fewer, and so on; a positive ``n_jobs`` is capped at
    the number of available workers; ``n_jobs=1`` runs in this process.
    """

    default_n_jobs = -1
    supports_retrieve_callback = True
    supports_timeout = True
    supports_return_generator = True
    uses_threads = False
    supports_sharedmem = False

    def __init__(self, executor: DistributedExecutor | None = None, nesting_level=None,
                 inner_max_num_threads=None, **backend_kwargs):
        super().__init__(nesting_level=nesting_level,
                         inner_max_num_threads=inner_max_num_threads, **backend_kwargs)
        self._given = executor
        self._executor: DistributedExecutor | None = executor
        self._owned: DistributedExecutor | None = None  # an executor this backend created
        self._owns_workers = False  # ... and launched the workers of
        self._futures: set[cf.Future] = set()
        self._lock = threading.Lock()
        self._callbacks = _CallbackThread()

    def __reduce__(self):
        # Only ever pickled by mistake (a backend inside a task): the copy has no executor,
        # and on a worker it falls back to threads.
        return type(self), (None, self.nesting_level)

    # -- sizing ------------------------------------------------------------------------------
    def effective_n_jobs(self, n_jobs: int | None) -> int:
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            n_jobs = self.default_n_jobs
        capacity = self._capacity()
        if capacity is None:  # workers launched for the call, counted the way joblib does
            return max(joblib.cpu_count() + 1 + n_jobs, 1) if n_jobs < 0 else n_jobs
        return max(capacity + 1 + n_jobs, 1) if n_jobs < 0 else min(n_jobs, capacity)

    def _capacity(self) -> int | None:
        """How many workers a call may use, or None when it launches as many as it wants."""
        if self._given is not None:
            return self._given._max_workers
        if _on_worker():
            return None
        return len(self._cluster_workers()) or None

    def _cluster_workers(self) -> list[int]:
        """The process's workers, less those this backend launched itself."""
        mine = set(self._owned.workers()) if self._owns_workers and self._owned else set()
        return [p for p in api.procs() if p != 1 and p not in mine]

    # -- lifecycle ---------------------------------------------------------------------------
    def configure(self, n_jobs: int | None = 1, parallel=None, prefer=None, require=None,
                  **backend_kwargs) -> int:
        if _on_worker():
            raise FallbackToBackend(ThreadingBackend(nesting_level=self.nesting_level))
        n = self.effective_n_jobs(n_jobs)
        self.parallel = parallel
        if n > 1:  # with 1, joblib runs the call here: no workers needed
            self._executor = self._executor_for(n)
            self._callbacks.start()
        return n

    def _executor_for(self, n: int) -> DistributedExecutor:
        if self._given is not None:
            return self._given
        owned = self._owned
        if owned is not None and owned._max_workers == n and not owned._shutdown:
            return owned
        self._close_owned()
        shared = self._cluster_workers()
        if shared:
            owned, self._owns_workers = DistributedExecutor(pool=WorkerPool(shared[:n])), False
        else:
            owned, self._owns_workers = DistributedExecutor(n), True
        self._owned = owned
        return owned

    def terminate(self) -> None:
        self._close_owned()
        self._executor = self._given
        self._callbacks.stop()
        self.reset_batch_stats()

    def _close_owned(self) -> None:
        owned, self._owned = self._owned, None
        if owned is not None:
            owned.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._futures.clear()

    # -- running batches ---------------------------------------------------------------------
    def submit(self, func: Callable[[], Any], callback: Callable | None = None) -> cf.Future:
        """Run one joblib batch on a worker; ``callback(future)`` runs when it is done."""
        executor = self._executor
        if executor is None:
            raise RuntimeError("the distexec joblib backend was used before configure()")
        future = executor.submit(func)
        with self._lock:
            self._futures.add(future)
        future.add_done_callback(self._forget)
        if callback is not None:
            future.add_done_callback(lambda done: self._callbacks.call_soon(callback, done))
        return future

    apply_async = submit  # the name joblib 1.4 calls

    def _forget(self, future: cf.Future) -> None:
        with self._lock:
            self._futures.discard(future)

    def retrieve_result_callback(self, out: cf.Future) -> Any:
        return out.result()

    def retrieve_result(self, out: cf.Future, timeout: float | None = None) -> Any:
        return out.result(timeout)

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """Cancel the batches still queued; interrupt the running ones on our own workers.

        Workers this backend did not launch (a given executor, the cluster's) may be running
        someone else's calls too, so their running batches are left to finish.
        """
        with self._lock:
            futures = list(self._futures)
        running = [f for f in futures if not f.cancel() and not f.done()]
        if running and self._owns_workers and self._owned is not None:
            _interrupt_until_done(self._owned, running, ABORT_INTERRUPT_SECONDS)

    # -- nesting -----------------------------------------------------------------------------
    def get_nested_backend(self):
        """Threads inside a worker's batch, then sequential one level deeper."""
        level = (self.nesting_level or 0) + 1
        if level > 1:
            return SequentialBackend(nesting_level=level), None
        return ThreadingBackend(nesting_level=level), None


def _on_worker() -> bool:
    return api.myid() != 1


def _interrupt_until_done(executor: DistributedExecutor, running: list[cf.Future],
                          seconds: float) -> None:
    """Interrupt the executor's workers until ``running`` are done or ``seconds`` pass.

    More than once: a batch that was on its way to a worker when the first interrupt
    arrived starts after it.
    """
    deadline = time.monotonic() + seconds
    while running and time.monotonic() < deadline:
        pids = executor.workers()
        if not pids:
            return
        try:
            api.interrupt(*pids)
        except Exception as exc:  # a worker that just exited: the next round skips it
            log.debug("joblib abort: interrupting %s failed: %r", pids, exc)
        running = list(cf.wait(running, timeout=0.25).not_done)


class _CallbackThread:
    """Runs joblib's completion callbacks in order on one thread of the backend.

    Started by ``configure``, stopped by ``terminate``; a callback that arrives while stopped
    (a batch of an aborted call finishing late) runs where it arrives: joblib ignores it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._queue = queue.SimpleQueue()
            self._thread = threading.Thread(target=_run_callbacks, args=(self._queue,),
                                            name="distexec-joblib-callbacks", daemon=True)
            self._thread.start()

    def call_soon(self, fn: Callable[[Any], Any], arg: Any) -> None:
        with self._lock:
            target = self._queue
            if target is not None:
                target.put((fn, arg))
                return
        _call_logged(fn, arg)

    def stop(self) -> None:
        with self._lock:
            thread, target = self._thread, self._queue
            self._thread = self._queue = None
        if thread is None or target is None:
            return
        target.put(None)
        if thread is not threading.current_thread():
            thread.join()


def _run_callbacks(callbacks: queue.SimpleQueue) -> None:
    while (item := callbacks.get()) is not None:
        _call_logged(*item)


def _call_logged(fn: Callable[[Any], Any], arg: Any) -> None:
    try:
        fn(arg)
    except BaseException:  # joblib's callback records errors itself; this is a last resort
        log.exception("error in a joblib completion callback")


_joblib_hook.register(joblib)
