"""DistributedExecutor: the cluster as a ``concurrent.futures.Executor``.

Owns task queueing, load balancing over workers, and shutdown; its futures are
``distexec.executor_futures``, its workers' initializers, retirements and replacements
``distexec.executor_workers``; ``map`` checks its arguments and leaves the rest (chunks,
deadlines, bounded lazy submission) to ``distexec.ordered_map``. Imports those,
``distexec.pools``, ``distexec.cluster``, ``distexec.runtime`` and below.

    submit ──► queue ──► pump: a ready worker with a free slot (MAX_IN_FLIGHT per worker)
                          └─► one CALL_FETCH (IN_ORDER) ──► RESULT ──► the future completes
                          └─► a backlog of short tasks: several in one CALL_FETCH (a batch,
                              runtime.batches), each pickled alone, each with its own outcome
    worker ──► runs the executor's messages one at a time, in order, on its main thread
               (ProcessPoolExecutor's model: one running, the next one waiting there)
    worker dies ──► only its in-flight futures fail (ProcessExitedException); the queue
                    goes on to the other workers; a launched worker is replaced
    shutdown ──► (cancel queued) ──► wait ──► remove the workers this executor launched
    interpreter exit ──► no new futures; wait for every executor's queued and running work
                         (before the cluster's own atexit hook removes the workers)
    made on a worker ──► a cluster of its own, which the worker masters (_cluster_for); its
                         workers are the worker's children and die with it
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import operator
import os
import pickle
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import BrokenExecutor
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from . import ordered_map
from .cluster import membership
from .cluster.local import LocalManager
from .errors import (
    AllWorkersExited,
    BrokenDistributedExecutor,
    ProcessExitedException,
    RemoteException,
)
from .executor_futures import ExecutorFuture, Task, complete, in_callbacks_of
from .executor_load import InFlight
from .executor_routes import InOrderRoutes
from .executor_workers import WorkerLifecycle, check_initializer
from .pools import AbstractWorkerPool, WorkerPool
from .protocol import serialization, unpicklable
from .protocol.frames import Flag, Kind, configured_max_message_size
from .runtime import batches, calls
from .runtime.arguments import check_callable
from .runtime.context import (ClusterContext, WorkerState, current_context,
                               private_master_context, using_context)

if TYPE_CHECKING:  # annotations only
    from .cluster.manager import ClusterManager

_P = ParamSpec("_P")
_T = TypeVar("_T")

__all__ = ["DistributedExecutor", "BrokenExecutor"]

log = logging.getLogger("concurrent.futures")

MAX_IN_FLIGHT = 2  # per worker: one running, one on its way, so a worker never waits for work
#: While a map submits its inputs, the queue is pumped once per this many (``_queueing``).
QUEUEING_PUMP_EVERY = 1024

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
    executors = list(_live_executors)
    for executor in executors:
        try:
            executor._wait_idle_or_stop()
        except KeyboardInterrupt:  # a Ctrl-C while the program ends: end it, stop them all
            for other in executors:
                other._stop_on_interrupt()
            return


try:
    threading._register_atexit(_python_exit)  # type: ignore[attr-defined]
except AttributeError:  # not CPython: the plain hook still runs before the cluster's
    import atexit
    atexit.register(_python_exit)


class _TaskWaiter:
    """Receives one task's RESULT (in the reader thread) and completes its future."""

    __slots__ = ("waitingfor", "task", "executor", "sent", "via_lane")

    def __init__(self, executor: DistributedExecutor, pid: int, task: Task):
        self.waitingfor, self.task, self.executor = pid, task, executor
        self.sent = time.perf_counter()
        self.via_lane: bool | None = None  # set by InOrderRoutes when it goes

    def deliver(self, value: Any, is_error: bool) -> None:
        self.executor._sizer.measured_alone(self.task.fn, time.perf_counter() - self.sent)
        self.executor._task_done(self.waitingfor, self.via_lane,
                                 settle=lambda: complete(self.task.future, is_error, value))

    def fail(self, exc: BaseException) -> None:
        self.task.future.set_exception(exc)
        self.executor._task_done(self.waitingfor, self.via_lane)

    @property
    def tasks(self) -> list[Task]:  # as a _BatchWaiter's
        return [self.task]


