"""DistributedExecutor: the cluster as a ``concurrent.futures.Executor``.

Owns task queueing, load balancing over workers, the executor futures and their errors,
and shutdown; ``map`` checks its arguments and leaves the rest (chunks, deadlines, bounded
lazy submission) to ``distexec.ordered_map``. Imports ``distexec.ordered_map``,
``distexec.pools``, ``distexec.cluster``, ``distexec.runtime`` and below.

    submit ──► queue ──► pump: a worker with a free slot (MAX_IN_FLIGHT per worker)
                          └─► one CALL_FETCH ──► RESULT ──► reader thread completes the future
                          └─► a backlog of short tasks: several in one CALL_FETCH (a batch,
                              runtime.batches), each pickled alone, each with its own outcome
    worker dies ──► only its in-flight futures fail (ProcessExitedException); the queue
                    goes on to the other workers
    shutdown ──► (cancel queued) ──► wait ──► remove the workers this executor launched
    interpreter exit ──► no new futures; wait for every executor's queued and running work
                         (before the cluster's own atexit hook removes the workers)
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import pickle
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import BrokenExecutor
from concurrent.futures._base import RUNNING
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from . import ordered_map
from .cluster import membership
from .cluster.local import LocalManager
from .errors import (
    AllWorkersExited,
    MessageTooLarge,
    ProcessExitedException,
    RemoteDeserializationError,
    RemoteException,
    WaitTimeout,
)
from .pools import AbstractWorkerPool, WorkerPool
from .protocol import serialization
from .protocol.frames import Kind, configured_max_message_size
from .runtime import batches, calls
from .runtime.context import ClusterContext, current_context
from .runtime.refs import invoke_callbacks_guarded

if TYPE_CHECKING:  # annotations only
    from .cluster.manager import ClusterManager

_P = ParamSpec("_P")
_T = TypeVar("_T")

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
        if sys.version_info >= (3, 11):
            ex.add_note(note)
        else:  # Python 3.10: the exceptiongroup backport displays __notes__
            ex.__notes__ = [*(notes or ()), note]  # type: ignore[attr-defined]  # 3.11+ in stubs
    return ex


class _ExecutorFuture(cf.Future):
    """The executor's future: a stdlib Future that raises falsey exceptions too.

    Python < 3.14 tests the exception's truth in ``result()`` (gh-132063), so an exception
    whose ``__bool__`` or ``__len__`` says False made ``result()`` return None.
    """

    def _invoke_callbacks(self) -> None:  # on a reader thread: sys.exit in one must not end it
        invoke_callbacks_guarded(self)

    def _Future__get_result(self):  # the name-mangled private method result() calls
        if self._exception is not None:
            try:
                raise self._exception
            finally:
                # break the cycle through the exception's traceback (the stdlib's idiom)
                self = None  # type: ignore[assignment]
        return self._result

    # Where the task went, once sent: (context, pid). A caller that waits without a timeout
    # reads that connection itself rather than being woken by its reader thread.
    _sent_to: tuple[Any, int] | None = None
    _reading: Any = None  # the connection a waiting thread reads for this future, meanwhile

    def _read_while_waiting(self) -> None:
        sent_to = self._sent_to
        if sent_to is not None and self._state == RUNNING:
            ctx, pid = sent_to
            ctx.read_while_waiting(pid, self.done, self)

    def set_result(self, result) -> None:
        super().set_result(result)
        self._wake_reading()

    def set_exception(self, exception) -> None:
        super().set_exception(exception)
        self._wake_reading()

    def _wake_reading(self) -> None:
        """Completed by another thread (a retry elsewhere, a broken executor) while a waiting
        thread reads the connection the task first went to: it must look up."""
        reading = self._reading
        if reading is not None:
            reading.poke()

    def result(self, timeout=None):
        return self._after_reading(super().result, timeout)

    def exception(self, timeout=None):
        return self._after_reading(super().exception, timeout)

    def _after_reading(self, get, timeout):
        if timeout is None:
            self._read_while_waiting()
        try:
            return get(timeout)
        except cf.TimeoutError as exc:
            if sys.version_info >= (3, 11) or self.done():
                raise  # 3.11: the builtin TimeoutError already; or the task itself raised it
            raise WaitTimeout(*exc.args) from None  # 3.10: a timeout that is also the builtin


class _Task:
    __slots__ = ("future", "fn", "args", "kwargs", "started")

    def __init__(self, future, fn, args, kwargs):
        self.future, self.fn, self.args, self.kwargs = future, fn, args, kwargs
        self.started = False

    def start(self) -> bool:
        """Mark the future running unless it was cancelled; False: drop the task.

        A started task that could not be sent is queued again, and starts only once.
        """
        if not self.started:
            self.started = self.future.set_running_or_notify_cancel()
        return self.started


def _complete(future: cf.Future, is_error: bool, value: Any) -> None:
    if is_error:
        future.set_exception(original_exception(value) if isinstance(value, RemoteException)
                             else value)
    else:
        future.set_result(value)


class _TaskWaiter:
    """Receives one task's RESULT (in the reader thread) and completes its future."""

    __slots__ = ("waitingfor", "task", "executor", "sent")

    def __init__(self, executor: DistributedExecutor, pid: int, task: _Task):
        self.waitingfor, self.task, self.executor = pid, task, executor
        self.sent = time.perf_counter()

    def deliver(self, value: Any, is_error: bool) -> None:
        self.executor._sizer.measured_alone(self.task.fn, time.perf_counter() - self.sent)
        _complete(self.task.future, is_error, value)
        self.executor._task_done(self.waitingfor)

    def fail(self, exc: BaseException) -> None:
        self.task.future.set_exception(exc)
        self.executor._task_done(self.waitingfor)


