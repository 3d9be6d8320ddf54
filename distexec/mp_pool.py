"""Pool: ``multiprocessing.Pool``'s interface on distexec workers.

Owns the pool's states (RUN, then CLOSE or TERMINATE, with multiprocessing's names), how its
calls become tasks of a ``DistributedExecutor`` (``apply_async``: one task; the maps: one task
per chunk, run on the worker by ``_mapstar`` or ``_starmapstar``), feeding imap inputs,
errors as multiprocessing shows them, and the one thread that runs callbacks. The result
objects are ``distexec.mp_results``'; workers, queueing, load balancing, the initializer and
``maxtasksperchild`` are the executor's. Imports ``distexec.mp_results``,
``distexec.executor`` and below, and ``multiprocessing.pool`` for the exception types its
users catch.

    apply_async ──► submit(fn, *args) ────────────────────────┐
    map_async ────► chunks ──► submit(_mapstar, fn, chunk) ───┤  now, in the caller
    imap ─────────► chunks ──► submit(_mapstar, fn, chunk) ───┤  on a feeder thread, as the
                                                              │  input yields them
                                                              ▼
    a future completes (in a distexec thread) ──► result._set(i, outcome)
                     └─ the result has a callback ──► the callback thread runs _set, so
                        callbacks run one at a time (multiprocessing's result handler)
    close ──► no new calls;  join ──► inputs fed, every result set, the executor shut down
    terminate ──► executor.terminate_workers(): running tasks stop; unfinished results fail
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import functools
import itertools
import pickle
import threading
import types
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from multiprocessing import TimeoutError
from multiprocessing.pool import (  # type: ignore[attr-defined]  # not in typeshed's stubs
    CLOSE, INIT, RUN, TERMINATE, MaybeEncodingError, RemoteTraceback)
from typing import TYPE_CHECKING, Any

from .errors import BrokenDistributedExecutor, ResultPicklingError
from .executor import DistributedExecutor
from .executor_futures import RemoteTraceback as _RemoteTraceback
from .mp_results import (ApplyResult, AsyncResult, IMapIterator, IMapUnorderedIterator, MapResult,
                         Outcome)

if TYPE_CHECKING:  # annotations only
    from .cluster.manager import ClusterManager
    from .pools import AbstractWorkerPool

__all__ = ["Pool", "AsyncResult", "ApplyResult", "MapResult", "IMapIterator",
           "IMapUnorderedIterator", "TimeoutError"]

_NO_KWDS: Mapping[str, Any] = types.MappingProxyType({})
#: imap: tasks per worker submitted ahead of their results; bounded for endless inputs, and
#: enough of a backlog for the executor to batch short tasks.
FEED_AHEAD = 256


# -- run on the workers: one chunk of a map is one task -------------------------------------
def _mapstar(fn: Callable, chunk: tuple) -> list:
    return list(map(fn, chunk))


def _starmapstar(fn: Callable, chunk: tuple) -> list:
    return list(itertools.starmap(fn, chunk))


def _chunks(iterable: Iterable, size: int) -> Iterator[tuple]:
    it = iter(iterable)
    while chunk := tuple(itertools.islice(it, size)):
        yield chunk


# -- outcomes ----------------------------------------------------------------------------------
class _UnsendableResult(MaybeEncodingError, pickle.PicklingError):
    """A result that could not be pickled back: multiprocessing's ``MaybeEncodingError``,
    and also the ``pickle.PicklingError`` the executor raises in that case."""


def _pool_error(exc: BaseException) -> BaseException:
    """The exception as ``multiprocessing.Pool`` shows it.

    The remote traceback text becomes a ``multiprocessing.pool.RemoteTraceback`` cause, and
    a result that could not be sent back a ``MaybeEncodingError``.
    """
    cause = exc.__cause__
    if isinstance(cause, _RemoteTraceback):
        exc.__cause__ = RemoteTraceback(cause.tb)
    if isinstance(exc, ResultPicklingError):
        wrapped = _UnsendableResult(exc, None)
        wrapped.value = f"<{exc.type_name} object>"  # the value itself never left the worker
        wrapped.__cause__ = exc.__cause__
        return wrapped
    return exc


def _check_call_arguments(fn: Callable, args: Any, kwds: Any) -> None:
    """The TypeError ``fn(*args, **kwds)`` raises on a worker of ``multiprocessing.Pool`` when
    ``args`` is no iterable or ``kwds`` no mapping (here it would name ``submit`` instead)."""
    if not isinstance(args, Iterable):
        raise TypeError(f"{_function_str(fn)} argument after * must be an iterable, not "
                        f"{type(args).__name__}")
    if not hasattr(kwds, "keys"):  # (what Python's ** asks of a mapping)
        raise TypeError(f"{_function_str(fn)} argument after ** must be a mapping, not "
                        f"{type(kwds).__name__}")


def _function_str(fn: Callable) -> str:
    """How Python names a function in a call's error: ``module.qualname()``."""
    qualname = getattr(fn, "__qualname__", None)
    if not isinstance(qualname, str):
        return f"{type(fn).__name__} object"
    module = getattr(fn, "__module__", None)
    return f"{module}.{qualname}()" if module not in (None, "builtins") else f"{qualname}()"


