"""Remote references: Future and RemoteChannel, and the owner-side values they point to.

Owns the client-side reference objects (identity, cache, (de)serialization, release) and the
owner-side operations on the values they name. Imports ``distexec.errors``,
``distexec.protocol`` and the sibling runtime modules.

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
import math
import threading
import time
import weakref
from concurrent.futures._base import CANCELLED_AND_NOTIFIED, FINISHED
from collections.abc import Iterator
from typing import Any, Callable, NoReturn

from ..errors import (ChannelClosedError, DistributedError, ProcessExitedException, WaitTimeout,
                      RemoteException)
from ..protocol.frames import RRID, NULL_RRID
from ..protocol import serialization
from . import gc
from .channel import Channel
from .context import ClusterContext, current_context

_EMPTY = object()


class _TimedOut:
    """What an owner returns when a wait timed out: the holder raises TimeoutError itself.

    A TimeoutError raised on the owner would reach a remote holder wrapped in a
    RemoteException; a marker class (unlike a marker value) cannot collide with user data.
    """


_TIMED_OUT = _TimedOut()


# --------------------------------------------------------------------------------------------
# Owner side
# --------------------------------------------------------------------------------------------
class _Cell:
    """The owner's write-once slot behind a Future. Julia: the Future's ``Channel(1)``."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.ready = False
        self.value: Any = None
        self.is_error = False

    def put(self, value: Any, is_error: bool = False) -> None:
        with self._cond:
            if self.ready:
                raise DistributedError("Future can be set only once")
            self.value, self.is_error, self.ready = value, is_error, True
            self._cond.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.ready, timeout)


class RemoteValue:
    """An owned value and the set of pids holding references to it."""

    __slots__ = ("store", "clientset", "synctake", "__weakref__")

    def __init__(self, store):
        self.store = store
        self.clientset: set[int] = set()
        self.synctake = threading.Lock() if isinstance(store, Channel) and store.size == 0 else None


def lookup(ctx: ClusterContext, rrid: RRID, factory: Callable[[], Any]) -> RemoteValue:
    """The value ``rrid`` names, created (held by its creator) on first lookup."""
    with ctx.refs_lock:
        rv = ctx.refs.get(rrid)
        if rv is None:
            rv = RemoteValue(factory())
            rv.clientset.add(rrid.whence)
            ctx.refs[rrid] = rv
        elif isinstance(rv.store, _Placeholder):
            rv.store = factory()
            rv.synctake = (threading.Lock() if isinstance(rv.store, Channel) and rv.store.size == 0
                           else None)
        return rv


class _Placeholder:
    """Storage not yet known: a client notice arrived before the first operation."""


def lookup_existing_or_placeholder(ctx: ClusterContext, rrid: RRID) -> RemoteValue:
    rv = ctx.refs.get(rrid)
    if rv is None:
        rv = RemoteValue(_Placeholder())
        rv.clientset.add(rrid.whence)
        ctx.refs[rrid] = rv
    return rv


def store_result(ctx: ClusterContext, rrid: RRID, value: Any, is_error: bool, *,
                 notify: bool = True) -> None:
    """Owner side of ``remotecall``: keep the result; tell the creator it is done.

    The entry was made when the call arrived; if every holder has released it since, nobody
    can ever fetch the result and it is dropped.
    """
    with ctx.refs_lock:
        rv = ctx.refs.get(rrid)
    if rv is None:
        return
    if isinstance(rv.store, _Placeholder):
        rv = lookup(ctx, rrid, _Cell)
    rv.store.put(value, is_error)
    if notify:
        notify_done(ctx, rrid, value if is_error else None, is_error)


def notify_done(ctx: ClusterContext, rrid: RRID, exc: Any, is_error: bool) -> None:
    from ..protocol.frames import Flag, Kind
    if rrid.whence == ctx.myid:
        future = ctx.client_refs.get(rrid)
        if future is not None:
            future._mark_done(exc if is_error else None)
        return
    record = ctx.record(rrid.whence)
    if record is None or record.conn is None:
        return  # the creator is gone or not linked to us; it learns on fetch
    flags = Flag.ERROR if is_error else Flag.NO_VALUE
    try:
        ctx.send(rrid.whence, Kind.DONE, exc if is_error else None, flags=flags, response=rrid)
    except Exception:  # the creator may be gone; the value stays for whoever fetches it
        pass


def _fetch_future(rrid: RRID, timeout: float | None):
    rv = lookup(current_context(), rrid, _Cell)
    if not rv.store.wait(timeout):
        return _TIMED_OUT
    return (rv.store.is_error, rv.store.value)


def _wait_future(rrid: RRID, timeout: float | None):
    rv = lookup(current_context(), rrid, _Cell)
    if not rv.store.wait(timeout):
        return _TIMED_OUT
    return (rv.store.is_error, rv.store.value if rv.store.is_error else None)


def _isready_future(rrid: RRID) -> bool:
    return lookup(current_context(), rrid, _Cell).store.ready


