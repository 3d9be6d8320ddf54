"""The Julia-style functions, bound to the process's default cluster context.

Owns nothing but the binding: each function resolves the current ``ClusterContext`` and calls
the layer that does the work (execnet's style: the module-level API is a thin binding to one
default object). Imports every layer below it.
"""

from __future__ import annotations

import concurrent.futures as _cf
import functools
import socket as _socket
import sys
from collections.abc import Hashable, Iterable, Sequence
from typing import Any, Callable, Literal, TypeVar, cast

from .cluster import callbacks as _callbacks
from .cluster import membership as _membership
from .cluster.local import LocalManager
from .cluster.manager import ClusterManager
from .cluster.ssh import SSHManager
from .errors import DistributedError, RemoteException
from .protocol import secret as _secret
from .protocol import unpicklable as _unpicklable
from . import pools as _pools
from .pools import AbstractWorkerPool, CachingPool
from .runtime import arguments as _arguments
from .runtime import calls as _calls
from .runtime import sync as _sync
from .runtime.channel import Channel
from .runtime.context import ClusterContext, current_context
from .runtime.refs import Future, RemoteChannel
from .runtime.sync import sync
from .pmap import distributed_for

_T = TypeVar("_T")

__all__ = [
    "addprocs", "rmprocs", "procs", "workers", "other_procs", "other_workers", "nprocs",
    "nworkers", "myid", "myrole", "interrupt", "getstatus", "setstatus", "cluster_cookie",
    "remotecall", "remotecall_fetch", "remotecall_wait", "remote_do", "remotecall_eval",
    "remote", "spawnat", "spawn", "fetchfrom", "fetchany", "everywhere", "clear", "sync",
    "distributed_for",
    "fetch", "put", "take", "isready", "wait", "close", "worker_id_from_socket",
    "add_worker_starting_callback", "add_worker_started_callback",
    "add_worker_exiting_callback", "add_worker_exited_callback",
    "remove_worker_starting_callback", "remove_worker_started_callback",
    "remove_worker_exiting_callback", "remove_worker_exited_callback",
]


# -- membership ------------------------------------------------------------------------------
def addprocs(n_or_machines_or_manager: int | Sequence[str | tuple[str, int | str]]
             | ClusterManager | None = None, /, **params: Any) -> list[int]:
    """Add workers; returns their pids, sorted.

    ``addprocs(4)`` starts 4 local workers (``restrict=False`` binds them beyond loopback);
    ``addprocs(["host1", ("user@host2", 4)], sshflags=[...])`` starts workers over SSH;
    ``addprocs(manager)`` launches through any :class:`ClusterManager`. Keywords are checked
    against ``default_addprocs_params`` for the integer and machine-list forms.
    ``security=Security(...)`` makes every link of the cluster TLS (docs/security.md); workers
    listening beyond loopback without it bring a ``SecurityWarning``. Julia: ``addprocs``.
    """
    target = n_or_machines_or_manager
    if isinstance(target, ClusterManager):
        manager = target
    elif target is None or isinstance(target, int):
        restrict = params.pop("restrict", True)
        manager = LocalManager(_default_count() if target is None else target, restrict)
        _check_keywords(manager, params)
    elif isinstance(target, (list, tuple)):
        manager = SSHManager(target)
        _check_keywords(manager, params)
    else:
        raise TypeError("addprocs takes a number of workers, a list of machines or a "
                        f"ClusterManager, not {type(target).__name__}")
    return _membership.addprocs(current_context(), manager, params)


def _default_count() -> int:
    import os
    return os.cpu_count() or 1


def _check_keywords(manager: ClusterManager, params: dict) -> None:
    allowed = manager.default_addprocs_params()
    for name in params:
        if name not in allowed:
            raise ValueError(f"Invalid keyword argument {name}")


def rmprocs(*pids: int | Iterable[int], waitfor: float | None = None,
            callback_timeout: float = 10.0) -> _cf.Future[None]:
    """Remove workers (pids as arguments or one iterable). Julia: ``rmprocs``.

    Returns a ``concurrent.futures.Future``: already finished, or still running when
    ``waitfor=0``. A finite ``waitfor`` raises if the workers are not gone in time. A pid that
    never existed raises ``DistributedError`` before any worker is removed (Julia ignores it);
    one already removed is ignored.
    """
    return _membership.rmprocs(current_context(), pids, waitfor, callback_timeout)


