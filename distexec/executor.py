"""DistributedExecutor: the cluster as a ``concurrent.futures.Executor``.

Owns task queueing, load balancing over workers, the executor futures and their errors,
``map`` (chunks, deadlines, bounded lazy submission) and shutdown. Imports
``distexec.pools``, ``distexec.pmap``, ``distexec.cluster``, ``distexec.runtime`` and below.

    submit ──► queue ──► pump: a worker with a free slot (MAX_IN_FLIGHT per worker)
                          └─► one CALL_FETCH ──► RESULT ──► reader thread completes the future
    worker dies ──► only its in-flight futures fail (ProcessExitedException); the queue
                    goes on to the other workers
    shutdown ──► (cancel queued) ──► wait ──► remove the workers this executor launched
    interpreter exit ──► no new futures; wait for every executor's queued and running work
                         (before the cluster's own atexit hook removes the workers)
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import itertools
import logging
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import BrokenExecutor
from typing import Any

from .cluster import membership
from .cluster.local import LocalManager
from .errors import (ProcessExitedException, RemoteDeserializationError, RemoteException,
                     WaitTimeout)
from .pools import AbstractWorkerPool, WorkerPool
from .protocol import serialization
from .protocol.frames import Kind
from .runtime import calls
from .runtime.context import ClusterContext, current_context

__all__ = ["DistributedExecutor", "BrokenExecutor"]

log = logging.getLogger("concurrent.futures")

MAX_IN_FLIGHT = 2  # per worker: one running, one on its way, so a worker never waits for work

_interpreter_exiting = False
_live_executors: weakref.WeakSet[DistributedExecutor] = weakref.WeakSet()


def _python_exit() -> None:
    """At interpreter exit, like CPython's executors: refuse new work, finish the submitted work.

    Registered with ``threading._register_atexit`` (as ``concurrent.futures`` does), so it runs
    before every ``atexit`` hook: before the cluster's hook removes the workers, and before a
    user's hook that might still call ``submit``.
    """
    global _interpreter_exiting
    _interpreter_exiting = True
    for executor in list(_live_executors):
        executor._wait_idle()


try:
    threading._register_atexit(_python_exit)  # type: ignore[attr-defined]
except AttributeError:  # not CPython: the plain hook still runs before the cluster's
    import atexit
    atexit.register(_python_exit)


class _RemoteTraceback(Exception):
    """Carries the remote traceback text as the ``__cause__`` of a re-raised exception."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def original_exception(remote: RemoteException) -> BaseException:
    """The user's exception from a RemoteException, with the remote traceback attached.

    Frames come back through tblib; the text is the ``__cause__`` (it survives libraries
    that drop ``__traceback__``), and a note names the worker.
    """
    ex = remote.captured.ex
    if isinstance(ex, (RemoteDeserializationError, RemoteException)) or ex is None:
        return remote
    ex.__cause__ = _RemoteTraceback(f'\n"""\n{remote.captured.traceback_text.rstrip()}\n"""')
    note = f"(raised on worker {remote.pid})"
    notes = getattr(ex, "__notes__", None)
    if notes is None or note not in notes:
        try:
            ex.add_note(note)
        except AttributeError:  # Python 3.10: the exceptiongroup backport displays __notes__
            ex.__notes__ = [*(notes or ()), note]
    return ex


class _ExecutorFuture(cf.Future):
    """The executor's future: a stdlib Future that raises falsey exceptions too.

    Python < 3.14 tests the exception's truth in ``result()`` (gh-132063), so an exception
    whose ``__bool__`` or ``__len__`` says False made ``result()`` return None.
    """

    def _Future__get_result(self):  # the name-mangled private method result() calls
        if self._exception is not None:
            try:
                raise self._exception
            finally:
                self = None  # break the cycle through the exception's traceback
        return self._result

    if sys.version_info < (3, 11):  # 3.10: raise a timeout that is also the builtin one
        def result(self, timeout=None):
            try:
                return super().result(timeout)
            except cf.TimeoutError as exc:
                if self.done():
                    raise  # the task itself raised it
                raise WaitTimeout(*exc.args) from None

        def exception(self, timeout=None):
            try:
                return super().exception(timeout)
            except cf.TimeoutError as exc:
                raise WaitTimeout(*exc.args) from None