def _put_future(rrid: RRID, value: Any, putter: int) -> None:
    ctx = current_context()
    lookup(ctx, rrid, _Cell).store.put(value)
    gc.del_client(ctx, rrid, putter)
    if putter != rrid.whence:
        notify_done(ctx, rrid, None, False)


def _channel_factory(size):
    return lambda: Channel(size)


def _channel_op(rrid: RRID, size, op: str, args: tuple, timeout: float | None):
    """Run one channel operation on the owner (called remotely or locally).

    A timeout comes back as ``_TIMED_OUT`` so that every holder raises a plain TimeoutError.
    """
    try:
        return _run_channel_op(rrid, size, op, args, timeout)
    except TimeoutError:
        if timeout is None:
            raise  # not our deadline: a user channel's own error
        return _TIMED_OUT


def _run_channel_op(rrid: RRID, size, op: str, args: tuple, timeout: float | None):
    ctx = current_context()
    rv = lookup(ctx, rrid, _channel_factory(size))
    chan: Channel = rv.store
    if op == "put":
        chan.put(args[0], timeout=timeout)
        if rv.synctake is not None:
            with rv.synctake:  # unbuffered: return only once a remote taker's reply is pickled
                pass
        return None
    if op == "take_remote":
        if rv.synctake is not None:
            return _take_pickled(rv, chan, timeout, taker=args[0])
        op = "take"
    if op in ("take", "fetch", "wait"):
        result = getattr(chan, op)(timeout=timeout)
        return None if op == "wait" else result
    if op == "close":
        return chan.close()
    if op == "len":
        return len(chan)
    return getattr(chan, op)()


class _Pickled:
    """A value taken from an unbuffered channel, pickled on the owner for its remote taker.

    Pickled for the taker (references inside it travel as references, not null ones), with
    its out-of-band buffers copied: once the hand-over lock is released the putter may reuse
    the memory.
    """

    def __init__(self, value: Any, taker: int):
        self.payload, buffers = serialization.dumps(value, taker)
        self.buffers = [bytearray(b) for b in buffers]  # bytearrays travel out of band again

    def load(self, ctx: ClusterContext, owner: int) -> Any:
        with serialization.receiving(ctx, owner):
            return serialization.loads(self.payload, self.buffers)


def _take_pickled(rv: RemoteValue, chan: Channel, timeout, taker: int) -> _Pickled:
    """Take for a remote taker of an unbuffered channel (Julia #29932).

    The hand-over lock is held from the take until the value is pickled, so the owner-side
    putter (which takes the lock after its value was taken) returns only then. It is never
    held while waiting for a value: the next taker would then hold it while the previous
    putter waits for it, and that putter's next value never comes.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    assert rv.synctake is not None  # only unbuffered channels come here
    while True:
        chan.wait(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        with rv.synctake:
            try:
                value = chan.take(timeout=0)
            except TimeoutError:
                continue  # another taker was first: wait for the next value
            return _Pickled(value, taker)


def _create_channel(rrid: RRID, factory: Callable[[], Any]) -> int | float:
    ctx = current_context()
    store = factory()
    if not hasattr(store, "take") or not hasattr(store, "put"):
        raise TypeError("RemoteChannel factory must return a channel (an object with put/take)")
    with ctx.refs_lock:
        rv = lookup_existing_or_placeholder(ctx, rrid)
        rv.store = store
        rv.synctake = threading.Lock() if getattr(store, "size", 1) == 0 else None
    return getattr(store, "size", math.inf)


def forget_client(ctx: ClusterContext, pid: int) -> None:
    """A holder died: drop it from every client set (Julia ``deregister_worker``)."""
    with ctx.refs_lock:
        for rrid in [r for r, rv in ctx.refs.items() if pid in rv.clientset]:
            gc.del_client(ctx, rrid, pid)


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
        where = ctx.myid if pid is None else int(pid)
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
        where = ctx.myid if pid is None else int(pid)
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


def channel_from_id(rrid: RRID | tuple[int, int]) -> Any:
    """On the owner, the channel (or Future cell) behind ``rrid``. Julia: ``channel_from_id``."""
    ctx = current_context()
    with ctx.refs_lock:
        rv = ctx.refs.get(RRID(*rrid))
    if rv is None or isinstance(rv.store, _Placeholder):
        raise DistributedError("Local instance of remote reference not found")
    return rv.store


def owned_refs_count() -> int:
    """How many values this process owns now (its reference table's size).

    Lets tests and monitoring observe distributed GC from the outside, e.g.
    ``remotecall_fetch(owned_refs_count, pid)``. Julia: ``length(PGRP.refs)``.
    """
    ctx = current_context()
    with ctx.refs_lock:
        return len(ctx.refs)


def owned_clients(rrid) -> frozenset[int] | None:
    """The pids holding the value ``rrid`` names on this process (its owner); None if not owned.

    Julia: ``PGRP.refs[rrid].clientset``.
    """
    ctx = current_context()
    with ctx.refs_lock:
        rv = ctx.refs.get(RRID(*rrid))
        return None if rv is None else frozenset(rv.clientset)
