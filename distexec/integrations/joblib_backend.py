"""The joblib parallel backend ``"distexec"``: ``joblib.Parallel`` on distexec workers.

Owns :class:`DistexecBackend` and the window of generator calls. Imports joblib (this module
is only imported once joblib is: see :mod:`distexec.integrations._joblib_hook`, which ``import
distexec`` installs) and :mod:`distexec.executor`, :mod:`distexec.pools`, :mod:`distexec.api`
below it; its own workers are lent by :mod:`distexec.integrations._joblib_workers`.

    Parallel ──configure(n_jobs)──► the executor for this call:
                                      executor=ex given ─────────► ex (never shut down here)
                                      pool= given, or the cluster
                                      has workers ───────────────► an executor on n of them
                                      otherwise ─────────────────► the backend's own n workers,
                                                                   kept for the next call
    Parallel ──submit(batch, callback)──► executor.submit(batch) ──► worker
    worker's result ──► reader thread completes the future ──► callback thread ──► joblib's
        callback (records the result, dispatches the next batch: auto-batching)
    return_as="generator…" ──► at most WINDOW_PER_WORKER × n batches between the workers and
        the consumer: the others wait here until the consumer lets go of a batch's results
    a task fails ──► abort_everything: cancel the queued batches; interrupt the running
                     ones on the backend's own workers (when no other call shares them)
    end of the call ──► terminate: hand the workers back (they stay for the next call)

joblib's callbacks run on a thread of this backend, never on distexec's reader threads: they
dispatch the next batch, which pulls the user's iterator (any code, possibly a distexec call
whose reply that very reader thread would have to read).

joblib dispatches a new batch each time one completes, whether or not anyone consumed the
results, so a generator whose consumer is slower than the workers would hold every result
in this process. The window bounds that: a batch counts until joblib drops its result list
(the consumer has moved past it), until it fails, or until it is cancelled.

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
import weakref
from collections import deque
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
from ..pools import AbstractWorkerPool, WorkerPool
from . import _joblib_hook, _joblib_workers
from ._joblib_workers import shutdown_workers

__all__ = ["DistexecBackend", "register", "shutdown_workers"]

log = logging.getLogger("distexec")

ABORT_INTERRUPT_SECONDS = 2.0
"""How long an abort keeps interrupting this backend's workers while its batches still run."""

WINDOW_PER_WORKER = 2
"""Batches of a generator call allowed between the workers and the consumer, per worker: one
running and one done or on its way (joblib's default ``pre_dispatch="2*n_jobs"``)."""


def register() -> None:
    """Register the backend as ``"distexec"`` (``import distexec`` already does this)."""
    _joblib_hook.register(joblib)


