"""Batches: several independent calls travelling in one message, each with its own outcome.

Owns the worker side of an executor batch and the format its calls and outcomes travel in.
``DistributedExecutor`` sends a backlog of short tasks to one worker as a single CALL_FETCH
of :func:`run_batch`, so that one message and one reply replace a round trip per task.
Imports ``distexec.errors``, ``distexec.protocol`` and the sibling runtime modules.

    master (executor)                                worker (one call thread)
    each task pickled alone: (payload, buffers)
    CALL_FETCH run_batch([task, task, ...], caller) ──► for each task, in order:
                                                         unpickle it, run it, pickle its value
                                                         alone (plain values travel as they are)
        executor's batch waiter ◄── RESULT Outcomes(start, longest, items) ──
                                    (one message; one per task if together they are too large)

Every task is pickled and unpickled on its own, so a batch behaves exactly like the same
tasks sent one by one: tasks never share argument or result objects (a task that mutates
its argument cannot affect another), an argument that fails to unpickle, a result that
cannot be pickled (or is over the size limit) and a result that fails to unpickle on the
master each fail only their own task. ``interrupt`` stops the running task only.
"""

from __future__ import annotations

import functools
import pickle
import threading
import time
import types
from typing import Any

from ..errors import RemoteException
from ..protocol import serialization
from ..protocol.frames import Kind
from ..protocol.tracebacks import capture
from . import calls
from .context import ClusterContext, current_context


def pickled_alone(obj: Any, destination: int) -> tuple[bytes, list]:
    """``obj`` pickled by itself for ``destination``, ready to travel inside a batch message.

    Large buffers stay out of band: wrapped as ``PickleBuffer`` they are taken out of band
    again by the message that carries them.
    """
    payload, views = serialization.dumps(obj, destination)
    return payload, [pickle.PickleBuffer(view) for view in views]


def unpickled_alone(ctx: ClusterContext, source: int, payload, buffers) -> Any:
    with serialization.receiving(ctx, source):
        return serialization.loads(payload, buffers)


class Outcomes:
    """The outcomes of ``items`` consecutive tasks of a batch, from task number ``start``.

    Each item is ``(is_error, payload, buffers)`` for a value or error pickled alone, or
    ``(False, value, None)`` for a plain value. ``longest`` is how long the batch's longest
    task ran, in seconds (the master sizes its batches with it).
    """

    __slots__ = ("start", "longest", "items")

    def __init__(self, start: int, longest: float, items: list):
        self.start, self.longest, self.items = start, longest, items

    def __reduce__(self):
        return (Outcomes, (self.start, self.longest, self.items))

    def load(self, ctx: ClusterContext, source: int, index: int) -> tuple[bool, Any]:
        """Item ``index`` as (is_error, value); one that cannot be unpickled is its error."""
        is_error, data, buffers = self.items[index]
        if buffers is None:
            return False, data
        try:
            return is_error, unpickled_alone(ctx, source, data, buffers)
        except Exception as exc:
            return True, RemoteException(ctx.myid, capture(exc))


def run_batch(tasks: list, caller: int) -> Outcomes:
    """Run pickled tasks in order on this thread; the worker side of an executor batch.

    Runs as user code (``interrupt`` reaches it): an interrupt, or any exception, fails the
    task that was running and the batch goes on with the next.
    """
    ctx = current_context()
    items: list = [None] * len(tasks)
    clock = time.perf_counter
    longest = 0.0
    i = 0
    while i < len(tasks):
        began = clock()
        try:
            while i < len(tasks):
                if i:  # each task is a call of its own for interrupt's grace (cluster.interrupts)
                    ctx.runner.next_call_begins()
                began = clock()
                payload, buffers = tasks[i]
                fn, args, kwargs = unpickled_alone(ctx, caller, payload, buffers)
                value = fn(*args, **kwargs)
                longest = max(longest, clock() - began)
                items[i] = _outcome(ctx, value, caller)
                i += 1
        except BaseException as exc:  # the task's own failure (SystemExit, interrupts too)
            longest = max(longest, clock() - began)
            if exc.__traceback__ is not None:
                exc.__traceback__ = exc.__traceback__.tb_next  # drop this frame
            items[i] = _error_item(ctx, RemoteException(ctx.myid, capture(exc)), caller)
            i += 1
    return Outcomes(0, longest, items)


def _outcome(ctx: ClusterContext, value: Any, caller: int) -> tuple:
    if serialization.is_plain(value):  # cannot fail to (un)pickle, cannot be mutated: as is
        return False, value, None
    try:
        return (False, *pickled_alone(value, caller))
    except Exception as exc:  # a value that cannot be pickled fails only its task
        return _error_item(ctx, calls.unsendable(ctx, value, exc), caller)


def _error_item(ctx: ClusterContext, error: RemoteException, caller: int) -> tuple:
    return (True, *pickled_alone(error, caller))  # RemoteException pickles whatever it holds