class _BatchWaiter:
    """Receives a batch's outcomes (one RESULT, or one per task) and completes each future."""

    __slots__ = ("waitingfor", "tasks", "executor", "rrid", "received")

    def __init__(self, executor: DistributedExecutor, pid: int, tasks: list[_Task], rrid):
        self.waitingfor, self.tasks, self.executor, self.rrid = pid, tasks, executor, rrid
        self.received = 0

    def deliver(self, value: Any, is_error: bool) -> None:
        executor, pid = self.executor, self.waitingfor
        if not is_error and type(value) is not batches.Outcomes:  # a worker of another version?
            value, is_error = TypeError(f"a batch came back as {type(value).__name__}"), True
        if is_error:  # the batch message itself failed on the worker: so did each of its tasks
            for task in self.tasks[self.received:]:
                _complete(task.future, True, value)
            executor._task_done(pid)
            return
        for k in range(len(value.items)):
            failed, result = value.load(executor._ctx, pid, k)
            _complete(self.tasks[value.start + k].future, failed, result)
        self.received += len(value.items)
        if self.received < len(self.tasks):  # the rest follows in further messages
            try:
                executor._ctx.add_waiter(self.rrid, self)
            except ProcessExitedException as exc:
                self.fail(exc)
            return
        executor._sizer.measured_batch([task.fn for task in self.tasks], value.longest)
        executor._task_done(pid)

    def fail(self, exc: BaseException) -> None:
        for task in self.tasks[self.received:]:
            task.future.set_exception(exc)
        self.executor._task_done(self.waitingfor)


