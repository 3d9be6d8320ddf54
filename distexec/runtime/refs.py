"""Remote references: Future and RemoteChannel, the handles a holder keeps.

Owns the client-side reference objects (identity, cache, (de)serialization, release); the
owner-side values and operations they name are ``runtime.owned``. Imports
``distexec.errors``, ``distexec.protocol`` and the sibling runtime modules.

    holder                                   owner (``where``)
    Future.fetch() ── call_fetch(_fetch_future) ──► waits on the write-once cell ──┐
          ◄──────────────────── (is_error, value) ──────────────────────────────────┘
    caches the value, releases its hold (GC) ──────► clientset -= {holder}; freed when empty
    remotecall's owner ── DONE(rrid) ──► creator's Future turns done (concurrent.futures.wait)

A reference pickled for another cluster process carries its identity (and a Future its cached
value); pickled anywhere else it becomes an inert null reference. An arriving reference is
de-duplicated against the ones this process already holds. Julia: ``Future``,
``RemoteChannel``, ``RemoteValue``, ``RRID``.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
import weakref
from concurrent.futures._base import CANCELLED_AND_NOTIFIED, FINISHED
from collections.abc import Iterator
from typing import Any, Callable, NoReturn

from ..errors import (ChannelClosedError, DistributedError, ProcessExitedException, WaitTimeout,
                      RemoteException)
from ..protocol.frames import RRID, NULL_RRID
from ..protocol import serialization
from . import gc
from .arguments import check_pid
from .channel import Channel
from .context import ClusterContext, current_context
from .owned import (_TimedOut, _Pickled, _channel_factory, _channel_op, _create_channel,
                    _fetch_future, _isready_future, _put_future, _wait_future, lookup)

_EMPTY = object()


def fail_futures_owned_by(ctx: ClusterContext, pid: int, exc: ProcessExitedException) -> None:
    """An owner died: its pending Futures held here become done with ``exc``."""
    for ref in [r() for r in ctx.client_refs.valuerefs()]:
        if isinstance(ref, Future) and ref.where == pid and ref._cache is _EMPTY:
            ref._mark_done(exc)


# --------------------------------------------------------------------------------------------
# Holder side
# --------------------------------------------------------------------------------------------
def _release(ctx_ref, owner: int, rrid: RRID, state: list) -> None:
    """Finalizer of a reference: queue its release (never blocks, never does I/O)."""
    ctx = ctx_ref()
    if ctx is None or not state[0] or ctx.closed:
        return
    state[0] = False
    ctx.gc.enqueue(owner, gc.DEL, rrid, ctx.myid)


class _RefBase:
    """Shared identity, registration and release of Future and RemoteChannel."""

    where: int
    rrid: RRID
    _finalizer: weakref.finalize  # releases the hold; a no-op for null references

    def _register(self, ctx: ClusterContext, where: int, rrid: RRID) -> None:
        self.where = where
        self.rrid = rrid
        self._ctx = ctx
        self._holds = [rrid != NULL_RRID]  # whether we still owe the owner a release
        self._released = False
        ctx.client_refs[rrid] = self
        self._finalizer = weakref.finalize(self, _release, weakref.ref(ctx), where, rrid,
                                           self._holds)

    @property
    def whence(self) -> int:
        return self.rrid.whence

    @property
    def id(self) -> int:
        return self.rrid.id

    def release(self) -> None:
        """Drop this process's hold on the remote value now (deterministic finalization).

        The reference is dead afterwards, as in Julia: anything that would need the owner
        raises DistributedError (it would otherwise bring back an empty value that nobody
        frees); a Future still answers from its cached value.
        """
        self._finalizer()
        self._released = True

    def _release_now(self) -> None:
        if self._holds[0]:
            self._holds[0] = False
            self._ctx.gc.enqueue(self.where, gc.DEL, self.rrid, self._ctx.myid)

    def _check_live(self) -> None:
        if self.rrid == NULL_RRID:
            raise DistributedError("null reference: it was pickled outside the cluster")
        if self._released:
            raise DistributedError(f"{self!r} was released")

    def _owner_call(self, fn, *args):
        """Run ``fn(*args)`` on the owner and return its value; errors as RemoteException."""
        from .calls import remotecall_fetch
        return remotecall_fetch(self._ctx, fn, self.where, args, {})

    def _note_forwarding(self) -> bool:
        """Before pickling for another process: make sure the owner counts the receiver."""
        dest = serialization.current_destination()
        if dest is None or self.rrid == NULL_RRID or self._released:
            return False
        if current_context() is not self._ctx:  # the private cluster of an executor on a worker
            raise DistributedError(f"a {type(self).__name__} can only be sent to processes of "
                                   "its cluster")
        if dest != self.where:
            self._ctx.gc.send_now(self.where, gc.ADD, self.rrid, dest)
        return True


_callbacks_log = logging.getLogger("concurrent.futures")


def invoke_callbacks_guarded(future: cf.Future) -> None:
    """Run ``future``'s done-callbacks, logging whatever they raise.

    Unlike ``concurrent.futures``, ``SystemExit`` and ``KeyboardInterrupt`` are caught too:
    futures complete on a connection's reader thread, which a callback must never end.
    """
    # A private list of concurrent.futures.Future, not in its type stubs.
    for callback in future._done_callbacks:  # type: ignore[attr-defined]
        try:
            callback(future)
        except BaseException:
            _callbacks_log.exception("exception calling callback for %r", future)


class Future(_RefBase, cf.Future):
    """A remote reference to a write-once value, and a ``concurrent.futures.Future``.

    The value stays on its owner (``where``) until fetched; ``fetch`` caches it locally and
    releases the owner's copy once every holder has fetched or dropped it. ``done()`` turns
    true when the creator hears the value exists, so ``concurrent.futures.wait`` and
    ``as_completed`` work on Futures returned by ``remotecall``.

    Julia: ``Future(pid)``.
    """

    def __init__(self, pid: int | None = None):
        cf.Future.__init__(self)
        ctx = current_context()
        where = ctx.myid if pid is None else check_pid(pid, "Future")
        self._cache = _EMPTY
        self._lock = threading.Lock()
        self._register(ctx, where, ctx.next_rrid())

    @classmethod
    def _existing(cls, ctx: ClusterContext, where: int, rrid: RRID, cached=_EMPTY) -> "Future":
        self = cls.__new__(cls)
        cf.Future.__init__(self)
        self._cache = _EMPTY
        self._lock = threading.Lock()
        self._register(ctx, where, rrid)
        if cached is not _EMPTY:
            self._set_cache(cached)
        return self

    def __repr__(self) -> str:
        state = "cached" if self._cache is not _EMPTY else self._state.lower()
        return f"Future(where={self.where}, whence={self.whence}, id={self.id}, {state})"

    def __hash__(self):
        return hash(self.rrid)

    def __eq__(self, other):
        return isinstance(other, Future) and other.rrid == self.rrid

    # -- concurrent.futures.Future -----------------------------------------------------------
    def cancel(self) -> bool:
        return False  # the call was sent when the Future was made: it cannot be withdrawn

    def result(self, timeout: float | None = None) -> Any:
        return self.fetch(timeout=timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        with self._condition:
            if self._state == FINISHED and self._exception is not None:
                return self._exception
        try:
            self.fetch(timeout=timeout)
        except (RemoteException, ProcessExitedException) as exc:
            return exc
        return None

    def _mark_done(self, exc: BaseException | None, value=_EMPTY) -> None:
        with self._condition:
            if self._state in (FINISHED, CANCELLED_AND_NOTIFIED):
                return
            self._exception = exc
            self._result = None if value is _EMPTY else value
            self._state = FINISHED
            for waiter in self._waiters:
                waiter.add_exception(self) if exc is not None else waiter.add_result(self)
            self._condition.notify_all()
        self._invoke_callbacks()

    def _invoke_callbacks(self) -> None:
        invoke_callbacks_guarded(self)

    def _set_cache(self, value: Any) -> bool:
        with self._lock:
            if self._cache is not _EMPTY:
                return False
            self._cache = value
        self._mark_done(None, value)
        return True

    # -- Julia API ---------------------------------------------------------------------------
    def fetch(self, timeout: float | None = None) -> Any:
        """Wait for the value and return it; cache it and release the owner's copy.

        ``timeout`` (seconds) raises TimeoutError when the value is not there in time.

        Raises RemoteException if the computation failed (nothing is cached then), and
        ProcessExitedException if the owner died first. Julia: ``fetch(::Future)``.
        """
        if self._cache is not _EMPTY:
            return self._cache
        self._check_live()
        is_error, value = self._from_owner(_fetch_future, timeout)
        if is_error:
            raise value
        self._set_cache(value)
        self._release_now()
        return self._cache

    def wait(self, timeout: float | None = None) -> "Future":
        """Block until the value exists (without fetching it). Julia: ``wait(::Future)``."""
        if self._cache is not _EMPTY:
            return self
        self._check_live()
        is_error, exc = self._from_owner(_wait_future, timeout)
        self._mark_done(exc if is_error else None)  # done() is true now, on any holder
        if is_error:
            raise exc
        return self

    def isready(self) -> bool:
        """Whether the value exists (asks the owner unless cached). Julia: ``isready``."""
        if self._cache is not _EMPTY:
            return True
        self._check_live()
        if self.where == self._ctx.myid:
            return _isready_future(self.rrid)
        return self._owner_call(_isready_future, self.rrid)

    def put(self, value: Any) -> "Future":
        """Set the value once. Julia: ``put!(::Future, v)``."""
        self._check_live()
        with self._lock:
            if self._cache is not _EMPTY:
                raise DistributedError("Future can be set only once")
            if self.where == self._ctx.myid:
                _put_future(self.rrid, value, self._ctx.myid)
            else:
                self._owner_call(_put_future, self.rrid, value, self._ctx.myid)
            self._holds[0] = False  # _put_future removed us from the client set
        self._set_cache(value)
        return self

    def take(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError("take is not supported on a Future (it is write-once); use fetch")

    def close(self) -> NoReturn:
        raise TypeError("close is not supported on a Future")

    def __getitem__(self, index: Any) -> Any:
        return self.fetch()[index]

    def _from_owner(self, fn, timeout):
        if self.where == self._ctx.myid:
            out = fn(self.rrid, timeout)
        else:
            out = self._owner_call(fn, self.rrid, timeout)
        if isinstance(out, _TimedOut):
            raise WaitTimeout(f"{self!r} not ready after {timeout} s")
        return out

    # -- pickling ----------------------------------------------------------------------------
    def __reduce__(self):
        cached = self._cache
        if serialization.current_destination() is None or self.rrid == NULL_RRID:
            return (_null_future, ())
        if cached is not _EMPTY:  # the value travels along: the owner need not count the receiver
            return (_rebuild_future, (self.where, self.rrid, True, cached))
        if not self._note_forwarding():  # released: arrives as dead as it left
            return (_null_future, ())
        return (_rebuild_future, (self.where, self.rrid))


def _null_future():
    ctx = current_context()
    fut = Future.__new__(Future)
    cf.Future.__init__(fut)
    fut._cache = _EMPTY
    fut._lock = threading.Lock()
    fut.where, fut.rrid, fut._ctx, fut._holds, fut._released = 0, NULL_RRID, ctx, [False], False
    fut._finalizer = weakref.finalize(fut, lambda: None)
    return fut


def _rebuild_future(where: int, rrid: RRID, has_value: bool = False, value=None):
    receiving = serialization.current_receiving()
    if receiving is None:
        return _null_future()
    ctx = receiving[0]
    existing = ctx.client_refs.get(rrid)
    if existing is not None:
        if has_value and existing._set_cache(value):
            existing._release_now()
        return existing
    fut = Future._existing(ctx, where, rrid, value if has_value else _EMPTY)
    if has_value:
        fut._holds[0] = False  # the value came along: the owner did not count us
    elif where == ctx.myid:
        gc.add_client(ctx, rrid, ctx.myid)
    return fut


class RemoteChannel(_RefBase):
    """A reference to a channel living on process ``pid``, usable from any process.

    Every operation runs on the owner. ``size`` is the capacity of the owner's channel
    (0 unbuffered, ``math.inf`` unbounded), created on first use; ``RemoteChannel(factory,
    pid)`` instead runs ``factory()`` on ``pid`` at once to make the channel.

    Julia: ``RemoteChannel(pid)``, ``RemoteChannel(() -> Channel(n), pid)``.
    """

    # ``size`` is the capacity (an int, or math.inf), or the pid in the factory form.
    def __init__(self, pid: int | Callable[[], Any] | None = None, size: Any = _EMPTY) -> None:
        ctx = current_context()
        factory = None
        if callable(pid):
            factory, pid, size = pid, (None if size is _EMPTY else size), 1
        elif size is _EMPTY:
            size = 1
        where = ctx.myid if pid is None else check_pid(pid, "RemoteChannel")
        if factory is None:
            Channel(size)  # validate the size here, in the caller, with a clear error
        self._register(ctx, where, ctx.next_rrid())
        self.size = size
        if factory is not None:
            self.size = self._on_owner(_create_channel, self.rrid, factory)

    def __repr__(self) -> str:
        return f"RemoteChannel(where={self.where}, whence={self.whence}, id={self.id})"

    def __hash__(self):
        return hash(self.rrid)

    def __eq__(self, other):
        return isinstance(other, RemoteChannel) and other.rrid == self.rrid

    def _on_owner(self, fn, *args):
        if self.where == self._ctx.myid:
            return fn(*args)
        return self._owner_call(fn, *args)

    def _op(self, op: str, *args, timeout: float | None = None):
        self._check_live()
        if op == "take" and self.where != self._ctx.myid:
            op, args = "take_remote", (self._ctx.myid,)
        out = self._on_owner(_channel_op, self.rrid, self.size, op, args, timeout)
        if isinstance(out, _TimedOut):
            raise WaitTimeout(f"{self!r}: {op.split('_')[0]} timed out after {timeout} s")
        return out

    def put(self, value: Any, timeout: float | None = None) -> "RemoteChannel":
        """Append a value, blocking while full. Julia: ``put!(::RemoteChannel, v)``."""
        self._op("put", value, timeout=timeout)
        return self

    def take(self, timeout: float | None = None) -> Any:
        """Remove and return the first value, blocking while empty. Julia: ``take!``."""
        value = self._op("take", timeout=timeout)
        if isinstance(value, _Pickled):
            value = value.load(self._ctx, self.where)
        if isinstance(value, RemoteException):
            raise value
        return value

    def fetch(self, timeout: float | None = None) -> Any:
        """Return the first value without removing it (never cached). Julia: ``fetch``."""
        return self._op("fetch", timeout=timeout)

    def isready(self) -> bool:
        return self._op("isready")

    def wait(self, timeout: float | None = None) -> "RemoteChannel":
        self._op("wait", timeout=timeout)
        return self

    def close(self) -> None:
        self._op("close")

    def isopen(self) -> bool:
        return self._op("isopen")

    def __len__(self) -> int:
        return self._op("len")

    def __bool__(self) -> bool:
        return True

    def __getitem__(self, index: Any) -> Any:
        self._check_live()
        return self._on_owner(_channel_index, self.rrid, self.size, index)

    def __iter__(self) -> Iterator[Any]:
        while True:
            try:
                yield self.take()
            except ChannelClosedError:
                return
            except RemoteException as exc:
                if isinstance(exc.captured.ex, ChannelClosedError):
                    return
                raise

    def __reduce__(self):
        if not self._note_forwarding():
            return (_null_channel, (self.size,))
        return (_rebuild_channel, (self.where, self.rrid, self.size))


def _channel_index(rrid: RRID, size, index):
    rv = lookup(current_context(), rrid, _channel_factory(size))
    return rv.store.fetch()[index]


def _null_channel(size=1):
    ch = RemoteChannel.__new__(RemoteChannel)
    ch.where, ch.rrid, ch._ctx, ch._holds, ch.size = 0, NULL_RRID, current_context(), [False], size
    ch._released = False
    ch._finalizer = weakref.finalize(ch, lambda: None)
    return ch


def _rebuild_channel(where: int, rrid: RRID, size):
    receiving = serialization.current_receiving()
    if receiving is None:
        return _null_channel(size)
    ctx = receiving[0]
    existing = ctx.client_refs.get(rrid)
    if existing is not None:
        return existing
    ch = RemoteChannel.__new__(RemoteChannel)
    ch._register(ctx, where, rrid)
    ch.size = size
    if where == ctx.myid:
        # Make the channel now, as Julia's deserialize does (lookup_ref): channel_from_id on
        # the owner then finds a channel that no operation has touched yet.
        with ctx.refs_lock:
            lookup(ctx, rrid, _channel_factory(size)).clientset.add(ctx.myid)
    return ch


def remoteref_id(ref: Future | RemoteChannel) -> RRID:
    """The ``RRID(whence, id)`` of a Future or RemoteChannel. Julia: ``remoteref_id``."""
    return ref.rrid