def interrupt(*pids: int | Iterable[int], grace: float | None = None) -> None:
    """Interrupt the calls running on ``pids`` (default: all workers). Julia: ``interrupt``.

    The calls fail with ``KeyboardInterrupt`` (in a ``RemoteException``) and the worker serves
    on. A worker still running one of them ``grace`` seconds later (it ignores SIGINT, or is
    stuck in C code) is terminated: SIGTERM, then SIGKILL, and its callers get
    ``ProcessExitedException``. ``grace=None`` reads ``DISTEXEC_INTERRUPT_GRACE`` (default
    10 s); ``math.inf`` never terminates. Returns once the interrupts are sent. An unknown
    pid raises ``DistributedError``, a worker that has exited ``ProcessExitedException``.
    """
    _membership.interrupt(current_context(), pids, grace)


def myid() -> int:
    """This process's pid: 1 on the master. Julia: ``myid()``."""
    return current_context().myid


def myrole() -> str:
    """``"master"`` or ``"worker"``."""
    return current_context().role


def procs(pid: int | None = None) -> list[int]:
    """All pids (with 1); with ``pid``, those on the same host as ``pid``. Julia: ``procs``."""
    ctx = current_context()
    if pid is None:
        return ctx.live_pids()
    pid = _arguments.check_pid(pid, "procs")
    if ctx.role != "master":
        return remotecall_fetch(procs, 1, pid)
    return _same_host(ctx, pid)


def _same_host(ctx: ClusterContext, pid: int) -> list[int]:
    record = ctx.record(pid)
    if pid != 1 and record is None:
        raise KeyError(pid)
    live = ctx.live_pids()
    if pid == 1 or pid in ctx.local_launched:
        return [p for p in live if p == 1 or p in ctx.local_launched]
    assert record is not None  # pid != 1 here
    host = record.connect_at[0] if record.connect_at else None
    return [p for p in live if p != 1 and _host_of(ctx, p) == host]


def _host_of(ctx: ClusterContext, pid: int) -> str | None:
    record = ctx.record(pid)
    return record.connect_at[0] if record is not None and record.connect_at else None


def other_procs(pid: int | None = None) -> list[int]:
    """``procs(pid)`` without the calling process. Julia: ``other_procs``."""
    me = myid()
    return [p for p in procs(pid) if p != me]


def workers() -> list[int]:
    """Worker pids; ``[1]`` when there are none (the master does the work). Julia: ``workers()``."""
    all_pids = procs()
    if len(all_pids) == 1:
        return all_pids
    return [p for p in all_pids if p != 1]


def other_workers() -> list[int]:
    """``workers()`` without the calling process. Julia: ``other_workers``."""
    me = myid()
    return [p for p in workers() if p != me]


def nprocs() -> int:
    """Number of processes, the master included. Julia: ``nprocs()``."""
    return len(procs())


def nworkers() -> int:
    """Number of workers; 1 when there are none. Julia: ``nworkers()``."""
    n = nprocs()
    return 1 if n == 1 else n - 1


def cluster_cookie(cookie: str | None = None) -> str:
    """The cluster's cookie, created on first use; with ``cookie``, set it. Julia: same name.

    A chosen cookie must be 16 to 256 printable ASCII characters (distexec refuses weak
    cookies rather than padding them as Julia does).
    """
    ctx = current_context()
    if cookie is not None:
        validated = _secret.validate(cookie)
        if (len(ctx.live_pids()) > 1 and ctx.cookie is not None
                and not _secret.same(validated, ctx.cookie)):
            raise DistributedError("cannot change the cluster cookie while workers exist: "
                                   "new workers could not link to the running ones")
        ctx.cookie = validated
    _membership.init_multi(ctx)
    assert ctx.cookie is not None  # init_multi created it
    return ctx.cookie


