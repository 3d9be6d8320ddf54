"""Testing helpers for people who write their own cluster managers.

Owns :func:`check_cluster_manager`, a conformance check that runs a user's
:class:`~distexec.ClusterManager` through what every manager must support, and
:class:`ManagerCheckFailed`, the ``AssertionError`` it raises. Imports any layer below ``cli``
(``api``, ``executor``, ``pools``, ``runtime``, ``cluster``, ``errors``); nothing imports it.

    manager_factory(n) ──► addprocs ──► ids, workers(), nprocs()
        ──► a call on each worker ──► a worker-to-worker call ──► a channel owned by a worker
        ──► an executor over the new workers ──► one worker killed: only its calls fail
        ──► manager.replacement(its config), if any: one worker like it joins and answers
        ──► rmprocs ──► nothing of them left

Use it from pytest or from a plain script::

    from distexec.testing import check_cluster_manager

    def test_my_manager():
        check_cluster_manager(lambda n: MyManager(n))
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

from .api import addprocs, myid, nprocs, procs, remotecall, rmprocs, workers
from .cluster.manager import ClusterManager
from .cluster.membership import launched_by
from .errors import CompositeException, ProcessExitedException, WaitTimeout
from .executor import DistributedExecutor
from .pools import WorkerPool
from .runtime.context import current_context
from .runtime.refs import RemoteChannel
from .runtime.runner import in_thread

__all__ = ["check_cluster_manager", "ManagerCheckFailed"]

log = logging.getLogger("distexec.testing")


class ManagerCheckFailed(AssertionError):
    """A cluster manager failed :func:`check_cluster_manager`.

    The message names the step that failed, what was expected and what happened, and which
    method of the manager is usually responsible. An ``AssertionError``, so pytest reports it
    as a test failure and a plain script stops with its message.
    """


def check_cluster_manager(manager_factory: Callable[[int], ClusterManager], *, n: int = 2,
                          timeout: float = 60.0, **addprocs_params) -> None:
    """Run a cluster manager through what distexec needs from one; raise if it falls short.

    Called on the master (normally with no workers yet), it:

    1. adds ``n`` workers with ``addprocs(manager_factory(n), **addprocs_params)`` and checks
       their ids (new, sorted, never used before), ``workers()`` and ``nprocs()``;
    2. runs ``remotecall_fetch`` on each worker, and (with ``n >= 2`` and a topology that
       allows it) a call from one worker to another;
    3. puts a value into a ``RemoteChannel`` owned by the first worker (from the last worker,
       or from the master when workers cannot call each other) and takes it on the master;
    4. maps a function over the workers with a ``DistributedExecutor(pool=WorkerPool(pids))``;
    5. kills the last worker while a call runs on it and one waits on another worker: only the
       first may fail, with ``ProcessExitedException`` for that worker, and the worker must
       leave ``procs()``; the other workers must go on serving calls. The worker is killed
       with SIGKILL through its OS pid when the manager launched it as a local child process
       (``WorkerConfig.process``); otherwise it kills itself (SIGKILL from inside);
    6. asks the manager for a replacement of the killed worker
       (``manager.replacement(config)``); unless that is None (the manager cannot replace
       workers), adds its workers with ``addprocs`` and the same keywords: exactly one must
       join, and answer a call;
    7. removes the other workers with ``rmprocs`` and checks that none is left, and that every
       local child process the manager (or its replacement) started has exited.

    Whatever fails, the workers it added are removed before it raises.

    Args:
        manager_factory: called once as ``manager_factory(n)``; returns a new manager that
            launches ``n`` workers.
        n: how many workers to launch (at least 1; 2 or more also checks worker-to-worker
            calls and that a death spares the others).
        timeout: seconds each step may take (adding the workers, each call, the death, the
            removal).
        **addprocs_params: passed to ``addprocs`` (for example ``topology="master_worker"``).

    Raises:
        ManagerCheckFailed: a step failed; the message says which and why.
        ValueError: ``n`` is not a positive int.

    Example::

        check_cluster_manager(lambda n: MyManager(n), n=3, timeout=30)
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    _require(myid() == 1, "setup", "check_cluster_manager must run on the master (myid() == 1)")
    manager = _make_manager(manager_factory, n)
    pids = _add_workers(manager, n, timeout, addprocs_params)
    added = list(pids)
    try:
        _check_calls(pids, timeout)
        _check_channel(pids, timeout)
        _check_executor(pids, timeout)
        survivors = _check_death(pids, timeout)
        replaced = _check_replacement(pids[-1], timeout, addprocs_params)
        added += replaced
        _check_removal(added, survivors + replaced, timeout)
    finally:
        _remove_quietly(added)
    log.info("check_cluster_manager: %s passed every check", _name(manager))