class _Task:
    __slots__ = ("future", "fn", "args", "kwargs")

    def __init__(self, future, fn, args, kwargs):
        self.future, self.fn, self.args, self.kwargs = future, fn, args, kwargs


class _TaskWaiter:
    """Receives one task's RESULT (in the reader thread) and completes its future."""

    __slots__ = ("waitingfor", "task", "executor")

    def __init__(self, executor: DistributedExecutor, pid: int, task: _Task):
        self.waitingfor, self.task, self.executor = pid, task, executor

    def deliver(self, value: Any, is_error: bool) -> None:
        future = self.task.future
        if is_error:
            future.set_exception(original_exception(value) if isinstance(value, RemoteException)
                                 else value)
        else:
            future.set_result(value)
        self.executor._task_done(self.waitingfor)

    def fail(self, exc: BaseException) -> None:
        self.task.future.set_exception(exc)
        self.executor._task_done(self.waitingfor)


class DistributedExecutor(cf.Executor):
    """A ``concurrent.futures.Executor`` whose tasks run on distexec workers.

    ``DistributedExecutor(4)`` launches four local workers that it owns;
    ``manager=SomeManager(...)`` launches through a cluster manager; ``pool=WorkerPool([...])``
    uses existing workers without owning them. ``shutdown()`` removes only what it launched.
    """

    def __init__(self, max_workers: int | None = None, *, pool: AbstractWorkerPool | None = None,
                 manager=None, initializer: Callable | None = None, initargs: tuple = (),
                 **addprocs_params):
        if max_workers is not None and (isinstance(max_workers, bool) or max_workers <= 0):
            raise ValueError("max_workers must be greater than 0")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        self._ctx: ClusterContext = current_context()
        self._lock = threading.Lock()
        self._queue: deque[_Task] = deque()
        self._in_flight: dict[int, int] = {}
        self._idle = threading.Condition(self._lock)
        self._shutdown = False
        self._broken: str | bool = False
        self._initializer, self._initargs = initializer, tuple(initargs)
        self._initialized = initializer is None
        self._initializing = False
        self._owned: list[int] = []
        self._release_lock = threading.Lock()
        self.pool = pool if pool is not None else self._launch(max_workers, manager,
                                                               addprocs_params)
        self._ctx.on_peer_lost.append(_lost_listener(self))
        _live_executors.add(self)

    def _launch(self, max_workers, manager, params) -> WorkerPool:
        if manager is None:
            manager = LocalManager(max_workers or _cpu_count(), params.pop("restrict", True))
            allowed = manager.default_addprocs_params()
            unknown = [name for name in params if name not in allowed]
            if unknown:
                raise ValueError(f"Invalid keyword argument {unknown[0]}")
        self._owned = membership.addprocs(self._ctx, manager, params)
        return WorkerPool(self._owned)

    # -- public API --------------------------------------------------------------------------
    @property
    def _max_workers(self) -> int:
        return max(1, len(self._targets()))

    def workers(self) -> list[int]:
        """The worker pids this executor sends tasks to."""
        return self._targets()

    def submit(self, fn, /, *args, **kwargs) -> cf.Future:
        """Schedule ``fn(*args, **kwargs)``; returns a ``concurrent.futures.Future``."""
        with self._lock:
            if self._broken:
                raise BrokenExecutor(self._broken)
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if _interpreter_exiting:
                raise RuntimeError("cannot schedule new futures after interpreter shutdown")
            future: cf.Future = _ExecutorFuture()
            self._queue.append(_Task(future, fn, args, kwargs))
            start_init = not self._initialized and not self._initializing
            self._initializing = self._initializing or start_init
        if start_init:
            threading.Thread(target=self._run_initializer, daemon=True,
                             name="distexec-initializer").start()
        self._pump()
        return future

    def map(self, fn, *iterables, timeout: float | None = None, chunksize: int = 1,
            buffersize: int | None = None, progress: bool = False) -> Iterator:
        """Like ``Executor.map``, with Python 3.14's ``buffersize`` on every Python.

        Without ``buffersize`` every input is submitted now; with it, at most ``buffersize``
        tasks (chunks) are outstanding and one more is submitted per result taken, so infinite
        iterables work. ``chunksize`` items travel as one message. ``timeout`` counts from
        this call. ``progress=True`` draws a tqdm bar when tqdm is installed.
        """
        if buffersize is not None and (isinstance(buffersize, bool)
                                       or not isinstance(buffersize, int)):
            raise TypeError("buffersize must be an integer or None")
        if buffersize is not None and buffersize < 1:
            raise ValueError("buffersize must be None or > 0")
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        deadline = None if timeout is None else time.monotonic() + timeout
        if chunksize == 1:
            results = _map_results(self, fn, zip(*iterables, strict=False), deadline, buffersize)
        else:
            chunks = _batched(zip(*iterables, strict=False), chunksize)
            results = _chain(_map_results(self, functools.partial(_process_chunk, fn), chunks,
                                          deadline, buffersize, splat=False))
        return _with_progress(results, progress, iterables)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            cancelled = list(self._queue) if cancel_futures else []
            if cancel_futures:
                self._queue.clear()
        for task in cancelled:
            task.future.cancel()
        if wait:
            self._wait_idle()
            self._release_workers()
        else:
            threading.Thread(target=self._finish_in_background, daemon=True,
                             name="distexec-shutdown").start()

    # -- dispatching -------------------------------------------------------------------------
    def _targets(self) -> list[int]:
        live = set(self._ctx.live_pids())
        return [p for p in self.pool.workers() if p in live]

    def _pump(self) -> None:
        """Send queued tasks to workers with a free slot, least loaded first."""
        while True:
            with self._lock:
                if not self._queue or not self._initialized or self._broken:
                    return
                targets = self._targets()
                if not targets:
                    doomed = self._mark_broken("all workers of this executor have exited")
                else:
                    doomed = None
                    pid = min(targets, key=lambda p: self._in_flight.get(p, 0))
                    if self._in_flight.get(pid, 0) >= MAX_IN_FLIGHT:
                        return
                    task = self._queue.popleft()
                    if not task.future.set_running_or_notify_cancel():
                        continue
                    self._in_flight[pid] = self._in_flight.get(pid, 0) + 1
            if doomed is not None:
                _fail_all(doomed, self._broken)
                return
            self._dispatch(pid, task)

    def _dispatch(self, pid: int, task: _Task) -> None:
        ctx = self._ctx
        if pid == ctx.myid:  # a pool that hands out the master itself
            ctx.runner.submit(lambda: self._run_here(pid, task))
            return
        try:
            payload, buffers = serialization.dumps((task.fn, task.args, task.kwargs), pid)
        except BaseException as exc:  # an argument that cannot be pickled fails this task only
            task.future.set_exception(exc)
            self._task_done(pid)
            return
        waiter, rrid = _TaskWaiter(self, pid, task), ctx.next_rrid()
        try:
            ctx.add_waiter(rrid, waiter)
            ctx.send(pid, Kind.CALL_FETCH, payload=payload, buffers=buffers, notify=rrid)
        except (ProcessExitedException, OSError):
            ctx.pop_waiter(rrid)  # it never reached the worker: another one runs it
            with self._lock:
                self._in_flight[pid] -= 1
                self._queue.appendleft(task)
            self._pump()

    def _run_here(self, pid: int, task: _Task) -> None:
        is_error, value = calls.invoke(self._ctx, task.fn, task.args, task.kwargs)
        _TaskWaiter(self, pid, task).deliver(value, is_error)

    def _task_done(self, pid: int) -> None:
        with self._lock:
            self._in_flight[pid] = self._in_flight.get(pid, 1) - 1
            if not self._queue and not any(self._in_flight.values()):
                self._idle.notify_all()
        self._pump()

    def _worker_lost(self, pid: int) -> None:
        with self._lock:
            self._in_flight.pop(pid, None)
        self._pump()  # queued work moves to the others (or the executor breaks if none is left)

    # -- initializer and breaking ------------------------------------------------------------
    def _run_initializer(self) -> None:
        futures = [calls.remotecall(self._ctx, self._initializer, pid, self._initargs, {})
                   for pid in self._targets()]
        for future in futures:
            try:
                future.wait()
            except BaseException as exc:
                text = (exc.captured.traceback_text if isinstance(exc, RemoteException)
                        else repr(exc))
                log.critical("Exception in initializer:\n%s", text)
                self._break("A worker's initializer failed; the executor is broken")
                return
        with self._lock:
            self._initialized = True
        self._pump()

    def _break(self, reason: str) -> None:
        with self._lock:
            doomed = self._mark_broken(reason)
        _fail_all(doomed, reason)

    def _mark_broken(self, reason: str) -> list[_Task]:
        """Called with the lock held; returns the queued tasks to fail outside it."""
        self._broken = reason
        doomed, self._queue = list(self._queue), deque()
        self._idle.notify_all()
        return doomed

    # -- shutting down -----------------------------------------------------------------------
    def _wait_idle(self) -> None:
        with self._lock:
            while (self._queue or any(self._in_flight.values())) and not self._broken:
                self._idle.wait()

    def _release_workers(self) -> None:
        # Under a lock: a shutdown(wait=True) that follows a shutdown(wait=False) still
        # running must return only once the workers are gone.
        with self._release_lock:
            owned, self._owned = self._owned, []
            alive = [p for p in owned if p in self._ctx.live_pids()]
            if alive:
                membership.rmprocs(self._ctx, alive, waitfor=None)

    def _finish_in_background(self) -> None:
        self._wait_idle()
        self._release_workers()