def getstatus(pid: int | None = None) -> Any:
    """The status set for worker ``pid`` (default: this process), or None. Julia: ``getstatus``."""
    ctx = current_context()
    pid = ctx.myid if pid is None else _arguments.check_pid(pid, "getstatus")
    if ctx.myid != 1:
        return _ask_master(getstatus, pid)
    return _callbacks.get_status(ctx, pid)


def setstatus(x: _T, pid: int | None = None) -> _T:
    """Store ``x`` as the status of worker ``pid`` (kept on the master); returns ``x``."""
    ctx = current_context()
    pid = ctx.myid if pid is None else _arguments.check_pid(pid, "setstatus")
    if ctx.myid != 1:
        return _ask_master(setstatus, x, pid)
    _callbacks.set_status(ctx, pid, x)
    return x


def _ask_master(fn: Callable, *args: Any) -> Any:
    """Run a master-only function there; its ValueError stays a ValueError on this worker."""
    try:
        return remotecall_fetch(fn, 1, *args)
    except RemoteException as exc:
        if isinstance(exc.captured.ex, ValueError):
            raise ValueError(str(exc.captured.ex)) from exc
        raise


def _callback_pair(kind: str) -> tuple[Callable[..., Hashable], Callable[[Hashable], None]]:
    def add(fn: Callable[..., Any], key: Hashable | None = None) -> Hashable:
        return _callbacks.add_callback(current_context(), kind, fn, key)

    def remove(key: Hashable) -> None:
        _callbacks.remove_callback(current_context(), kind, key)

    add.__name__, remove.__name__ = f"add_worker_{kind}_callback", f"remove_worker_{kind}_callback"
    add.__doc__ = f"Register ``fn`` to run when workers are {kind}; returns its key."
    remove.__doc__ = f"Unregister the worker-{kind} callback ``key`` (no error if absent)."
    return add, remove


add_worker_starting_callback, remove_worker_starting_callback = _callback_pair("starting")
add_worker_started_callback, remove_worker_started_callback = _callback_pair("started")
add_worker_exiting_callback, remove_worker_exiting_callback = _callback_pair("exiting")
add_worker_exited_callback, remove_worker_exited_callback = _callback_pair("exited")


# -- calls -----------------------------------------------------------------------------------
_is_pid = _arguments.is_pid


def _check_target(target: Any) -> int:
    if not _is_pid(target):
        raise TypeError("a call's target must be a worker id (int) or a worker pool, "
                        f"not {type(target).__name__}")
    return int(target)


def _call(how: Callable, pool_how: Callable, fn: Callable, target: int | AbstractWorkerPool,
          args: tuple, kwargs: dict) -> Any:
    _arguments.check_callable(fn, how.__name__)
    try:
        if isinstance(target, AbstractWorkerPool):
            return pool_how(fn, target, args, kwargs)
        return how(current_context(), fn, _check_target(target), args, kwargs)
    except Exception as exc:
        _unpicklable.note_what_failed_to_pickle(exc, fn, args, kwargs)
        raise


def remotecall(fn: Callable, target: int | AbstractWorkerPool, /, *args: Any,
               **kwargs: Any) -> Future:
    """Run ``fn(*args, **kwargs)`` on ``target`` and return a Future at once. Julia: same name.

    ``target`` is a pid or a pool; through a pool the worker stays taken until the Future
    completes.
    """
    return _call(_calls.remotecall, _pools.pool_remotecall, fn, target, args, kwargs)


def remotecall_fetch(fn: Callable, target: int | AbstractWorkerPool, /, *args: Any,
                     **kwargs: Any) -> Any:
    """Run ``fn`` on ``target`` (pid or pool) and return its value. Julia: same name.

    Raises RemoteException when ``fn`` raised, ProcessExitedException when the worker died.
    """
    return _call(_calls.remotecall_fetch, _pools.pool_remotecall_fetch, fn, target, args, kwargs)


def remotecall_wait(fn: Callable, target: int | AbstractWorkerPool, /, *args: Any,
                    **kwargs: Any) -> Future:
    """Run ``fn`` on ``target`` (pid or pool), wait for it, return the Future. Julia: same name."""
    return _call(_calls.remotecall_wait, _pools.pool_remotecall_wait, fn, target, args, kwargs)


