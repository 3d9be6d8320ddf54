"""Worker pools: sets of workers handed out one call at a time.

Owns ``AbstractWorkerPool``, ``WorkerPool`` (shared cluster-wide: a pool sent to another
process acts on its owner's pool), ``CachingPool`` (ships each function once per worker),
the default pool, and the pool forms of the call API. Imports ``distexec.runtime`` and below.
Julia: ``AbstractWorkerPool``, ``WorkerPool``, ``CachingPool``, ``default_worker_pool``.

    remotecall_fetch(fn, pool) ──► pool.take() ──► call on that worker ──► pool.put(worker)
    remotecall(fn, pool) ────────► pool.take() ──► Future ──(done)──► pool.put(worker)
    WorkerPool pickled for pid p ──► proxy on p ──► every operation runs on the owner
"""

from __future__ import annotations

import abc
import itertools
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from .errors import DistributedError, RemoteException
from .protocol import serialization
from .runtime import arguments, calls
from .runtime.context import ClusterContext, current_context
from .runtime.refs import RemoteChannel

__all__ = ["AbstractWorkerPool", "WorkerPool", "CachingPool", "default_worker_pool",
           "set_default_worker_pool", "pool_remotecall", "pool_remotecall_fetch",
           "pool_remotecall_wait", "pool_remote_do"]

_pool_ids = itertools.count(1)


class AbstractWorkerPool(abc.ABC):
    """The pool interface: members, a queue of free members, and the operations below.

    Julia: ``AbstractWorkerPool`` with ``push!``, ``put!``, ``take!``, ``wait``, ``isready``,
    ``length``, ``workers``, ``nworkers``.
    """

    @abc.abstractmethod
    def push(self, pid: int) -> None:
        """Add ``pid`` as a member (and as free)."""

    @abc.abstractmethod
    def put(self, pid: int) -> int:
        """Return ``pid`` to the free queue if it is still a member; returns ``pid``."""

    @abc.abstractmethod
    def take(self) -> int:
        """A free member, blocking while all are busy (dead members are pruned)."""

    @abc.abstractmethod
    def wait(self) -> None:
        """Block until a member is free, without taking it."""

    @abc.abstractmethod
    def isready(self) -> bool:
        """Whether ``take`` would not block (racy by nature)."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of members, busy or free."""

    @abc.abstractmethod
    def workers(self) -> list[int]:
        """The members."""

    def nworkers(self) -> int:
        return len(self.workers())

    def __bool__(self) -> bool:
        return True


class WorkerPool(AbstractWorkerPool):
    """A pool of worker ids, shared cluster-wide through its owner. Julia: ``WorkerPool``."""

    def __init__(self, workers: Iterable[int] = ()):
        pids = arguments.check_pid_list(workers, type(self).__name__)
        self._ctx = current_context()
        self._owner = self._ctx.myid
        self._id = next(_pool_ids)
        self._members: set[int] = set()
        self._free: deque[int] = deque()
        self._cond = threading.Condition()
        self._watchers = 0  # threads in wait(), which take nothing when woken
        self._pruned_at: int | None = None  # the cluster's membership_version at the last prune
        self.changes = 0  # counts changes of the members: views of them are cached against it
        _pool_registry(self._ctx)[self._id] = self
        for pid in pids:
            self.push(pid)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({sorted(self._members)})"

    def _is_default_empty(self) -> bool:
        return not self._members and self._ctx.default_pool is self

    # -- operations --------------------------------------------------------------------------
    def push(self, pid: int) -> None:
        pid = arguments.check_pid(pid, "WorkerPool.push")
        arguments.check_exists(self._ctx, pid)  # else the first take would say "no worker"
        with self._cond:
            self._members.add(pid)
            self._free.append(pid)
            self._pruned_at = None  # it may have left already: the next take checks
            self.changes += 1
            self._cond.notify_all()

    def push_if_new(self, pid: int) -> None:
        """``push(pid)`` unless it is a member already (a second push would free it twice)."""
        with self._cond:
            if pid not in self._members:
                self.push(pid)

    def put(self, pid: int) -> int:
        with self._cond:
            if pid in self._members:
                self._free.append(pid)
                # One free worker is for one taker: waking them all (pmap has a thread per
                # worker waiting) cost O(workers) per call. But a ``wait``er woken alone
                # takes nothing and would leave a taker asleep: with one waiting, wake all.
                if self._watchers:
                    self._cond.notify_all()
                else:
                    self._cond.notify()
        return pid

    def take(self) -> int:
        with self._cond:
            while True:
                if self._is_default_empty():
                    return 1
                self._prune()
                if not self._members:
                    raise DistributedError("No active worker available in pool")
                if self._free:
                    return self._free.popleft()
                self._cond.wait()

    def wait(self) -> None:
        with self._cond:
            while not self._is_default_empty():
                self._prune()
                if self._free:
                    return
                if not self._members:
                    raise DistributedError("No active worker available in pool")
                self._watchers += 1
                try:
                    self._cond.wait()
                finally:
                    self._watchers -= 1

    def isready(self) -> bool:
        with self._cond:
            if self._is_default_empty():
                return True
            self._prune()
            return bool(self._free)

    def __len__(self) -> int:
        with self._cond:
            self._prune()  # a worker may have left before our lost-peer hook ran
            return len(self._members)

    def workers(self) -> list[int]:
        with self._cond:
            if self._is_default_empty():
                return [1]
            self._prune()
            return sorted(self._members)

    def _prune(self) -> None:
        """Drop members that left the cluster (called with the lock held): only when the
        cluster's membership changed since the last time, not on every take (O(workers))."""
        version = self._ctx.membership_version  # read first: a change meanwhile prunes again
        if version == self._pruned_at:
            return
        self._pruned_at = version
        live = set(self._ctx.live_pids())
        dead = {p for p in self._members if p not in live and p != self._ctx.myid}
        if dead:
            self._members -= dead
            self._free = deque(p for p in self._free if p not in dead)
            self.changes += 1

    def _worker_lost(self, pid: int) -> None:
        with self._cond:
            self._pruned_at = None  # whether or not the membership_version moved yet
            self._prune()
            self._cond.notify_all()

    # -- sending to other processes: a proxy to this pool ------------------------------------
    def __reduce__(self):
        if serialization.current_destination() is None or current_context() is not self._ctx:
            raise DistributedError("a WorkerPool can only be sent to processes of its cluster")
        return (_pool_proxy, (self._owner, self._id, type(self).__name__))