def _probe() -> None:
    """The empty task each worker gets from an executor ahead of its first task."""


class _ProbeWaiter:
    """Times the round trip of ``_probe``: what a task costs beyond its own work.

    ``BatchSizer.is_short`` compares each function's tasks with the quickest round trip
    seen; without this, an executor that only ever runs long tasks would take its long tasks
    for short ones (and have its waiting threads read their replies, which costs more CPU
    than it saves when replies are far apart).
    """

    __slots__ = ("waitingfor", "sizer", "sent")

    def __init__(self, pid: int, sizer: batches.BatchSizer):
        self.waitingfor, self.sizer = pid, sizer
        self.sent = time.perf_counter()

    def deliver(self, value: Any, is_error: bool) -> None:
        if not is_error:
            self.sizer.measured_alone(_probe, time.perf_counter() - self.sent)

    def fail(self, exc: BaseException) -> None:
        pass  # the worker is gone: its tasks' own futures say so


class _BatchWaiter:
    """Receives a batch's outcomes (one RESULT, or one per task) and completes each future."""

    __slots__ = ("waitingfor", "tasks", "executor", "rrid", "received", "via_lane")

    def __init__(self, executor: DistributedExecutor, pid: int, tasks: list[Task], rrid):
        self.waitingfor, self.tasks, self.executor, self.rrid = pid, tasks, executor, rrid
        self.received = 0
        self.via_lane: bool | None = None  # set by InOrderRoutes when it goes

    def deliver(self, value: Any, is_error: bool) -> None:
        executor, pid = self.executor, self.waitingfor
        if not is_error and type(value) is not batches.Outcomes:  # a worker of another version?
            value, is_error = TypeError(f"a batch came back as {type(value).__name__}"), True
        if is_error:  # the batch message itself failed on the worker: so did each of its tasks
            for task in self.tasks[self.received:]:
                complete(task.future, True, value)
            executor._task_done(pid, self.via_lane)
            return
        for k in range(len(value.items)):
            failed, result = value.load(executor._ctx, pid, k)
            complete(self.tasks[value.start + k].future, failed, result)
        self.received += len(value.items)
        if self.received < len(self.tasks):  # the rest follows in further messages
            try:
                executor._ctx.add_waiter(self.rrid, self)
            except ProcessExitedException as exc:
                self.fail(exc)
            return
        executor._sizer.measured_batch([task.fn for task in self.tasks], value.longest)
        executor._task_done(pid, self.via_lane)

    def fail(self, exc: BaseException) -> None:
        for task in self.tasks[self.received:]:
            task.future.set_exception(exc)
        self.executor._task_done(self.waitingfor, self.via_lane)