def remote_do(fn: Callable, target: int | AbstractWorkerPool, /, *args: Any,
              **kwargs: Any) -> None:
    """Run ``fn`` on ``target`` (pid or pool) without waiting; errors print there.

    Julia: same name.
    """
    _call(_calls.remote_do, _pools.pool_remote_do, fn, target, args, kwargs)


def remote(fn: Callable, pool: AbstractWorkerPool | None = None) -> Callable:
    """A function that runs ``fn`` through ``pool`` (default: the default pool at each call).

    Julia: ``remote([pool], f)``.
    """
    _arguments.check_callable(fn, "remote")

    def call_remotely(*args: Any, **kwargs: Any) -> Any:
        target = pool if pool is not None else _pools.default_worker_pool()
        try:
            return _pools.pool_remotecall_fetch(fn, target, args, kwargs)
        except Exception as exc:
            _unpicklable.note_what_failed_to_pickle(exc, fn, args, kwargs)
            raise
    call_remotely.__name__ = f"remote_{getattr(fn, '__name__', 'fn')}"
    return call_remotely


def _nextproc() -> int:
    """Round robin over ``workers()`` (pid 1 when there are none). Julia: ``nextproc``."""
    pids = workers()
    return pids[current_context().next_round_robin() % len(pids)]


def spawnat(p: int | Literal["any"], fn: Callable, /, *args: Any, **kwargs: Any) -> Future:
    """Run ``fn`` on ``p`` (a pid, or ``"any"`` for round robin); returns a Future.

    Inside ``with sync():`` the block waits for it. Julia: ``@spawnat p expr``.
    """
    if p == "any":
        p = _nextproc()
    elif isinstance(p, str):
        raise ValueError(f'spawnat takes a pid or "any", not {p!r}')
    _arguments.check_callable(fn, "spawnat")
    return _sync.register(remotecall(fn, p, *args, **kwargs))


def spawn(fn: Callable, /, *args: Any, **kwargs: Any) -> Future:
    """``spawnat("any", fn, ...)``. Julia: ``@spawn``."""
    return spawnat("any", fn, *args, **kwargs)


def fetchfrom(p: int, fn: Callable, /, *args: Any, **kwargs: Any) -> Any:
    """``remotecall_fetch(fn, p, ...)``. Julia: ``@fetchfrom p expr``."""
    return remotecall_fetch(fn, p, *args, **kwargs)


def fetchany(fn: Callable, /, *args: Any, **kwargs: Any) -> Any:
    """Run ``fn`` on the next worker in round robin and return its value. Julia: ``@fetch``."""
    return remotecall_fetch(fn, _nextproc(), *args, **kwargs)


def everywhere(code_or_fn: str | Callable[..., Any], /, *args: Any,
               procs: int | Iterable[int] | None = None, module: str = "__main__",
               **kwargs: Any) -> Any:
    """Run code (source text or a callable) on every process, the master included.

    ``procs`` narrows it (one pid returns the value). Runs concurrently and waits for all;
    failures are collected in a CompositeException. Processes added later do not get it.
    Julia: ``@everywhere [procs] expr``.
    """
    code: str | Callable[..., Any]
    _check_code(code_or_fn, "everywhere")
    if callable(code_or_fn) and (args or kwargs):
        code = functools.partial(code_or_fn, *args, **kwargs)
    elif args or kwargs:
        raise TypeError("everywhere passes arguments only to a callable")
    else:
        code = code_or_fn
    if procs is not None and not _is_pid(procs):
        _arguments.check_pid_list(procs, "everywhere")
    targets = globals()["procs"]() if procs is None else procs
    return remotecall_eval(code, targets, module=module)


def clear(names_or_pool: str | Iterable[str] | CachingPool,
          procs: int | Iterable[int] | None = None, *,
          module: str = "__main__") -> CachingPool | None:
    """Set globals ``names`` to None in ``module`` on ``procs`` (default: workers), or clear a
    CachingPool. Julia: ``clear!``.
    """
    if isinstance(names_or_pool, _pools.CachingPool):
        return names_or_pool.clear()
    names = [names_or_pool] if isinstance(names_or_pool, str) else list(names_or_pool)
    targets = workers() if procs is None else _one_or_several_pids(procs, "clear")
    remotecall_eval(functools.partial(_clear_names, names, module), targets, module=module)
    return None


