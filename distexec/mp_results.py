"""The results of ``distexec.Pool``'s calls: ``AsyncResult``, ``MapResult``, ``IMapIterator``.

Owns what multiprocessing's result objects promise their users: ``get``/``wait``/``ready``/
``successful``, a map's list assembled from its chunks (ready once every chunk has finished,
failed with the first error), the imap iterators with ``next(timeout)``, and the callback
running before a result becomes ready. The pool (``distexec.mp_pool``) sets their parts as
tasks complete, and fails them when it is terminated. Imports nothing from ``distexec``
(the pool is passed in).

    pool: task i done ──► result._set(i, (success, value)) ──► complete? ──► callback
                                                                  └─► ready; pool._forget
    pool: terminate ──► result._abort(error): ready with that error, no callback
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import logging
import threading
import types
from collections.abc import Callable
from multiprocessing import TimeoutError
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only
    from .mp_pool import Pool

__all__ = ["ApplyResult", "AsyncResult", "MapResult", "IMapIterator", "IMapUnorderedIterator",
           "Outcome"]

log = logging.getLogger("distexec")

Outcome = tuple[bool, Any]  # (success, value or exception), multiprocessing's pair


class ApplyResult:
    """The result of ``apply_async``: ``get``, ``wait``, ``ready``, ``successful``.

    ``AsyncResult`` is the same class, as in ``multiprocessing.pool``.
    """

    def __init__(self, pool: Pool, callback: Callable | None = None,
                 error_callback: Callable | None = None) -> None:
        self._pool: Pool | None = pool
        self._lock = threading.Lock()
        self._event = threading.Event()
        self._callback, self._error_callback = callback, error_callback
        self._serialized = callback is not None or error_callback is not None
        self._success = False
        self._value: Any = None
        self._future: cf.Future | None = None  # a single task: waiting reads its reply
        self._finished = False
        pool._remember(self)

    def ready(self) -> bool:
        """Whether the call has completed (and its callback, if any, has run)."""
        return self._event.is_set()

    def successful(self) -> bool:
        """Whether the call completed without raising; ``ValueError`` if it is not ready."""
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return self._success

    def wait(self, timeout: float | None = None) -> None:
        """Wait until the result is ready, or ``timeout`` seconds."""
        future = self._future
        if timeout is None and future is not None and not self._serialized:
            try:  # the executor's fast path: this thread reads the reply itself
                future.exception()
            except cf.CancelledError:
                pass
        self._event.wait(timeout)

    def get(self, timeout: float | None = None) -> Any:
        """The value; re-raises the call's exception; ``multiprocessing.TimeoutError`` when
        it is not ready within ``timeout`` seconds."""
        self.wait(timeout)
        if not self.ready():
            raise TimeoutError
        if self._success:
            return self._value
        raise self._value

    def _set(self, i: int, outcome: Outcome) -> None:
        with self._lock:
            if self._finished:
                return
            self._success, self._value = outcome
            self._finish(run_callbacks=True)

    def _abort(self, exc: BaseException) -> None:
        """Fail now, without callbacks (the pool was terminated)."""
        with self._lock:
            if not self._finished:
                self._success, self._value = False, exc
                self._finish(run_callbacks=False)

    def _finish(self, run_callbacks: bool) -> None:
        """With the lock held: run the callback, then mark ready (multiprocessing's order)."""
        self._finished = True
        if run_callbacks:
            callback = self._callback if self._success else self._error_callback
            if callback is not None:
                try:
                    callback(self._value)
                except Exception:
                    log.exception("Exception in a Pool %s",
                                  "callback" if self._success else "error_callback")
        self._event.set()
        self._future = None
        pool, self._pool = self._pool, None
        if pool is not None:
            pool._forget(self)

    __class_getitem__ = classmethod(types.GenericAlias)  # type: ignore[var-annotated]


AsyncResult = ApplyResult


class MapResult(ApplyResult):
    """The result of ``map_async``/``starmap_async``: a list, ready once every chunk is.

    The first failed chunk's exception is the result, as in multiprocessing; it is ready only
    when every chunk has finished.
    """

    def __init__(self, pool: Pool, chunksize: int, length: int, chunks: int,
                 callback: Callable | None, error_callback: Callable | None) -> None:
        super().__init__(pool, callback, error_callback)
        self._success = True
        self._value = [None] * length
        self._chunksize = chunksize
        self._planned = self._left = chunks

    def _set(self, i: int, outcome: Outcome) -> None:
        success, value = outcome
        with self._lock:
            if self._finished:
                return
            if success and self._success:
                self._value[i * self._chunksize:(i + 1) * self._chunksize] = value
            elif not success and self._success:
                self._success, self._value = False, value
            self._left -= 1
            if self._left <= 0:
                self._finish(run_callbacks=True)

    def _input_ended(self, submitted: int, error: BaseException | None = None) -> None:
        """The input gave fewer chunks than planned: ``submitted`` were sent, and ``error``
        is what it raised while the next one was being made (that chunk's outcome)."""
        with self._lock:
            if self._finished:
                return
            self._left -= self._planned - submitted
            if error is not None and self._success:
                self._success, self._value = False, error
            if self._left <= 0:
                self._finish(run_callbacks=True)


class IMapIterator:
    """The iterator ``imap`` returns: results in input order as they arrive.

    ``next(timeout)`` raises ``multiprocessing.TimeoutError`` when the next result is not
    there within ``timeout`` seconds. With ``chunksize > 1`` it yields the items of each
    chunk in turn, and ends after the first chunk that failed (multiprocessing's iterator is
    then a generator over the chunks, which a raised exception ends); the tasks still run.
    """

    _ordered = True

    def __init__(self, pool: Pool, chunked: bool = False) -> None:
        self._pool: Pool | None = pool
        self._cond = threading.Condition(threading.Lock())
        self._items: collections.deque[Outcome] = collections.deque()
        self._unsorted: dict[int, Outcome] = {}
        self._index = 0  # outcomes received (in order, for imap)
        self._length: int | None = None  # tasks, once the input is exhausted
        self._chunked = chunked
        self._chunk: collections.deque = collections.deque()
        self._in_flight = 0  # tasks submitted and not back yet (the feeder keeps it bounded)
        self._aborted = False
        self._ended = False  # chunked: a chunk failed, and that was the last item
        self._serialized = False
        pool._remember(self)

    def __iter__(self) -> IMapIterator:
        return self

    def next(self, timeout: float | None = None) -> Any:
        """The next result; ``StopIteration`` at the end; ``multiprocessing.TimeoutError``."""
        if self._chunked and self._chunk:
            return self._chunk.popleft()
        if self._ended:
            raise StopIteration
        with self._cond:
            if not self._cond.wait_for(lambda: self._items or self._index == self._length,
                                       timeout):
                raise TimeoutError
            if not self._items:
                raise StopIteration
            success, value = self._items.popleft()
        if not success:
            self._ended = self._chunked
            raise value
        if not self._chunked:
            return value
        self._chunk.extend(value)  # a chunk is never empty
        return self._chunk.popleft()

    __next__ = next

    def _set(self, i: int, outcome: Outcome) -> None:
        with self._cond:
            self._in_flight -= 1
            if self._aborted:
                return
            if not self._ordered or i == self._index:
                self._items.append(outcome)
                self._index += 1
                while self._index in self._unsorted:
                    self._items.append(self._unsorted.pop(self._index))
                    self._index += 1
            else:
                self._unsorted[i] = outcome
            self._cond.notify_all()  # a reader, and the feeder waiting for room
            finished = self._index == self._length
        if finished:
            self._finish()

    def _room(self, limit: int) -> bool:
        """For the feeder: wait until fewer than ``limit`` tasks are out, and count one more;
        False once the pool was terminated."""
        with self._cond:
            self._cond.wait_for(lambda: self._in_flight < limit or self._aborted)
            self._in_flight += 1
            return not self._aborted

    def _set_length(self, length: int) -> None:
        with self._cond:
            if self._aborted:
                return
            self._length = length
            self._cond.notify_all()
            finished = self._index == length
        if finished:
            self._finish()

    def _abort(self, exc: BaseException) -> None:
        with self._cond:
            if self._aborted or self._index == self._length:
                return
            self._aborted = True
            self._unsorted.clear()
            self._items.append((False, exc))
            self._index += 1
            self._length = self._index
            self._cond.notify_all()
        self._finish()

    def _finish(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool._forget(self)


class IMapUnorderedIterator(IMapIterator):
    """The iterator ``imap_unordered`` returns: results in the order they finish."""

    _ordered = False