def _outcome(future: cf.Future) -> Outcome:
    if future.cancelled():
        return False, cf.CancelledError("the task was cancelled")
    exc = future.exception()
    if exc is None:
        return True, future.result()
    return False, _pool_error(exc)


def _terminated() -> BrokenDistributedExecutor:
    return BrokenDistributedExecutor("the pool was terminated before this result was ready")


# -- the callback thread -----------------------------------------------------------------------
class _CallbackThread:
    """Runs the completions of results that have callbacks, one at a time, in order.

    multiprocessing runs every callback on its one result-handler thread, so user callbacks
    never run concurrently; code relies on that (an unprotected counter, a list appended to).
    Started on first use.
    """

    def __init__(self) -> None:
        self._queue: collections.deque[Callable[[], None] | None] = collections.deque()
        self._ready = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        self._stopped = False

    def run(self, step: Callable[[], None]) -> None:
        with self._ready:
            if self._stopped:
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, daemon=True,
                                                name="distexec-pool-callbacks")
                self._thread.start()
            self._queue.append(step)
            self._ready.notify()

    def stop(self, wait: bool) -> None:
        """Run what is queued, then end; ``wait``: until it has ended."""
        with self._ready:
            self._stopped = True
            self._queue.append(None)
            self._ready.notify()
            thread = self._thread
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join()

    def _loop(self) -> None:
        while True:
            with self._ready:
                self._ready.wait_for(lambda: self._queue)
                step = self._queue.popleft()
            if step is None:
                return
            step()
            step = None  # nothing of a finished result stays referenced while waiting


def _release(executor: DistributedExecutor, callbacks: _CallbackThread) -> None:
    """A pool dropped without close or terminate: its workers go once its tasks are done.

    By then no task is pending: every pending task's future refers to the pool.
    """
    callbacks.stop(wait=False)
    executor.shutdown(wait=False)