def _clear_names(names: list[str], module: str) -> None:
    namespace = sys.modules[module].__dict__ if module in sys.modules else {}
    for name in names:
        if name in namespace:
            namespace[name] = None


def remotecall_eval(code: str | Callable[[], Any], procs: int | Iterable[int], *,
                    module: str = "__main__") -> Any:
    """Evaluate ``code`` (source text or a callable) in ``module`` on ``procs``.

    With one pid, returns the value (errors as RemoteException). With several, runs them
    concurrently and returns None; failures are collected in a CompositeException.
    Julia: ``remotecall_eval``.
    """
    _check_code(code, "remotecall_eval")
    if _is_pid(procs):
        return remotecall_fetch(_evaluate, _check_target(procs), code, module)
    ctx = current_context()
    futures, errors = [], []
    for pid in _one_or_several_pids(procs, "remotecall_eval"):
        try:
            futures.append(_calls.remotecall(ctx, _evaluate, pid, (code, module), {}))
        except Exception as exc:
            errors.append(exc)
    _sync.wait_all(futures, errors)
    return None


def _one_or_several_pids(procs: object, what: str) -> list[int]:
    if _is_pid(procs):
        return [int(cast(int, procs))]
    return _arguments.check_pid_list(procs, what)


def _check_code(code: object, what: str) -> None:
    if not isinstance(code, str) and not callable(code):
        raise TypeError(f"{what} runs source code (a str) or a callable, "
                        f"not {type(code).__name__}")


def _evaluate(code: str | Callable[[], Any], module: str) -> Any:
    if callable(code):
        return code()
    namespace = sys.modules[module].__dict__ if module in sys.modules else _new_module(module)
    try:
        compiled = compile(code, "<remotecall_eval>", "eval")
    except SyntaxError:
        exec(compile(code, "<remotecall_eval>", "exec"), namespace)
        return None
    return eval(compiled, namespace)


def _new_module(name: str) -> dict:
    import types
    module = sys.modules[name] = types.ModuleType(name)
    return module.__dict__


# -- generic operations on references and channels --------------------------------------------
def fetch(x: Any, timeout: float | None = None) -> Any:
    """The value of a Future/RemoteChannel; any other object is returned as is. Julia: ``fetch``."""
    method = getattr(x, "fetch", None)
    if method is None or not isinstance(x, (Future, RemoteChannel, Channel)):
        if isinstance(x, _cf.Future):
            return x.result(timeout)
        return x
    return method(timeout=timeout)


def put(ref: Any, value: Any) -> Any:
    """``put!``: set a Future once, or append to a channel. Returns ``ref``."""
    ref.put(value)
    return ref


def take(ref: Any) -> Any:
    """``take!``: remove and return the first value of a channel."""
    return ref.take()


def isready(x: Any) -> bool:
    """Whether a Future has its value, or a channel holds one. Julia: ``isready``."""
    return x.isready()


def wait(x: Any, timeout: float | None = None) -> Any:
    """Block until ``x`` has a value (Future, channel) and return ``x``. Julia: ``wait``."""
    if isinstance(x, (Future, RemoteChannel, Channel)):
        x.wait(timeout=timeout)
        return x
    if hasattr(x, "result"):
        x.result(timeout)
        return x
    return x.wait(timeout)


def close(ref: Any) -> None:
    """Close a channel: later puts fail, takes drain what is left. Julia: ``close``."""
    ref.close()


def worker_id_from_socket(s: object) -> int:
    """The pid of the peer connected through ``s`` (a socket or connection); -1 if unknown."""
    ctx = current_context()
    with ctx.lock:
        for pid, record in ctx.peers.items():
            conn = record.conn
            if conn is not None and (conn is s or conn.sock is s
                                     or getattr(conn.sock, "ssl_socket", None) is s):
                return pid
    if not isinstance(s, _socket.socket) and not hasattr(s, "sock"):
        return ctx.myid
    return -1