# -- the steps ------------------------------------------------------------------------------
def _make_manager(factory: Callable[[int], ClusterManager], n: int) -> ClusterManager:
    with _step("create the manager", "manager_factory(n) must return a ClusterManager"):
        manager = factory(n)
    _require(isinstance(manager, ClusterManager), "create the manager",
             f"manager_factory({n}) returned {manager!r}, which is not a ClusterManager")
    return manager


def _add_workers(manager: ClusterManager, n: int, timeout: float, params: dict,
                 step: str = "add workers") -> list[int]:
    hint = ("launch() must start the workers and append one WorkerConfig per worker to "
            "`launched` (notifying `launch_ntfy`); connect() must return the master's end of "
            "the link to each worker as (reader, writer)")
    before = procs()
    try:
        with _step(step, hint):
            pids = _within(timeout, step, addprocs, manager, **params,
                           what=f"addprocs({_name(manager)}) to return")
        _require(len(pids) == n, step, f"addprocs({_name(manager)}) returned {pids}, but {n} "
                 f"worker(s) were asked for; {hint}")
        _require(pids == sorted(pids), step, f"addprocs returned pids out of order: {pids}")
        _require(min(pids) > max(before), step,
                 f"new pids {pids} are not above the existing ones {before}")
        _require(set(pids) <= set(workers()), step,
                 f"workers() is {workers()}, which lacks some of the new pids {pids}")
        _require(nprocs() == len(before) + n, step,
                 f"nprocs() is {nprocs()}, expected {len(before) + n} after adding {n}")
    except BaseException:
        _remove_quietly([p for p in procs() if p not in before])  # the ones that did join
        raise
    log.info("check_cluster_manager: added workers %s", pids)
    return pids


def _check_calls(pids: list[int], timeout: float) -> None:
    hint = "the link connect() returned must carry messages both ways"
    for pid in pids:
        with _step(f"call worker {pid}", hint):
            answer = remotecall(_identity, pid).fetch(timeout)
        _require(answer[0] == pid, f"call worker {pid}",
                 f"worker {pid} answered myid() == {answer[0]}")
        _require(answer[1] != os.getpid(), f"call worker {pid}",
                 f"worker {pid} runs in the master's own process (os pid {answer[1]})")
    if not _workers_linked(pids):
        return
    first, last = pids[0], pids[-1]
    with _step(f"call worker {last} from worker {first}",
               "workers reach each other at the address they listen on (WorkerConfig "
               "bind_addr/port, or connect_at); with a custom transport use "
               "topology='master_worker'"):
        answer = remotecall(_call_peer, first, last, timeout).fetch(timeout)
    _require(answer == last, f"call worker {last} from worker {first}",
             f"worker {last}, called from worker {first}, answered myid() == {answer}")


def _check_channel(pids: list[int], timeout: float) -> None:
    owner = pids[0]
    writer = pids[-1] if _workers_linked(pids) else 1   # a worker, when workers call each other
    step = f"RemoteChannel on worker {owner}, written by process {writer}"
    with _step(step, "the channel's operations run on its owner, over the manager's links"):
        channel = RemoteChannel(owner, 1)
        if writer == 1:
            channel.put(("from", writer), timeout)
        else:
            remotecall(_put, writer, channel, ("from", writer)).wait(timeout)
        value = channel.take(timeout)
    _require(value == ("from", writer), step, f"took {value!r}, expected {('from', writer)!r}")


def _check_executor(pids: list[int], timeout: float) -> None:
    step = "DistributedExecutor(pool=WorkerPool(pids)).map"
    with _step(step, "the executor sends each task to a worker of the pool"):
        with DistributedExecutor(pool=WorkerPool(pids)) as executor:
            results = list(executor.map(_square_and_where, range(4 * len(pids)),
                                        timeout=timeout))
    _require([r[0] for r in results] == [x * x for x in range(4 * len(pids))], step,
             f"wrong results: {results}")
    ran_on = {r[1] for r in results}
    _require(ran_on <= set(pids), step, f"tasks ran on {sorted(ran_on)}, not only on {pids}")