class DistributedExecutor(cf.Executor):
    """A ``concurrent.futures.Executor`` whose tasks run on distexec workers.

    ``DistributedExecutor(4)`` launches four local workers that it owns;
    ``manager=SomeManager(...)`` launches through a cluster manager; ``pool=WorkerPool([...])``
    uses existing workers without owning them. ``shutdown()`` removes only what it launched.

    The arguments are ProcessPoolExecutor's, in its order. Tasks follow its execution model:
    a worker runs one task at a time, on its main thread, so ``max_workers=N`` runs at most N
    at once. ``initializer(*initargs)`` runs on every worker before its first task: the
    workers there at the start and those that join later. A launched worker that dies is
    replaced (its own tasks fail with ``ProcessExitedException``); ``max_tasks_per_child=N``
    replaces a worker after N tasks. ``mp_context`` is accepted for compatibility: distexec
    workers are always fresh interpreters (``python -m distexec worker``), whatever the
    start method.
    """

    def __init__(self, max_workers: int | None = None, mp_context: Any = None,
                 initializer: Callable | None = None, initargs: tuple = (), *,
                 max_tasks_per_child: int | None = None, pool: AbstractWorkerPool | None = None,
                 manager: ClusterManager | None = None, **addprocs_params: Any) -> None:
        if max_workers is not None:
            # ProcessPoolExecutor's checks, in its order: a str fails the comparison (TypeError),
            # a float is no index (TypeError), a bool is the int it is.
            if max_workers <= 0:
                raise ValueError("max_workers must be greater than 0")
            max_workers = operator.index(max_workers)
        if mp_context is not None:
            mp_context.get_start_method(allow_none=False)  # ProcessPoolExecutor's own check
        _check_max_tasks(max_tasks_per_child, pool)
        check_initializer(initializer, tuple(initargs))
        self._mp_context = mp_context
        self._ctx: ClusterContext = _cluster_for(pool)
        self._lock = threading.Lock()
        self._callback_lock = threading.RLock()
        self._queue: deque[Task] = deque()
        self._in_flight = InFlight(MAX_IN_FLIGHT)  # messages (tasks or batches) per worker
        self._targets_cache: tuple = (None, [])
        self._sizer = batches.BatchSizer()
        self._routes = InOrderRoutes(self._ctx)  # by a worker's task lane or its connection
        self._probed: set[int] = set()  # workers that got their _probe
        # Workers a message could not be sent to: gone, or going (their connection failed
        # before its reader saw the end). Nothing more goes there; _worker_lost forgets them.
        self._unreachable: set[int] = set()
        # Per worker: the __main__ globals its tasks carried, so that each goes once (and
        # again only when the master binds the name to another object).
        self._sent_globals: dict[int, serialization.SentGlobals] = {}
        # Per worker: held while its tasks are pickled and sent, so that a second pumping
        # thread neither ships those globals again nor overtakes a message that carries them.
        self._dispatching: dict[int, threading.Lock] = {}
        self._batch_bytes = min(batches.BATCH_BYTES, configured_max_message_size() // 2)
        self._idle = threading.Condition(self._lock)
        self._settling = 0  # replies taken whose futures are not complete yet (_task_done)
        self._interrupted = False  # a Ctrl-C stopped the wait for its tasks: none is awaited
        self._shutdown = False
        self._broken: str | bool = False
        self._last_lost: int | None = None  # the last of this executor's workers that died
        self._release_lock = threading.Lock()
        self._queueing_depth = 0  # maps submitting their inputs now (``_queueing``)
        self._queued = 0  # tasks they submitted
        owned: list[int] = []
        params: dict | None = None
        if pool is None:
            manager, params = _manager_and_params(max_workers, manager, addprocs_params)
            try:
                owned = membership.addprocs(self._ctx, manager, dict(params))
            except BaseException:
                self._close_private()
                raise
            with using_context(self._ctx):
                pool = WorkerPool(owned)
        elif addprocs_params or manager is not None:
            raise TypeError("pool= uses existing workers: manager= and addprocs parameters "
                            f"({', '.join(addprocs_params) or 'manager'}) launch new ones")
        self.pool = pool
        self._workers = WorkerLifecycle(
            self._ctx, pool, initializer=initializer, initargs=tuple(initargs),
            max_tasks=max_tasks_per_child, launch_params=params, owned=owned, pump=self._pump,
            broken=self._break, wanted=self._wants_workers)
        self._ctx.on_peer_lost.append(_lost_listener(self))
        _live_executors.add(self)

    # -- public API --------------------------------------------------------------------------
    @property
    def _max_workers(self) -> int:
        return max(1, len(self._targets()))

    def __reduce__(self):
        # (It would fail anyway, at the cluster's cookie, with words about a cookie.)
        raise TypeError(f"cannot pickle {type(self).__name__!r} object: an executor serves the "
                        "process that made it; a task that needs one makes its own")

    def workers(self) -> list[int]:
        """The worker pids this executor sends tasks to."""
        return self._targets()

    def submit(self, fn: Callable[_P, _T], /, *args: _P.args,
               **kwargs: _P.kwargs) -> cf.Future[_T]:
        """Schedule ``fn(*args, **kwargs)``; returns a ``concurrent.futures.Future``."""
        check_callable(fn, "submit")
        with self._lock:
            if self._broken:
                raise BrokenDistributedExecutor(self._broken)
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if _interpreter_exiting:
                raise RuntimeError("cannot schedule new futures after interpreter shutdown")
            future: cf.Future = ExecutorFuture(self._callback_lock)
            # Tasks queued already mean every slot is taken: each slot that frees up pumps.
            backlog = bool(self._queue)
            self._queue.append(Task(future, fn, args, kwargs))
            if self._queueing_depth:
                self._queued += 1
                backlog = self._queued % QUEUEING_PUMP_EVERY != 1
        if not backlog:
            self._pump()
        return future

    @contextlib.contextmanager
    def _queueing(self) -> Iterator[None]:
        """Submits inside only queue their tasks, but for a pump per ``QUEUEING_PUMP_EVERY``
        and one at the end: a map's inputs wait as a backlog, and a backlog travels in
        batches. Submitted and pumped one by one, each task of a map finds a free slot and
        goes alone as long as the workers keep up with the submits, which many workers do
        (256 slots at 128 workers): a message, a worker woken and a reply per tiny task."""
        with self._lock:
            self._queueing_depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._queueing_depth -= 1
            self._pump()

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
                if self._is_idle():
                    self._idle.notify_all()
        for task in cancelled:
            task.future.cancel()
        waits_for_itself = wait and in_callbacks_of(self._callback_lock)
        if wait and not waits_for_itself:
            self._wait_idle_or_stop()
            self._release_workers()
        else:
            threading.Thread(target=self._finish_in_background, daemon=True,
                             name="distexec-shutdown").start()
        if waits_for_itself:  # ProcessPoolExecutor's callback thread cannot join itself either
            raise RuntimeError("shutdown(wait=True) in a done-callback of this executor's "
                               "futures cannot wait: the callback runs where their results "
                               "arrive. The executor shuts down without waiting, as with "
                               "wait=False; call shutdown(wait=True) from another thread to "
                               "wait for it")

    def terminate_workers(self) -> None:
        """Stop the workers this executor launched now, with SIGTERM (Python 3.14's method).

        Queued tasks are cancelled, running ones fail with ``ProcessExitedException`` (a
        ``BrokenProcessPool``), nothing is replaced, and the executor is shut down. Workers of
        a ``pool=`` that the executor did not launch are not its to stop: their running tasks
        finish.
        """
        self._force_shutdown(kill=False)

    def kill_workers(self) -> None:
        """Like ``terminate_workers``, with SIGKILL (Python 3.14's method)."""
        self._force_shutdown(kill=True)

    # -- dispatching -------------------------------------------------------------------------
    def _targets(self) -> list[int]:
        pool = self.pool
        # a WorkerPool counts its changes: no sorted copy of its members per task
        workers = pool.changes if isinstance(pool, WorkerPool) else pool.workers()
        key = (self._ctx.membership_version, workers)
        cached_key, targets = self._targets_cache
        if key != cached_key:  # kept until a worker comes, goes or changes state
            workers = pool.workers()
            live = set(self._ctx.live_pids())
            targets = [p for p in workers if p in live]
            self._targets_cache = (key, targets)
        return targets

    def _pump(self) -> None:
        """Send queued tasks to workers with a free slot, least loaded first."""
        while True:
            doomed = tasks = None
            probe = False
            with self._lock:
                if not self._queue or self._broken:
                    return
                targets = self._targets()
                self._in_flight.track(targets)
                usable, new = self._workers.usable(targets)
                if self._unreachable:
                    usable = [p for p in usable if p not in self._unreachable]
                pid = self._least_loaded(usable, targets)
                if not targets and not self._workers.replacing():
                    doomed = self._mark_broken("all workers of this executor have exited")
                elif pid is not None:
                    tasks = self._take_tasks(pid, targets)
                    if tasks:
                        self._in_flight.add(pid)
                        self._workers.count_sent(pid, len(tasks))
                        probe = pid not in self._probed
                        self._probed.add(pid)
            if new:  # their initializer first; each pumps again when it is done
                self._workers.initialize(new)
            if doomed is not None:
                _fail_all(doomed, self._all_exited_error)
                return
            if pid is None:
                return
            if tasks:
                if probe and pid != self._ctx.myid:
                    self._send_probe(pid)
                self._dispatch(pid, tasks)

    def _least_loaded(self, usable: list[int], targets: list[int]) -> int | None:
        """With the lock held: the usable worker with the fewest messages in flight, if it
        has a free slot (O(1) in the number of workers when all targets are usable)."""
        if not usable:
            return None
        accept = None if usable is targets else set(usable).__contains__
        return self._in_flight.least_loaded(accept)

    def _take_tasks(self, pid: int, targets: list[int]) -> list[Task]:
        """With the lock held: the next task, or a batch of them when a backlog waits.

        A batch holds tasks of one function only, sized by ``runtime.batches.BatchSizer``,
        and no more than ``pid`` may still run (``max_tasks_per_child``).
        """
        queue = self._queue
        if len(queue) == 1:  # the common case of a task submitted to an idle executor
            task = queue.popleft()
            return [task] if task.start() else []
        slots = len(targets) * MAX_IN_FLIGHT
        free = max(0, slots - self._in_flight.total)
        first = queue[0].fn
        limit = self._sizer.limit(first, len(queue), free, slots)
        quota = self._workers.quota(pid)
        if quota is not None:
            limit = max(1, min(limit, quota))
        tasks: list[Task] = []
        while queue and len(tasks) < limit:
            fn = queue[0].fn
            if fn is not first and batches.cost_key(fn) != batches.cost_key(first):
                break
            task = queue.popleft()
            if task.start():
                tasks.append(task)
        return tasks

    def _dispatch(self, pid: int, tasks: list[Task]) -> None:
        """Send ``tasks`` to ``pid``: one message, a task alone or a batch, each task pickled
        on its own; several messages when together they exceed the batch size in bytes.

        One thread at a time pickles and sends to a worker (``_dispatching``), so that a
        message that leaves a ``__main__`` global out never overtakes the one that carries
        it, and no global goes twice. What fails is settled after, with no lock held: that
        runs the futures' callbacks, and may pump to another worker.
        """
        ctx = self._ctx
        if pid == ctx.myid:  # a pool that hands out the master itself
            ctx.runner.submit_in_order(lambda: self._run_here(pid, tasks))
            return
        lock = self._dispatching.get(pid)
        if lock is None:
            lock = self._dispatching.setdefault(pid, threading.Lock())
        with lock:
            pickled, unpicklable_tasks = self._pickle_tasks(pid, tasks)
            messages = batches.by_size(pickled, self._batch_bytes)
            if len(messages) > 1:  # pickled for this worker already: they all go there
                with self._lock:
                    self._in_flight.add(pid, len(messages) - 1)
            failures = [failed for failed in (self._send(pid, m) for m in messages) if failed]
        for task, exc in unpicklable_tasks:
            task.future.set_exception(exc)
        if not messages:
            self._task_done(pid)
        for waiter, error in failures:
            if error is None:  # it never reached the worker: another one runs it
                self._requeue(pid, waiter.tasks)
            else:
                waiter.fail(error)

    def _pickle_tasks(self, pid: int, tasks: list[Task]
                      ) -> tuple[list[tuple], list[tuple[Task, BaseException]]]:
        """(task, payload, buffers) for each task, and (task, error) for each whose arguments
        cannot be pickled: it fails alone.

        A worker runs the executor's tasks in the order they were sent, so a task leaves out
        the ``__main__`` globals that earlier tasks already took there (``_send`` records
        them once a message is sent), or that an earlier task of its batch takes.
        """
        sent = self._sent_globals.get(pid)
        if sent is None:
            sent = self._sent_globals.setdefault(pid, serialization.SentGlobals())
        if len(tasks) > 1:  # a batch: its tasks run in order, so the first to ship one ships it
            sent = sent.copy()
        pickled = []
        failed = []
        with using_context(self._ctx):  # whichever thread pumps: references check their cluster
            for task in tasks:
                try:
                    payload, buffers, task.shipped = serialization.dumps_tracked(
                        (task.fn, task.args, task.kwargs), pid, sent)
                except BaseException as exc:
                    unpicklable.note_what_failed_to_pickle(exc, task.fn, task.args, task.kwargs)
                    failed.append((task, exc))
                    continue
                if len(tasks) > 1 and task.shipped:
                    sent.commit(task.shipped)
                pickled.append((task, payload, buffers))
        return pickled, failed

    def _send(self, pid: int, pickled: list[tuple]
              ) -> "tuple[_TaskWaiter | _BatchWaiter, Exception | None] | None":
        """Send one message; if it failed, its waiter and the error (``None``: it never
        reached the worker) for ``_dispatch`` to settle."""
        ctx = self._ctx
        rrid = ctx.next_rrid()
        for task, _, _ in pickled:
            if self._sizer.is_short(task.fn):
                task.future._sent_to = (ctx, pid)
        if len(pickled) == 1:
            task, payload, buffers = pickled[0]
            waiter: _TaskWaiter | _BatchWaiter = _TaskWaiter(self, pid, task)
        else:
            waiter = _BatchWaiter(self, pid, [task for task, _, _ in pickled], rrid)
            inner = [(payload, [pickle.PickleBuffer(b) for b in buffers])
                     for _, payload, buffers in pickled]
            payload, buffers = serialization.dumps((batches.run_batch, (inner, ctx.myid), {}),
                                                   pid)
        try:
            self._routes.send(pid, rrid, waiter, payload, buffers)
        except (ProcessExitedException, OSError):
            return waiter, None
        except Exception as exc:  # MessageTooLarge (a single task: batches stay under half the
            return waiter, exc    # limit), or anything else: none of them may stay in flight
        self._commit_globals(pid, pickled)
        return None

    def _commit_globals(self, pid: int, pickled: list[tuple]) -> None:
        """The tasks just sent to ``pid`` took their ``__main__`` globals there: later tasks
        leave them out (``_pickle_tasks``)."""
        sent = self._sent_globals.get(pid)
        if sent is None:  # lost meanwhile (_worker_lost)
            return
        for task, _, _ in pickled:
            if task.shipped:
                sent.commit(task.shipped)

    def _send_probe(self, pid: int) -> None:
        """Send ``_probe`` to ``pid`` ahead of its first task (see ``_ProbeWaiter``)."""
        ctx = self._ctx
        rrid = ctx.next_rrid()
        payload, buffers = serialization.dumps((_probe, (), {}), pid)
        try:
            ctx.add_waiter(rrid, _ProbeWaiter(pid, self._sizer))
            self._routes.send_untracked(pid, rrid, payload, buffers)  # so it measures their way
        except Exception:  # (the worker is gone, say): the task that follows finds out
            ctx.pop_waiter(rrid)

    def _requeue(self, pid: int, tasks: list[Task]) -> None:
        """``tasks`` could not be sent to ``pid``: they go to another worker, or wait for
        ``pid``'s loss to be known (``_worker_lost``), never to ``pid`` again. (Sent again
        there, they would fail again, for ever, when this runs on the thread that reads
        ``pid``'s connection: its end is known only once this thread reads on.)"""
        with self._lock:
            self._in_flight.done(pid)
            self._unreachable.add(pid)
            self._queue.extendleft(reversed(tasks))
        self._pump()

    def _run_here(self, pid: int, tasks: list[Task]) -> None:
        for task in tasks:
            is_error, value = calls.invoke(self._ctx, task.fn, task.args, task.kwargs)
            complete(task.future, is_error, value)
        self._task_done(pid)

    def _task_done(self, pid: int, via_lane: bool | None = None,
                   settle: Callable[[], None] | None = None) -> None:
        """A message to ``pid`` is done (``via_lane``: which way it went, if it went);
        ``settle()``, if given, completes its futures.

        It runs after the next task has gone to ``pid``: completing a future wakes the thread
        waiting for it, which should find this thread about to wait for the next reply rather
        than still holding the GIL to pump (a context switch per task fewer on the master).
        The executor counts as idle only once it has run: ``shutdown(wait=True)`` returns
        with every future complete.
        """
        self._routes.done(pid, via_lane)
        with self._lock:
            left = self._in_flight.done(pid)
            queued = bool(self._queue)
            self._settling += settle is not None
        try:
            if left == 0:
                self._workers.idle(pid)  # retires it if it ran its max_tasks_per_child
            if queued:
                self._pump()
        finally:
            try:
                if settle is not None:
                    settle()
            finally:
                with self._lock:
                    self._settling -= settle is not None
                    if self._is_idle():
                        self._idle.notify_all()

    def _worker_lost(self, pid: int) -> None:
        never_sent = [task for waiter in self._routes.lost(pid) for task in waiter.tasks]
        with self._lock:
            self._queue.extendleft(reversed(never_sent))  # they go to another worker
            if self._in_flight.forget(pid) is not None:  # one of ours: it was sent work
                self._last_lost = pid
            # what it was sent (recycled workers would otherwise pile up here)
            self._probed.discard(pid)
            self._unreachable.discard(pid)
            self._sent_globals.pop(pid, None)
            self._dispatching.pop(pid, None)
        self._workers.lost(pid)  # replaced, if the executor launched it
        self._pump()  # queued work moves to the others (or the executor breaks if none is left)

    def _wants_workers(self) -> bool:
        """Whether a lost or retired worker should be replaced: the executor still takes
        tasks, or has some left to run."""
        return not self._shutdown or bool(self._queue) or self._in_flight.total > 0

    # -- breaking ----------------------------------------------------------------------------
    def _break(self, reason: str) -> None:
        with self._lock:
            if self._broken:
                return
            doomed = self._mark_broken(reason)
        _fail_all(doomed, lambda: BrokenDistributedExecutor(reason))

    def _all_exited_error(self) -> BaseException:
        """What a queued task gets once no worker is left: the last death, as BrokenExecutor."""
        dead = None if self._last_lost is None else self._ctx.deleted.get(self._last_lost)
        if dead is None:
            return BrokenDistributedExecutor(self._broken)
        return AllWorkersExited(dead.pid, dead.exitcode, dead.signal, dead.lost_reason,
                                dead.oom_evidence)

    def _mark_broken(self, reason: str) -> list[Task]:
        """Called with the lock held; returns the queued tasks to fail outside it."""
        self._broken = reason
        doomed, self._queue = list(self._queue), deque()
        self._idle.notify_all()
        return doomed

    # -- shutting down -----------------------------------------------------------------------
    def _is_idle(self) -> bool:
        """With the lock held: nothing queued, in flight, or being completed."""
        return not (self._queue or self._in_flight.total or self._settling)

    def _wait_idle(self) -> None:
        with self._lock:
            while not self._is_idle() and not self._broken and not self._interrupted:
                self._idle.wait()

    def _wait_idle_or_stop(self) -> None:
        """Wait until every submitted task is done. A Ctrl-C meanwhile (leaving a ``with``
        block, or the program's end) means stop, not wait: see ``_stop_on_interrupt``."""
        try:
            self._wait_idle()
        except KeyboardInterrupt:
            self._stop_on_interrupt()
            raise

    def _stop_on_interrupt(self) -> None:
        """Stop the executor's work at once: queued tasks cancelled, the workers it launched
        terminated (their running tasks fail), and nothing more awaited: the running tasks of
        a ``pool=`` it did not launch finish, their results unread."""
        with self._lock:
            if self._interrupted:
                return
            self._interrupted = True
            self._idle.notify_all()
        self.terminate_workers()

    def _release_workers(self) -> None:
        # Under a lock: a shutdown(wait=True) that follows a shutdown(wait=False) still
        # running must return only once the workers are gone.
        with self._release_lock:
            owned = self._workers.close()
            alive = [p for p in owned if p in self._ctx.live_pids()]
            if alive:
                membership.rmprocs(self._ctx, alive, waitfor=None)
            self._close_private()

    def _close_private(self) -> None:
        """Close the cluster this executor made for itself on a worker (``_cluster_for``)."""
        ctx = self._ctx
        if ctx.outer is not None and not ctx.closed:
            ctx.close()
            membership.stop_launcher(ctx)

    def _finish_in_background(self) -> None:
        self._wait_idle()
        self._release_workers()

    def _force_shutdown(self, kill: bool) -> None:
        owned = self._workers.stop_replacing()
        self.shutdown(wait=False, cancel_futures=True)
        live = set(self._ctx.live_pids())
        for pid in owned:
            if pid in live:
                _stop_worker(self._ctx, pid, kill)


def _cluster_for(pool: AbstractWorkerPool | None) -> ClusterContext:
    """The cluster an executor works in: the caller's, unless the caller is a worker (a task,
    say) and the executor is to launch workers of its own. Only process 1 adds workers to a
    cluster, so the worker becomes process 1 of a new cluster, private to this executor
    (as a ProcessPoolExecutor task can start a pool of its own); its workers are this
    worker's children and die with it, as the workers of any master do."""
    ctx = current_context()
    if pool is not None or ctx.role == "master":
        return ctx
    return private_master_context(ctx)


def _stop_worker(ctx: ClusterContext, pid: int, kill: bool) -> None:
    """SIGTERM or SIGKILL a local worker; ask any other to exit at once."""
    found = membership.launched_by(ctx, pid)
    manager, config = found if found is not None else (None, None)
    process = config.process if config is not None else None
    if isinstance(manager, LocalManager) and process is not None:
        record = ctx.record(pid)
        if record is not None:  # stopped on purpose: its end is a removal, not a death to report
            ctx.set_state(record, WorkerState.TERMINATING)
        try:
            process.kill() if kill else process.terminate()
        except OSError:
            pass  # gone already
        return
    membership.rmprocs(ctx, [pid], waitfor=0)


def _check_max_tasks(max_tasks: int | None, pool: AbstractWorkerPool | None) -> None:
    if max_tasks is None:
        return
    if not isinstance(max_tasks, int) or isinstance(max_tasks, bool):
        raise TypeError("max_tasks_per_child must be an integer")
    if max_tasks <= 0:
        raise ValueError("max_tasks_per_child must be >= 1")
    if pool is not None:
        raise ValueError("max_tasks_per_child replaces workers the executor launched; the "
                         "workers of pool= are not its to replace")


def _manager_and_params(max_workers: int | None, manager: ClusterManager | None,
                        params: dict) -> tuple[ClusterManager, dict]:
    """The manager to launch with and the addprocs parameters; unknown keywords are a
    ``TypeError``, as for any function."""
    params = dict(params)
    if manager is None:
        manager = LocalManager(max_workers or os.cpu_count() or 1, params.pop("restrict", True))
    allowed = manager.default_addprocs_params()
    for name in params:
        if name not in allowed:
            raise TypeError(f"DistributedExecutor() got an unexpected keyword argument {name!r}")
    return manager, params


def _fail_all(tasks: list[Task], error: Callable[[], BaseException]) -> None:
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