class DistexecBackend(AutoBatchingMixin, ParallelBackendBase):
    """joblib's ``Parallel`` on distexec workers: ``parallel_config(backend="distexec")``.

    Args:
        executor: a :class:`DistributedExecutor` to run on; it is left running after the
            call.
        pool: a :class:`~distexec.WorkerPool` whose workers to run on; they are left running.
        idle_worker_timeout: without ``executor`` or ``pool``, a call uses the workers the
            process's cluster already has (``addprocs``, ``distexec run -p N``), or else the
            backend's own ``n_jobs`` local workers. Those are kept for the next call (as
            loky keeps its workers) until they have been unused for this many seconds
            (300 by default), until :func:`shutdown_workers`, or until the interpreter exits.
        nesting_level, inner_max_num_threads: joblib's usual backend arguments.

    ``n_jobs=-1`` means every CPU when this backend uses its own workers, and every available
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
                 inner_max_num_threads=None, *, pool: AbstractWorkerPool | None = None,
                 idle_worker_timeout: float | None = None, **backend_kwargs):
        super().__init__(nesting_level=nesting_level,
                         inner_max_num_threads=inner_max_num_threads, **backend_kwargs)
        if executor is not None and pool is not None:
            raise TypeError("give the distexec backend an executor or a pool, not both")
        self._given = executor
        self._pool = pool
        self._idle_timeout = idle_worker_timeout
        self._executor: DistributedExecutor | None = executor
        self._view: DistributedExecutor | None = None  # on workers of a pool or the cluster
        self._lent: DistributedExecutor | None = None  # the backend's own, for this call
        self._window: _Window | None = None
        self._n = 1
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
        if capacity is None:  # the backend's own workers, counted the way joblib does
            return max(joblib.cpu_count() + 1 + n_jobs, 1) if n_jobs < 0 else n_jobs
        return max(capacity + 1 + n_jobs, 1) if n_jobs < 0 else min(n_jobs, capacity)

    def _capacity(self) -> int | None:
        """How many workers a call may use, or None when it has as many as it asks for."""
        if self._given is not None:
            return self._given._max_workers
        if self._pool is not None:
            return max(1, len(_members(self._pool)))
        if _on_worker():
            return None
        return len(self._cluster_workers()) or None

    def _cluster_workers(self) -> list[int]:
        """The process's workers, less the backend's own."""
        own = _joblib_workers.shared.worker_pids()
        return [p for p in api.procs() if p != 1 and p not in own]

    # -- lifecycle ---------------------------------------------------------------------------
    def configure(self, n_jobs: int | None = 1, parallel=None, prefer=None, require=None,
                  **backend_kwargs) -> int:
        if _on_worker():
            raise FallbackToBackend(ThreadingBackend(nesting_level=self.nesting_level))
        n = self._n = self.effective_n_jobs(n_jobs)
        self.parallel = parallel
        if n > 1:  # with 1, joblib runs the call here: no workers needed
            self._executor = self._executor_for(n)
            self._callbacks.start()
        return n

    def _executor_for(self, n: int) -> DistributedExecutor:
        self._hand_back()
        if self._given is not None:
            return self._given
        if self._pool is not None:
            shared = _members(self._pool)
            if not shared:
                raise ValueError("the pool given to the distexec backend has no workers")
        else:
            shared = self._cluster_workers()
        if shared:
            self._view = DistributedExecutor(pool=WorkerPool(shared[:n]))
            return self._view
        idle = self._idle_timeout
        self._lent = _joblib_workers.shared.acquire(
            n, _joblib_workers.IDLE_WORKER_TIMEOUT if idle is None else idle)
        return self._lent

    def start_call(self) -> None:
        # A window of an earlier call still being consumed is left as it is: its batches
        # keep going through it.
        parallel = getattr(self, "parallel", None)
        generator = getattr(parallel, "return_generator", False) and self._executor is not None
        self._window = _Window(WINDOW_PER_WORKER * self._n, self._send) if generator else None

    def stop_call(self) -> None:
        self._close_window()

    def terminate(self) -> None:
        self._close_window()
        self._hand_back()
        self._executor = self._given
        self._callbacks.stop()
        self.reset_batch_stats()

    def _hand_back(self) -> None:
        """End this backend's use of the executor it chose: the given one stays as it is."""
        view, self._view = self._view, None
        lent, self._lent = self._lent, None
        if view is not None:  # on someone else's workers: shutting it down leaves them
            view.shutdown(wait=True, cancel_futures=True)
        if lent is not None:
            _joblib_workers.shared.release(lent)
        with self._lock:
            self._futures.clear()

    def _close_window(self) -> None:
        window, self._window = self._window, None
        if window is not None:
            window.close()

    # -- running batches ---------------------------------------------------------------------
    def submit(self, func: Callable[[], Any], callback: Callable | None = None) -> cf.Future:
        """Run one joblib batch on a worker; ``callback(future)`` runs when it is done."""
        if self._executor is None:
            raise RuntimeError("the distexec joblib backend was used before configure()")
        window = self._window
        if window is not None:  # a generator call: the batch may wait for the consumer
            future = window.submit(func)
        else:
            future = self._send(func)
        if callback is not None:
            future.add_done_callback(lambda done: self._callbacks.call_soon(callback, done))
        return future

    apply_async = submit  # the name joblib 1.4 calls

    def _send(self, func: Callable[[], Any], proxy: cf.Future | None = None) -> cf.Future:
        """Submit ``func`` to the executor; with ``proxy``, its outcome goes there too."""
        executor = self._executor
        if executor is None:  # the call ended (terminate) while this batch waited
            raise RuntimeError("the distexec joblib backend was used before configure()")
        future = executor.submit(func)
        with self._lock:
            self._futures.add(future)
        future.add_done_callback(self._forget)
        if proxy is not None:
            future.add_done_callback(lambda done: _copy_outcome(done, proxy))
        return future

    def _forget(self, future: cf.Future) -> None:
        with self._lock:
            self._futures.discard(future)

    def retrieve_result_callback(self, out: cf.Future) -> Any:
        window = out.window if isinstance(out, _WindowFuture) else None
        if window is None:
            return out.result()
        try:
            result = out.result()
        except BaseException:
            window.passed()  # joblib aborts the call: the batch leaves the window
            raise
        if not isinstance(result, list):  # not a joblib batch: nothing to watch
            window.passed()
            return result
        return window.watch(result, self._callbacks)

    def retrieve_result(self, out: cf.Future, timeout: float | None = None) -> Any:
        return out.result(timeout)

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """Cancel the batches still queued; interrupt the running ones on our own workers.

        Workers this backend was given (an executor, a pool, the cluster's) may be running
        someone else's calls too, so their running batches are left to finish; so are those
        of the backend's own workers while another call shares them.
        """
        window = self._window
        if window is not None:
            window.close()
        with self._lock:
            futures = list(self._futures)
        running = [f for f in futures if not f.cancel() and not f.done()]
        lent = self._lent
        if running and lent is not None and _joblib_workers.shared.calls(lent) == 1:
            _interrupt_until_done(lent, running, ABORT_INTERRUPT_SECONDS)

    # -- nesting -----------------------------------------------------------------------------
    def get_nested_backend(self):
        """Threads inside a worker's batch, then sequential one level deeper."""
        level = (self.nesting_level or 0) + 1
        if level > 1:
            return SequentialBackend(nesting_level=level), None
        return ThreadingBackend(nesting_level=level), None