def _check_death(pids: list[int], timeout: float) -> list[int]:
    """Kill the last worker mid-call; returns the workers that must have survived."""
    victim, survivors = pids[-1], pids[:-1]
    step = f"kill worker {victim}"
    with _step(step, "calls on the other workers must not be affected"):
        running = remotecall(_block, victim, timeout)
        gates = [RemoteChannel(1, 1) for _ in survivors]   # each survivor blocks on its own
        waiting = [remotecall(_take, p, g) for p, g in zip(survivors, gates, strict=True)]
        how = _kill(victim)
    ending = _ending(running, timeout)
    _require(isinstance(ending, ProcessExitedException), step,
             f"the call running on worker {victim} {_describe(ending, timeout)} after {how}; "
             "expected ProcessExitedException (the master learns of a death when the link "
             "that connect() returned reaches EOF)")
    _require(ending.worker_id == victim, step,
             f"the ProcessExitedException names worker {ending.worker_id}, not {victim}")
    _wait_for(lambda: victim not in procs(), timeout, step,
              f"worker {victim} is still in procs() {timeout} s after {how}")
    with _step(step, "surviving workers must keep serving calls"):
        for pid, future, gate in zip(survivors, waiting, gates, strict=True):
            _require(not future.isready(), step, f"the call waiting on worker {pid} ended "
                     f"when worker {victim} died: {_describe(_ending(future, 0), 0)}")
            gate.put("go", timeout)
            _require(future.fetch(timeout) == "go", step,
                     f"the call waiting on worker {pid} did not finish normally")
            _require(remotecall(_identity, pid).fetch(timeout)[0] == pid, step,
                     f"worker {pid} stopped answering after worker {victim} died")
    log.info("check_cluster_manager: worker %d killed (%s); %s survived", victim, how, survivors)
    return survivors


def _check_replacement(victim: int, timeout: float, params: dict) -> list[int]:
    """Add the replacement the manager offers for the killed worker; returns its pid (or [])."""
    step = f"replace worker {victim}"
    found = launched_by(current_context(), victim)
    if found is None:
        raise ManagerCheckFailed(f"check_cluster_manager, step '{step}': the master kept no "
                                 f"record of how worker {victim} was launched")
    manager, config = found
    with _step(step, "replacement(config) returns a manager that launches one worker like "
                     "the one config describes, or None"):
        replacement = manager.replacement(config)
    if replacement is None:
        log.info("check_cluster_manager: %s offers no replacements", _name(manager))
        return []
    _require(isinstance(replacement, ClusterManager), step,
             f"replacement() returned {replacement!r}, which is not a ClusterManager or None")
    new = _add_workers(replacement, 1, timeout, params, step=step)
    try:
        _check_calls(new, timeout)
    except BaseException:
        _remove_quietly(new)
        raise
    log.info("check_cluster_manager: worker %d replaced by %s", victim, new)
    return new


def _check_removal(pids: list[int], survivors: list[int], timeout: float) -> None:
    step = f"rmprocs({survivors})"
    processes = _local_processes(pids)
    if survivors:
        with _step(step, "kill() must make the worker exit (the default asks it over its "
                         "connection)"):
            rmprocs(survivors, waitfor=timeout)
    left = [p for p in pids if p in procs()]
    _require(not left, step, f"workers {left} are still in procs() after rmprocs")
    _wait_for(lambda: all(p.poll() is not None for p in processes), timeout, step,
              "worker processes the manager started are still running after rmprocs: "
              + ", ".join(str(p.pid) for p in processes if p.poll() is None))


def _workers_linked(pids: list[int]) -> bool:
    """Whether the first and last worker may call each other (only all_to_all promises it)."""
    return len(pids) >= 2 and current_context().topology == "all_to_all"