def _pool_registry(ctx: ClusterContext) -> weakref.WeakValueDictionary[int, WorkerPool]:
    with ctx.lock:
        registry = ctx.pools
        if registry is None:
            registry = ctx.pools = weakref.WeakValueDictionary()
            ctx.on_peer_lost.append(_notify_pools)
        return registry


def _notify_pools(ctx: ClusterContext, pid: int) -> None:
    assert ctx.pools is not None  # _pool_registry created it before adding this hook
    for pool in list(ctx.pools.values()):
        pool._worker_lost(pid)


def _pool_proxy(owner: int, pool_id: int, kind: str):
    ctx = current_context()
    if owner == ctx.myid:
        pool = _pool_registry(ctx).get(pool_id)
        if pool is None:
            raise DistributedError("the WorkerPool this proxy refers to no longer exists")
        return pool
    return WorkerPoolProxy(owner, pool_id)


def _on_owner(pool_id: int, op: str, *args):
    pool = _pool_registry(current_context()).get(pool_id)
    if pool is None:
        raise DistributedError("the WorkerPool this proxy refers to no longer exists")
    return getattr(pool, op)(*args)


class WorkerPoolProxy(AbstractWorkerPool):
    """A WorkerPool received from another process: every operation runs on its owner."""

    def __init__(self, owner: int, pool_id: int):
        self._owner, self._id = owner, pool_id

    def __repr__(self) -> str:
        return f"WorkerPoolProxy(owner={self._owner}, id={self._id})"

    def _call(self, op: str, *args):
        return calls.remotecall_fetch(current_context(), _on_owner, self._owner,
                                      (self._id, op, *args), {})

    def push(self, pid):
        self._call("push", pid)

    def put(self, pid):
        return self._call("put", pid)

    def take(self):
        return self._call("take")

    def wait(self):
        self._call("wait")

    def isready(self):
        return self._call("isready")

    def __len__(self):
        return self._call("__len__")

    def workers(self):
        return self._call("workers")

    def __reduce__(self):
        return (_pool_proxy, (self._owner, self._id, "WorkerPool"))


class CachingPool(WorkerPool):
    """A local pool that ships each function once per worker. Julia: ``CachingPool``.

    The first call of ``fn`` on a worker sends it into a channel on that worker; later calls
    send only the channel reference. ``clear()`` drops the cached functions everywhere.
    """

    def __init__(self, workers: Iterable[int] = ()):
        super().__init__(workers)
        self._cache: dict[tuple[int, int], tuple[Callable, RemoteChannel]] = {}
        self._cache_lock = threading.Lock()

    def __reduce__(self):
        raise DistributedError("CachingPool objects are not serializable.")

    def clear(self) -> CachingPool:
        """Forget every cached function (the workers free them). Julia: ``clear!``."""
        with self._cache_lock:
            entries, self._cache = list(self._cache.values()), {}
        for _fn, chan in entries:
            chan.release()
        return self

    def forget(self, pid: int, fn: Callable) -> None:
        """Drop the cache entry of ``fn`` on ``pid`` (its first call never reached the worker)."""
        with self._cache_lock:
            entry = self._cache.pop((pid, id(fn)), None)
        if entry is not None:
            entry[1].release()

    def cached_call(self, pid: int, fn: Callable) -> tuple[Callable, tuple]:
        """What to send to ``pid`` to call ``fn``: (runner, leading arguments)."""
        if pid == self._ctx.myid:
            return fn, ()
        key = (pid, id(fn))
        with self._cache_lock:
            entry = self._cache.get(key)
            first = entry is None
            if entry is None:
                entry = self._cache[key] = (fn, RemoteChannel(pid))
        chan = entry[1]
        return _call_cached, (chan, fn if first else None)