class _WindowFuture(cf.Future):
    """The future joblib gets for a batch of a generator call: it knows the batch's window."""

    def __init__(self, window: _Window):
        super().__init__()
        self.window = window


class _Batch(list):
    """A batch's results as joblib holds them; when joblib lets go, the window moves on."""

    __slots__ = ("__weakref__",)


class _Window:
    """At most ``size`` batches of one generator call between the workers and the consumer.

    A batch enters when it is sent to the executor and leaves when joblib drops its result
    list (the consumer took its results and asked for more), when it fails, or when it is
    cancelled. Batches submitted while the window is full wait here, each behind the future
    joblib was given, and go in order as others leave.
    """

    def __init__(self, size: int, send: Callable[[Callable[[], Any], cf.Future], Any]):
        self._lock = threading.Lock()
        self._size = size
        self._inside = 0
        self._waiting: deque[tuple[Callable[[], Any], cf.Future]] = deque()
        self._send = send
        self._closed = False

    def submit(self, func: Callable[[], Any]) -> cf.Future:
        proxy = _WindowFuture(self)
        with self._lock:
            closed = self._closed
            enter = not closed and self._inside < self._size
            if enter:
                self._inside += 1
            elif not closed:
                self._waiting.append((func, proxy))
        if closed:  # the call is over or aborted: joblib ignores this batch
            proxy.cancel()
        elif enter:
            self._enter(func, proxy)
        return proxy

    def watch(self, results: list, callbacks: _CallbackThread) -> _Batch:
        """``results`` as a list whose release (on the consumer's thread, maybe under
        joblib's lock) lets the next batch in from the callback thread."""
        batch = _Batch(results)
        finalizer = weakref.finalize(batch, callbacks.call_soon, _let_next_in, self)
        finalizer.atexit = False  # at exit nothing more is sent
        return batch

    def passed(self) -> None:
        """A batch left the window: the next waiting one (if any) goes in."""
        with self._lock:
            self._inside -= 1
            if self._closed or not self._waiting or self._inside >= self._size:
                return
            func, proxy = self._waiting.popleft()
            self._inside += 1
        if proxy.cancelled():  # by joblib meanwhile: count it as gone through
            self.passed()
        else:
            self._enter(func, proxy)

    def _enter(self, func: Callable[[], Any], proxy: cf.Future) -> None:
        try:
            self._send(func, proxy)
        except BaseException as exc:  # the executor takes no more work (interpreter exit)
            self.close()  # the call fails with this batch's error: nothing else goes in
            try:
                proxy.set_exception(exc)
            except cf.InvalidStateError:  # cancelled meanwhile: joblib ignores it
                pass

    def close(self) -> None:
        """The call is over or aborted: cancel what still waits, let nothing else in."""
        with self._lock:
            self._closed = True
            waiting, self._waiting = list(self._waiting), deque()
        for _func, proxy in waiting:
            proxy.cancel()


def _let_next_in(window: _Window) -> None:
    window.passed()


def _copy_outcome(done: cf.Future, proxy: cf.Future) -> None:
    """Give ``proxy`` (the future joblib holds) the outcome of the executor's future."""
    try:
        if done.cancelled():
            proxy.cancel()
        elif (error := done.exception()) is not None:
            proxy.set_exception(error)
        else:
            proxy.set_result(done.result())
    except cf.InvalidStateError:  # cancelled by an abort meanwhile: joblib ignores it
        pass


def _on_worker() -> bool:
    return api.myid() != 1


def _members(pool: AbstractWorkerPool) -> list[int]:
    return [p for p in pool.workers() if p != 1]  # an empty default pool hands out pid 1


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
        del item  # the future and its results: not kept until the next callback arrives


def _call_logged(fn: Callable[[Any], Any], arg: Any) -> None:
    try:
        fn(arg)
    except BaseException:  # joblib's callback records errors itself; this is a last resort
        log.exception("error in a joblib completion callback")


_joblib_hook.register(joblib)