# -- killing a worker -----------------------------------------------------------------------
def _kill(pid: int) -> str:
    """SIGKILL worker ``pid``: from here if it is our child process, else from inside it."""
    record = current_context().record(pid)
    config = getattr(record, "config", None)
    process = getattr(config, "process", None)
    os_pid = getattr(config, "os_pid", None)
    if isinstance(process, subprocess.Popen) and os_pid is not None and process.pid == os_pid:
        os.kill(os_pid, signal.SIGKILL)
        return f"SIGKILL to its OS pid {os_pid}"
    remotecall(_kill_myself, pid)
    return "a SIGKILL it sent itself"


def _local_processes(pids: list[int]) -> list[subprocess.Popen]:
    ctx = current_context()
    out = []
    for pid in pids:
        record = ctx.record(pid) or ctx.deleted.get(pid)
        process = getattr(getattr(record, "config", None), "process", None)
        if isinstance(process, subprocess.Popen):
            out.append(process)
    return out


# -- functions the workers run (module-level: they travel by reference) ----------------------
def _identity() -> tuple[int, int]:
    return myid(), os.getpid()


def _block(timeout: float) -> None:
    threading.Event().wait(timeout)  # a call that is still running when its worker dies


def _call_peer(peer: int, timeout: float) -> int:
    return remotecall(myid, peer).fetch(timeout)


def _put(channel: RemoteChannel, value) -> None:
    channel.put(value)


def _take(channel: RemoteChannel):
    return channel.take()


def _square_and_where(x: int) -> tuple[int, int]:
    return x * x, myid()


def _kill_myself() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


# -- plumbing -------------------------------------------------------------------------------
def _name(manager: ClusterManager) -> str:
    """How messages name a manager (its class: a ``__repr__`` may hide a subclass)."""
    return f"{type(manager).__name__}(...)"


def _require(condition: bool, step: str, message: str) -> None:
    if not condition:
        raise ManagerCheckFailed(f"check_cluster_manager, step '{step}': {message}")


@contextlib.contextmanager
def _step(step: str, hint: str) -> Iterator[None]:
    """Turn an unexpected exception inside a step into a ManagerCheckFailed naming the step."""
    try:
        yield
    except ManagerCheckFailed:
        raise
    except Exception as exc:
        raise ManagerCheckFailed(f"check_cluster_manager, step '{step}': {_explain(exc)} "
                                 f"(hint: {hint})") from exc


def _explain(exc: BaseException) -> str:
    """``Type: message``; for a group (several workers failed), the first failure as well
    (a CompositeException's message names it already)."""
    text = f"{type(exc).__name__}: {exc}"
    inner = getattr(exc, "exceptions", None)
    if inner and not isinstance(exc, CompositeException):
        text += f"; the first: {_explain(inner[0])}"
    return text


def _within(timeout: float, step: str, fn: Callable, *args, what: str, **kwargs):
    """``fn(*args, **kwargs)`` on a helper thread; fail if it takes longer than ``timeout``."""
    future = in_thread(lambda: fn(*args, **kwargs), name="distexec-check")
    try:
        return future.result(timeout)
    except cf.TimeoutError:
        if future.done():  # fn itself raised it
            raise
        raise ManagerCheckFailed(f"check_cluster_manager, step '{step}': timed out after "
                                 f"{timeout} s waiting for {what} (launch() or connect() may "
                                 "be blocked)") from None


def _ending(future, timeout: float):
    """How a Julia-style Future ended: its exception, ``_RETURNED``, or None (still running)."""
    try:
        future.wait(timeout)
    except WaitTimeout:
        return None
    except Exception as exc:
        return exc
    return _RETURNED


_RETURNED = "returned normally"


def _describe(ending, timeout: float) -> str:
    if ending is None:
        return f"was still running {timeout} s later"
    if ending is _RETURNED:
        return "returned normally"
    return f"ended with {type(ending).__name__}: {ending}"


def _wait_for(predicate: Callable[[], bool], timeout: float, step: str, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise ManagerCheckFailed(f"check_cluster_manager, step '{step}': {message}")
        time.sleep(0.02)


def _remove_quietly(pids: list[int]) -> None:
    """Best effort: the check leaves no worker behind, whatever happened."""
    left = [p for p in pids if p in procs()]
    if not left:
        return
    try:
        rmprocs(left, waitfor=30)
    except Exception as exc:  # the check's own failure is the one to report
        log.warning("check_cluster_manager: could not remove workers %s: %r", left, exc)