def _call_cached(chan: RemoteChannel, fn, *args, **kwargs):
    """On the worker (the channel's owner): store ``fn`` on first use, else read it back."""
    if fn is not None:
        chan.put(fn)
    elif not chan.isready():
        raise DistributedError("CachingPool: the cached function is missing on this worker")
    else:
        fn = chan.fetch()
    return fn(*args, **kwargs)


# -- the default pool ------------------------------------------------------------------------
def default_worker_pool() -> AbstractWorkerPool:
    """The pool that ``remote``, ``pmap(pool=...)`` and pool calls use by default.

    On the master it holds every worker (new ones join it); with no workers it hands out
    pid 1. On a worker it is a proxy to the master's. Julia: ``default_worker_pool()``.
    """
    ctx = current_context()
    with ctx.lock:
        if ctx.default_pool is not None:
            return ctx.default_pool
    if ctx.myid != 1 and ctx.role == "worker":
        pool = calls.remotecall_fetch(ctx, default_worker_pool, 1, (), {})
    else:
        pool = WorkerPool()
        with ctx.lock:
            if ctx.default_pool is not None:
                return ctx.default_pool
            ctx.default_pool = pool
        for pid in ctx.live_pids():
            if pid != 1:
                pool.push_if_new(pid)  # one that joined meanwhile was pushed already
        return pool
    with ctx.lock:
        ctx.default_pool = ctx.default_pool or pool
        return ctx.default_pool


def set_default_worker_pool(pool: AbstractWorkerPool) -> AbstractWorkerPool:
    """Replace this process's default pool. Julia: ``default_worker_pool!``."""
    if not isinstance(pool, AbstractWorkerPool):
        raise TypeError(f"expected an AbstractWorkerPool, got {type(pool).__name__}")
    ctx = current_context()
    with ctx.lock:
        ctx.default_pool = pool
    return pool


# -- the pool forms of the call API ----------------------------------------------------------
def _call_on(pool: AbstractWorkerPool, pid: int, how: Callable, fn: Callable, args: tuple,
             kwargs: dict):
    """Call ``fn`` on ``pid`` with ``how`` (a runtime.calls function), via the pool's cache."""
    if not isinstance(pool, CachingPool):
        return how(current_context(), fn, pid, args, kwargs)
    runner, lead = pool.cached_call(pid, fn)
    try:
        return how(current_context(), runner, pid, lead + args, kwargs)
    except RemoteException:
        raise  # the worker got (and kept) the function; the call itself failed
    except BaseException:
        pool.forget(pid, fn)  # it may never have arrived: send it again next time
        raise


def pool_remotecall_fetch(fn: Callable, pool: AbstractWorkerPool, args: tuple, kwargs: dict) -> Any:
    pid = pool.take()
    try:
        return _call_on(pool, pid, calls.remotecall_fetch, fn, args, kwargs)
    finally:
        pool.put(pid)


def pool_remotecall_wait(fn: Callable, pool: AbstractWorkerPool, args: tuple, kwargs: dict):
    pid = pool.take()
    try:
        return _call_on(pool, pid, calls.remotecall_wait, fn, args, kwargs)
    finally:
        pool.put(pid)


def pool_remotecall(fn: Callable, pool: AbstractWorkerPool, args: tuple, kwargs: dict):
    """The worker stays taken until the returned Future completes (Julia #20)."""
    pid = pool.take()
    try:
        future = _call_on(pool, pid, calls.remotecall, fn, args, kwargs)
    except BaseException:
        pool.put(pid)
        raise
    ctx = current_context()
    future.add_done_callback(lambda _f: _put_back(ctx, pool, pid))
    return future


def _put_back(ctx: ClusterContext, pool: AbstractWorkerPool, pid: int) -> None:
    """Return ``pid`` from a Future's done callback, which may run on a connection's reader.

    A local WorkerPool's ``put`` only takes a lock. Any other pool's may block: a proxy's is a
    call to the pool's owner, which on the reader thread would stall that connection and
    deadlock when the owner is the peer that thread reads (its reply could never be read).
    Those run on a call thread instead.
    """
    if isinstance(pool, WorkerPool):
        pool.put(pid)
        return

    def put():
        try:
            pool.put(pid)
        except Exception:  # the owner is gone: so is the pool (Julia ignores this too)
            pass
    ctx.runner.submit(put)


def pool_remote_do(fn: Callable, pool: AbstractWorkerPool, args: tuple, kwargs: dict) -> None:
    pid = pool.take()
    try:
        _call_on(pool, pid, calls.remote_do, fn, args, kwargs)
    finally:
        pool.put(pid)
