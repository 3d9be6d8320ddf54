"""The values a process owns, behind the Futures and RemoteChannels others hold.

Owns the reference table's entries (``RemoteValue``: a write-once cell behind a Future, a
channel behind a RemoteChannel, and who holds each) and the operations a holder asks the
owner for. Imports ``distexec.errors``, ``distexec.protocol`` and the sibling runtime modules
(not ``refs``: the holder side imports this one).

    holder (refs.Future, refs.RemoteChannel)       owner (this module)
    fetch / wait / isready / put ── call ──────►  _fetch_future ... on the _Cell of rrid
    put / take / fetch / ... ────── call ──────►  _channel_op on the Channel of rrid
    remotecall's result ────────────────────────►  store_result: keep it, tell the creator
    a holder dies ──────────────────────────────►  forget_client: drop it from client sets

Julia: ``RemoteValue``, ``PGRP.refs``, ``lookup_ref``, ``channel_from_id``.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any, Callable

from ..errors import DistributedError
from ..protocol import serialization
from ..protocol.frames import RRID
from . import gc
from .channel import Channel
from .context import ClusterContext, current_context


class _TimedOut:
    """What an owner returns when a wait timed out: the holder raises TimeoutError itself.

    A TimeoutError raised on the owner would reach a remote holder wrapped in a
    RemoteException; a marker class (unlike a marker value) cannot collide with user data.
    """


_TIMED_OUT = _TimedOut()


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