def _fail_all(tasks: list[_Task], reason: str) -> None:
    for task in tasks:
        if task.future.set_running_or_notify_cancel():
            task.future.set_exception(BrokenExecutor(reason))


def _lost_listener(executor: DistributedExecutor):
    ref = weakref.ref(executor)

    def on_lost(ctx, pid):
        target = ref()
        if target is None:
            ctx.on_peer_lost.remove(on_lost)
        else:
            target._worker_lost(pid)
    return on_lost


def _map_results(executor, fn, args_iter, deadline, buffersize, *, splat: bool = True):
    """Submit (eagerly, or ``buffersize`` ahead) and return a generator of results in order."""
    def submit(target, args):
        return target.submit(fn, *args) if splat else target.submit(fn, args)

    if buffersize:
        futures = deque(submit(executor, a) for a in itertools.islice(args_iter, buffersize))
    else:
        futures = deque(submit(executor, a) for a in args_iter)
    # Only a weak reference: a pending lazy map must not keep the executor alive.
    executor_ref = weakref.ref(executor)
    return _yield_results(futures, args_iter if buffersize else None, submit, executor_ref,
                          deadline)


def _yield_results(futures: deque, more, submit, executor_ref, deadline):
    try:
        while futures:
            target = executor_ref() if more is not None else None
            if target is not None:
                args = next(more, _END)
                if args is not _END:
                    futures.append(submit(target, args))
            del target
            timeout = None if deadline is None else deadline - time.monotonic()
            yield _result_or_cancel(futures.popleft(), timeout)  # keep no reference to it
    finally:
        for future in futures:
            future.cancel()


_END = object()


def _result_or_cancel(future: cf.Future, timeout: float | None):
    try:
        try:
            return future.result(timeout)
        finally:
            future.cancel()
    finally:
        del future  # break the cycle through the future's exception


def _process_chunk(fn, chunk):
    return [fn(*args) for args in chunk]


def _batched(iterable, size: int):
    iterator = iter(iterable)
    while chunk := tuple(itertools.islice(iterator, size)):
        yield chunk


def _chain(chunk_results):
    for chunk in chunk_results:
        chunk.reverse()
        while chunk:
            yield chunk.pop()


def _with_progress(results, progress: bool, iterables):
    if not progress:
        return results
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return results
    try:
        total = min(len(it) for it in iterables)
    except TypeError:
        total = None
    return iter(tqdm(results, total=total))


def _cpu_count() -> int:
    import os
    return os.cpu_count() or 1