def send_outcomes(ctx: ClusterContext, dest: int, notify, outcomes: Outcomes) -> None:
    """Send a batch's outcomes as one RESULT, or one per task when that one is too large.

    Raises ``OSError`` when the caller is gone.
    """
    conn = ctx.connection_for(dest)
    try:
        payload, buffers = serialization.dumps(outcomes, dest)
        conn.send(Kind.RESULT, payload, buffers, response=notify)
        return
    except Exception as exc:  # too large together (MessageTooLarge): send them one by one
        if isinstance(exc, OSError):
            raise
    for k, item in enumerate(outcomes.items):
        one = Outcomes(outcomes.start + k, outcomes.longest, [item])
        try:
            payload, buffers = serialization.dumps(one, dest)
            conn.send(Kind.RESULT, payload, buffers, response=notify)
        except Exception as exc:  # this one alone is too large: it fails, the others go on
            if isinstance(exc, OSError):
                raise
            _is_error, data, buffers = item
            size = len(data) + sum(memoryview(b).nbytes for b in buffers or ())
            error = calls.unsendable(ctx, None, exc, what=f"a value of {size} bytes pickled")
            one.items = [_error_item(ctx, error, dest)]
            payload, buffers = serialization.dumps(one, dest)
            conn.send(Kind.RESULT, payload, buffers, response=notify)


calls.SELF_SENDING[Outcomes] = send_outcomes


# --------------------------------------------------------------------------------------------
# Master side: how many queued tasks travel together
# --------------------------------------------------------------------------------------------
MAX_BATCH = 256          # tasks in one message
BATCH_SECONDS = 0.002    # of estimated work in one message: short enough to keep workers even
BATCH_BYTES = 1 << 20    # of pickled tasks in one message (beyond that, batching saves nothing)
SHORT_TASK_ROUND_TRIPS = 4  # a task this many quickest round trips long, or less, is short


def by_size(pickled: list[tuple], limit: int) -> list[list[tuple]]:
    """Pickled tasks ``(task, payload, buffers)``, in order, grouped into messages of at most
    ``limit`` bytes (a larger task alone)."""
    if len(pickled) <= 1:  # a task alone, the usual message: nothing to weigh
        return [pickled] if pickled else []
    messages: list[list[tuple]] = []
    size = limit + 1
    for item in pickled:
        _task, payload, buffers = item
        nbytes = len(payload) + sum(b.nbytes for b in buffers)
        if size + nbytes > limit:
            messages.append([])
            size = 0
        messages[-1].append(item)
        size += nbytes
    return messages


class BatchSizer:
    """Sizes batches from how long each function's tasks run.

    A function's tasks travel one per message until one has come back; its estimate is then
    the shortest round trip of a task sent alone (an upper bound of its run time), and after
    every batch the longest task the worker measured in it: a function whose tasks vary in
    length is batched by its slowest. A batch holds about ``BATCH_SECONDS`` of estimated work,
    at most ``MAX_BATCH`` tasks and an even share of the backlog over all the slots, so long
    tasks always travel alone, the last tasks are spread over the workers, and an estimate
    that turns out too low costs at most one batch per slot.
    """

    MAX_FUNCTIONS = 512

    def __init__(self):
        self._estimates: dict = {}  # key(fn) -> seconds
        self._fastest = float("inf")  # the shortest round trip of any task sent alone
        self._lock = threading.Lock()  # results of different workers arrive on their threads

    def limit(self, fn, backlog: int, free_slots: int, slots: int) -> int:
        """How many tasks of ``fn`` one message may carry.

        ``fn`` is the function of the first of ``backlog`` queued tasks; ``free_slots`` of
        the executor's ``slots`` (messages in flight at once) are free.
        """
        if backlog <= free_slots:  # each can go alone, now
            return 1
        estimate = self._estimates.get(cost_key(fn))
        if estimate is None:
            return 1
        by_time = int(BATCH_SECONDS / estimate) if estimate > 0 else MAX_BATCH
        return max(1, min(MAX_BATCH, by_time, -(-backlog // max(1, slots))))

    def measured_alone(self, fn, round_trip: float) -> None:
        key = cost_key(fn)
        old = self._estimates.get(key)
        if old is None or round_trip < old:  # the task took at most its round trip
            self._remember(key, round_trip)
        if round_trip < self._fastest:
            self._fastest = round_trip

    def is_short(self, fn) -> bool:
        """Whether ``fn``'s tasks are not known to take much longer than a round trip of the
        quickest task seen: worth reading the reply on the waiting thread. A ratio of times
        this executor measured itself, so it means the same on a fast or a slow machine
        (the executor sends each worker an empty task first, so that the quickest round trip
        is known even where every real task is long)."""
        estimate = self._estimates.get(cost_key(fn))
        return estimate is None or estimate <= SHORT_TASK_ROUND_TRIPS * self._fastest

    def measured_batch(self, fns, longest: float) -> None:
        for key in {cost_key(fn) for fn in fns}:
            old = self._estimates.get(key)
            # up at once (a slow task must not be batched again); down by at most 4x a time
            self._remember(key, longest if old is None or longest >= old
                           else max(longest, old / 4))

    def _remember(self, key, seconds: float) -> None:
        with self._lock:
            if len(self._estimates) >= self.MAX_FUNCTIONS and key not in self._estimates:
                del self._estimates[next(iter(self._estimates))]  # the oldest
            self._estimates[key] = seconds


def cost_key(fn):
    """What tasks share an estimate by: the code they run (a new closure of the same function,
    a bound method of another instance and a partial of it count as the same), never the
    callable itself, which may hold large data alive."""
    if type(fn) is types.FunctionType:  # the usual task: asked three times per task
        return fn.__code__
    while isinstance(fn, functools.partial):
        fn = fn.func
    fn = getattr(fn, "__func__", fn)
    code = getattr(fn, "__code__", None)
    if code is not None:
        return code
    return type(fn), getattr(fn, "__qualname__", None)