# -- the pool ----------------------------------------------------------------------------------
class Pool:
    """A ``multiprocessing.Pool`` whose workers are distexec workers.

    Change the import (``from distexec import Pool``) and the rest of the code stays: the
    methods, their arguments, chunk sizes, callbacks, results, timeouts and errors are
    multiprocessing's. Tasks run as a ``DistributedExecutor`` runs them (one at a time on a
    worker's main thread); a map runs as one task per chunk.

    Args:
        processes: local workers to start; ``None``: ``os.cpu_count()``. Ignored with
            ``manager`` or ``pool``.
        initializer: ``initializer(*initargs)`` runs on every worker before its first task
            (also on workers that replace retired ones); it must pickle.
        initargs: its arguments.
        maxtasksperchild: retire a worker after this many tasks (a map chunk is one task) and
            start a replacement; ``None``: workers live as long as the pool.
        context: accepted for compatibility and ignored: workers are always fresh
            interpreters (``python -m distexec worker``), never forked.
        manager: start the workers through this ``ClusterManager`` (``SSHManager``,
            ``SlurmManager``, ...) instead of on this machine.
        pool: run on the workers of this ``WorkerPool`` without owning them: ``close``,
            ``join`` and ``terminate`` never stop them, and ``terminate`` lets their running
            tasks finish.
        **addprocs_params: how to start the workers, as for ``DistributedExecutor``:
            ``env``, ``dir``, ``exeflags``, ``security``, ``sshflags`` (with an SSH
            manager), ...; an unknown keyword is a ``TypeError``.

    Raises:
        ValueError: ``processes < 1``, or ``maxtasksperchild`` is not a positive int.
        TypeError: ``initializer`` is not callable, or it or ``initargs`` cannot be pickled.
    """

    def __init__(self, processes: int | None = None, initializer: Callable | None = None,
                 initargs: Iterable[Any] = (), maxtasksperchild: int | None = None,
                 context: Any = None, *, manager: ClusterManager | None = None,
                 pool: AbstractWorkerPool | None = None, **addprocs_params: Any) -> None:
        self._state = INIT  # __del__ reads it even when __init__ raises
        if processes is not None and processes < 1:
            raise ValueError("Number of processes must be at least 1")
        if maxtasksperchild is not None and (not isinstance(maxtasksperchild, int)
                                             or maxtasksperchild <= 0):
            raise ValueError("maxtasksperchild must be a positive int or None")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        self._cond = threading.Condition()
        self._cache: dict[int, ApplyResult | IMapIterator] = {}  # unfinished, by id()
        self._feeders = 0  # imap inputs still being read
        self._callbacks = _CallbackThread()
        self._owns_workers = pool is None
        self._executor = DistributedExecutor(
            processes, None, initializer, tuple(initargs),
            max_tasks_per_child=None if maxtasksperchild is None else int(maxtasksperchild),
            manager=manager, pool=pool, **addprocs_params)
        self._finalizer = weakref.finalize(self, _release, self._executor, self._callbacks)
        self._finalizer.atexit = False  # at exit the executor finishes and the cluster ends
        self._state = RUN

    def __del__(self, _warn=warnings.warn, RUN=RUN) -> None:
        if getattr(self, "_state", None) == RUN:
            _warn(f"unclosed running multiprocessing pool {self!r}", ResourceWarning,
                  source=self)

    def __repr__(self) -> str:
        executor = getattr(self, "_executor", None)
        size = len(executor.workers()) if executor is not None else 0
        return (f"<{type(self).__module__}.{type(self).__qualname__} state={self._state} "
                f"pool_size={size}>")

    def __reduce__(self):
        raise NotImplementedError("pool objects cannot be passed between processes or pickled")

    def __enter__(self) -> Pool:
        self._check_running()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.terminate()

    # -- calls -----------------------------------------------------------------------------
    def apply(self, func: Callable, args: Iterable[Any] = (),
              kwds: Mapping[str, Any] = _NO_KWDS) -> Any:
        """``func(*args, **kwds)`` on a worker; returns its value or raises its exception."""
        return self.apply_async(func, args, kwds).get()

    def apply_async(self, func: Callable, args: Iterable[Any] = (),
                    kwds: Mapping[str, Any] = _NO_KWDS, callback: Callable | None = None,
                    error_callback: Callable | None = None) -> ApplyResult:
        """Start ``func(*args, **kwds)`` on a worker; returns an ``AsyncResult``.

        ``callback(value)`` or ``error_callback(exception)`` runs when it completes, on the
        pool's callback thread (one callback at a time), before the result is ready.
        """
        self._check_running()
        result = ApplyResult(self, callback, error_callback)
        future = self._submit(result, 0, func, args, kwds)
        if self._owns_workers:  # terminate completes it: get() may wait on it (fast path)
            result._future = future
        return result

    def map(self, func: Callable, iterable: Iterable[Any], chunksize: int | None = None) -> list:
        """``[func(x) for x in iterable]``, computed in chunks on the workers."""
        return self._map_async(func, iterable, _mapstar, chunksize).get()

    def map_async(self, func: Callable, iterable: Iterable[Any], chunksize: int | None = None,
                  callback: Callable | None = None,
                  error_callback: Callable | None = None) -> MapResult:
        """Like ``map``; returns an ``AsyncResult`` whose value is the list."""
        return self._map_async(func, iterable, _mapstar, chunksize, callback, error_callback)

    def starmap(self, func: Callable, iterable: Iterable[Iterable[Any]],
                chunksize: int | None = None) -> list:
        """``[func(*args) for args in iterable]``, computed in chunks on the workers."""
        return self._map_async(func, iterable, _starmapstar, chunksize).get()

    def starmap_async(self, func: Callable, iterable: Iterable[Iterable[Any]],
                      chunksize: int | None = None, callback: Callable | None = None,
                      error_callback: Callable | None = None) -> MapResult:
        """Like ``starmap``; returns an ``AsyncResult`` whose value is the list."""
        return self._map_async(func, iterable, _starmapstar, chunksize, callback,
                               error_callback)

    def imap(self, func: Callable, iterable: Iterable[Any], chunksize: int = 1) -> IMapIterator:
        """An iterator of ``func(x)`` in input order, each yielded as soon as it is there.

        The input is read on a thread of its own as fast as it yields; ``next(timeout)``
        on the iterator raises ``multiprocessing.TimeoutError``.
        """
        self._check_running()
        if chunksize < 1:
            raise ValueError("Chunksize must be 1+, not {0:n}".format(chunksize))
        return self._imap(IMapIterator, func, iterable, chunksize)

    def imap_unordered(self, func: Callable, iterable: Iterable[Any],
                       chunksize: int = 1) -> IMapIterator:
        """Like ``imap``, yielding the results in the order they finish."""
        self._check_running()
        if chunksize < 1:
            raise ValueError("Chunksize must be 1+, not {0!r}".format(chunksize))
        return self._imap(IMapUnorderedIterator, func, iterable, chunksize)

    # -- life cycle ------------------------------------------------------------------------
    def close(self) -> None:
        """Accept no more calls; the workers go once the submitted work is done."""
        with self._cond:
            if self._state != RUN:
                return
            self._state = CLOSE
            feeding = self._feeders
        if not feeding:
            self._executor.shutdown(wait=False)

    def terminate(self) -> None:
        """Stop now: running tasks are stopped (their workers terminated), queued ones
        dropped, and unfinished results fail with ``BrokenDistributedExecutor``."""
        with self._cond:
            already = self._state == TERMINATE
            self._state = TERMINATE
            self._cond.notify_all()
        if already:
            return
        self._finalizer.detach()
        self._executor.terminate_workers()
        self._callbacks.stop(wait=True)
        with self._cond:
            unfinished = list(self._cache.values())
        for result in unfinished:
            result._abort(_terminated())
        if self._owns_workers:  # they were signalled: wait until they are gone
            self._executor.shutdown(wait=True)

    def join(self) -> None:
        """Wait for the work to finish and the workers to exit (after ``close`` or
        ``terminate``; ``ValueError`` before)."""
        if self._state == RUN:
            raise ValueError("Pool is still running")
        if self._state not in (CLOSE, TERMINATE):
            raise ValueError("In unknown state")
        with self._cond:
            self._cond.wait_for(lambda: self._state == TERMINATE
                                or (not self._feeders and not self._cache))
        self._finalizer.detach()
        self._callbacks.stop(wait=True)
        self._executor.shutdown(wait=True)

    # -- internals -------------------------------------------------------------------------
    def _check_running(self) -> None:
        if self._state != RUN:
            raise ValueError("Pool not running")

    def _remember(self, result: ApplyResult | IMapIterator) -> None:
        with self._cond:
            self._cache[id(result)] = result

    def _forget(self, result: ApplyResult | IMapIterator) -> None:
        with self._cond:
            self._cache.pop(id(result), None)
            if not self._cache:
                self._cond.notify_all()

    def _complete(self, result: ApplyResult | IMapIterator, step: Callable[[], None]) -> None:
        """Run ``step`` (which sets part of ``result``) here, or on the callback thread when
        the result has callbacks."""
        if result._serialized:
            self._callbacks.run(step)
        else:
            step()

    def _submit(self, result: ApplyResult | IMapIterator, i: int, fn: Callable,
                args: Iterable[Any], kwds: Mapping[str, Any]) -> cf.Future | None:
        """Submit one task whose outcome is part ``i`` of ``result``."""
        try:
            _check_call_arguments(fn, args, kwds)
            future = self._executor.submit(fn, *args, **kwds)
        except Exception as exc:  # e.g. args not iterable, or the executor is broken
            self._complete(result, functools.partial(result._set, i, (False, exc)))
            return None
        future.add_done_callback(functools.partial(self._task_done, result, i))
        return future

    def _task_done(self, result: ApplyResult | IMapIterator, i: int, future: cf.Future) -> None:
        if self._state == TERMINATE:
            return  # terminate fails the unfinished results itself, without callbacks
        self._complete(result, functools.partial(result._set, i, _outcome(future)))

    def _map_async(self, func: Callable, iterable: Iterable[Any], mapper: Callable,
                   chunksize: int | None = None, callback: Callable | None = None,
                   error_callback: Callable | None = None) -> MapResult:
        self._check_running()
        if not hasattr(iterable, "__len__"):
            iterable = list(iterable)
        length = len(iterable)  # type: ignore[arg-type]  # has __len__ (checked above)
        if chunksize is None:  # multiprocessing's: about four chunks per worker
            chunksize, extra = divmod(length, self._executor._max_workers * 4)
            if extra:
                chunksize += 1
        if length == 0:
            chunksize = 0
        # As in multiprocessing, chunksize <= 0 runs nothing: the list is [None] * length.
        planned = -(-length // chunksize) if chunksize > 0 else 0
        result = MapResult(self, chunksize, length, planned, callback, error_callback)
        submitted, error = 0, None
        if planned:
            try:
                for chunk in _chunks(iterable, chunksize):
                    self._submit(result, submitted, mapper, (func, chunk), _NO_KWDS)
                    submitted += 1
            except Exception as exc:  # the input raised: the outcome of the next chunk
                error = exc
        if submitted != planned or error is not None or not planned:
            self._complete(result, functools.partial(result._input_ended, submitted, error))
        return result

    def _imap(self, kind: type[IMapIterator], func: Callable, iterable: Iterable[Any],
              chunksize: int) -> IMapIterator:
        tasks: Iterator[tuple[Callable, tuple]]
        if chunksize == 1:
            result, tasks = kind(self), ((func, (x,)) for x in iterable)
        else:
            result = kind(self, chunked=True)
            tasks = ((_mapstar, (func, chunk)) for chunk in _chunks(iterable, chunksize))
        with self._cond:
            self._feeders += 1
        threading.Thread(target=self._feed, args=(result, tasks), daemon=True,
                         name="distexec-pool-imap").start()
        return result

    def _feed(self, result: IMapIterator, tasks: Iterator[tuple[Callable, tuple]]) -> None:
        """The imap feeder: submit each task as the input yields it, keeping a few per
        worker queued (an endless input must not flood the executor)."""
        submitted, limit = 0, FEED_AHEAD * self._executor._max_workers
        try:
            for fn, args in tasks:
                if not result._room(limit):
                    return  # terminated
                self._submit(result, submitted, fn, args, _NO_KWDS)
                submitted += 1
        except Exception as exc:  # the input raised: the outcome at this position
            if result._room(limit):
                result._set(submitted, (False, exc))
                submitted += 1
        finally:
            tasks = None  # type: ignore[assignment]  # the input is not kept
            result._set_length(submitted)
            self._feeder_done()

    def _feeder_done(self) -> None:
        with self._cond:
            self._feeders -= 1
            self._cond.notify_all()
            last_after_close = self._state == CLOSE and not self._feeders
        if last_after_close:
            self._executor.shutdown(wait=False)