class DistributedExecutor(cf.Executor):
    """A ``concurrent.futures.Executor`` whose tasks run on distexec workers.

    ``DistributedExecutor(4)`` launches four local workers that it owns;
    ``manager=SomeManager(...)`` launches through a cluster manager; ``pool=WorkerPool([...])``
    uses existing workers without owning them. ``shutdown()`` removes only what it launched.
    """

    def __init__(self, max_workers: int | None = None, *, pool: AbstractWorkerPool | None = None,
                 manager: ClusterManager | None = None, initializer: Callable | None = None,
                 initargs: tuple = (), **addprocs_params: Any) -> None:
        if max_workers is not None and (isinstance(max_workers, bool) or max_workers <= 0):
            raise ValueError("max_workers must be greater than 0")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        self._ctx: ClusterContext = current_context()
        self._lock = threading.Lock()
        self._queue: deque[_Task] = deque()
        self._in_flight: dict[int, int] = {}  # messages (single tasks or batches) per worker
        self._targets_cache: tuple = (None, [])
        self._sizer = batches.BatchSizer()
        self._batch_bytes = min(batches.BATCH_BYTES, configured_max_message_size() // 2)
        self._idle = threading.Condition(self._lock)
        self._shutdown = False
        self._broken: str | bool = False
        self._initializer, self._initargs = initializer, tuple(initargs)
        self._initialized = initializer is None
        self._initializing = False
        self._owned: list[int] = []
        self._last_lost: int | None = None  # the last of this executor's workers that died
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

    def submit(self, fn: Callable[_P, _T], /, *args: _P.args,
               **kwargs: _P.kwargs) -> cf.Future[_T]:
        """Schedule ``fn(*args, **kwargs)``; returns a ``concurrent.futures.Future``."""
        with self._lock:
            if self._broken:
                raise BrokenExecutor(self._broken)
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if _interpreter_exiting:
                raise RuntimeError("cannot schedule new futures after interpreter shutdown")
            future: cf.Future = _ExecutorFuture()
            # Tasks queued already mean every slot is taken: each slot that frees up pumps.
            backlog = bool(self._queue)
            self._queue.append(_Task(future, fn, args, kwargs))
            start_init = not self._initialized and not self._initializing
            self._initializing = self._initializing or start_init
        if start_init:
            threading.Thread(target=self._run_initializer, daemon=True,
                             name="distexec-initializer").start()
        if not backlog:
            self._pump()
        return future

    def map(self, fn: Callable[..., _T], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1, buffersize: int | None = None,
            progress: bool | None = None) -> Iterator[_T]:
        """Like ``Executor.map``, with Python 3.14's ``buffersize`` on every Python.

        Without ``buffersize`` every input is submitted now; with it, at most ``buffersize``
        tasks (chunks) are outstanding and one more is submitted per result taken, so infinite
        iterables work. ``chunksize`` items travel as one message. ``timeout`` counts from
        this call. ``progress=True`` draws a tqdm bar when tqdm is installed; ``None`` (the
        default) follows ``DISTEXEC_PROGRESS``, which ``distexec run --progress`` sets.
        """
        if buffersize is not None and (isinstance(buffersize, bool)
                                       or not isinstance(buffersize, int)):
            raise TypeError("buffersize must be an integer or None")
        if buffersize is not None and buffersize < 1:
            raise ValueError("buffersize must be None or > 0")
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        deadline = None if timeout is None else time.monotonic() + timeout
        return ordered_map.results(self, fn, iterables, deadline=deadline, chunksize=chunksize,
                                   buffersize=buffersize, progress=progress)

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
        workers = self.pool.workers()
        key = (self._ctx.membership_version, workers)
        cached_key, targets = self._targets_cache
        if key != cached_key:  # kept until a worker comes, goes or changes state
            live = set(self._ctx.live_pids())
            targets = [p for p in workers if p in live]
            self._targets_cache = (key, targets)
        return targets

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
                    in_flight = self._in_flight
                    pid = min(targets, key=lambda p: in_flight.get(p, 0))
                    if in_flight.get(pid, 0) >= MAX_IN_FLIGHT:
                        return
                    tasks = self._take_tasks(targets)
                    if not tasks:
                        continue  # all cancelled
                    in_flight[pid] = in_flight.get(pid, 0) + 1
            if doomed is not None:
                _fail_all(doomed, self._all_exited_error)
                return
            self._dispatch(pid, tasks)

    def _take_tasks(self, targets: list[int]) -> list[_Task]:
        """With the lock held: the next task, or a batch of them when a backlog waits.

        A batch holds tasks of one function only, sized by ``runtime.batches.BatchSizer``.
        """
        queue = self._queue
        if len(queue) == 1:  # the common case of a task submitted to an idle executor
            task = queue.popleft()
            return [task] if task.start() else []
        slots = len(targets) * MAX_IN_FLIGHT
        free = slots - sum(self._in_flight.get(p, 0) for p in targets)
        first = queue[0].fn
        limit = self._sizer.limit(first, len(queue), free, slots)
        tasks: list[_Task] = []
        while queue and len(tasks) < limit:
            fn = queue[0].fn
            if fn is not first and batches.cost_key(fn) != batches.cost_key(first):
                break
            task = queue.popleft()
            if task.start():
                tasks.append(task)
        return tasks

    def _dispatch(self, pid: int, tasks: list[_Task]) -> None:
        """Send ``tasks`` to ``pid``: one message, a task alone or a batch, each task pickled
        on its own; several messages when together they exceed the batch size in bytes."""
        ctx = self._ctx
        if pid == ctx.myid:  # a pool that hands out the master itself
            ctx.runner.submit(lambda: self._run_here(pid, tasks))
            return
        messages = batches.by_size(self._pickle_tasks(pid, tasks), self._batch_bytes)
        if not messages:
            self._task_done(pid)
            return
        if len(messages) > 1:  # pickled for this worker already: they all go there
            with self._lock:
                self._in_flight[pid] = self._in_flight.get(pid, 0) + len(messages) - 1
        for pickled in messages:
            self._send(pid, pickled)

    def _pickle_tasks(self, pid: int, tasks: list[_Task]) -> list[tuple]:
        """(task, payload, buffers) for each task; one whose arguments cannot be pickled
        fails alone."""
        pickled = []
        for task in tasks:
            try:
                payload, buffers = serialization.dumps((task.fn, task.args, task.kwargs), pid)
            except BaseException as exc:  # an argument that cannot be pickled fails this task only
                task.future.set_exception(exc)
                continue
            pickled.append((task, payload, buffers))
        return pickled

    def _send(self, pid: int, pickled: list[tuple]) -> None:
        ctx = self._ctx
        rrid = ctx.next_rrid()
        for task, _, _ in pickled:
            task.future._sent_to = (ctx, pid)
        if len(pickled) == 1:
            task, payload, buffers = pickled[0]
            waiter: _TaskWaiter | _BatchWaiter = _TaskWaiter(self, pid, task)
        else:
            waiter = _BatchWaiter(self, pid, [task for task, _, _ in pickled], rrid)
            sent = [(payload, [pickle.PickleBuffer(b) for b in buffers])
                    for _, payload, buffers in pickled]
            payload, buffers = serialization.dumps((batches.run_batch, (sent, ctx.myid), {}), pid)
        try:
            ctx.add_waiter(rrid, waiter)
            ctx.send(pid, Kind.CALL_FETCH, payload=payload, buffers=buffers, notify=rrid)
        except (ProcessExitedException, OSError):
            ctx.pop_waiter(rrid)  # it never reached the worker: another one runs it
            self._requeue(pid, [task for task, _, _ in pickled])
        except MessageTooLarge as exc:  # a single task (batches stay under half the limit)
            ctx.pop_waiter(rrid)
            waiter.fail(exc)

    def _requeue(self, pid: int, tasks: list[_Task]) -> None:
        with self._lock:
            self._in_flight[pid] = self._in_flight.get(pid, 1) - 1
            self._queue.extendleft(reversed(tasks))
        self._pump()

    def _run_here(self, pid: int, tasks: list[_Task]) -> None:
        for task in tasks:
            is_error, value = calls.invoke(self._ctx, task.fn, task.args, task.kwargs)
            _complete(task.future, is_error, value)
        self._task_done(pid)

    def _task_done(self, pid: int) -> None:
        with self._lock:
            self._in_flight[pid] = self._in_flight.get(pid, 1) - 1
            if not self._queue:  # nothing to pump
                if not any(self._in_flight.values()):
                    self._idle.notify_all()
                return
        self._pump()

    def _worker_lost(self, pid: int) -> None:
        with self._lock:
            if self._in_flight.pop(pid, None) is not None:  # one of ours: it was sent work
                self._last_lost = pid
        self._pump()  # queued work moves to the others (or the executor breaks if none is left)

    # -- initializer and breaking ------------------------------------------------------------
    def _run_initializer(self) -> None:
        assert self._initializer is not None  # submit() starts this only for an initializer
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
        _fail_all(doomed, lambda: BrokenExecutor(reason))

    def _all_exited_error(self) -> BaseException:
        """What a queued task gets once no worker is left: the last death, as BrokenExecutor."""
        dead = None if self._last_lost is None else self._ctx.deleted.get(self._last_lost)
        if dead is None:
            return BrokenExecutor(self._broken)
        return AllWorkersExited(dead.pid, dead.exitcode, dead.signal, dead.lost_reason)

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


def _fail_all(tasks: list[_Task], error: Callable[[], BaseException]) -> None:
    for task in tasks:
        if task.start():
            task.future.set_exception(error())


def _lost_listener(executor: DistributedExecutor):
    ref = weakref.ref(executor)

    def on_lost(ctx, pid):
        target = ref()
        if target is None:
            ctx.on_peer_lost.remove(on_lost)
        else:
            target._worker_lost(pid)
    return on_lost


def _cpu_count() -> int:
    import os
    return os.cpu_count() or 1
