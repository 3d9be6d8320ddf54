"""The workers of a DistributedExecutor: which may take tasks, and keeping their number up.

Owns, for one executor: running its initializer on each worker before that worker's first
task, retiring a worker after ``max_tasks_per_child`` tasks, replacing the workers it launched
when they die or retire, and giving up when they keep dying. Imports ``distexec.cluster``,
``distexec.runtime``, ``distexec.protocol`` and ``distexec.errors``.

    pump sees a worker ──► new: its initializer goes first (an in-order task, on the worker's
                           │    main thread) ──► ok: ready ──► tasks may go to it
                           │                 └─► failed: the executor is broken
                           └─► ready: up to its quota of tasks (max_tasks_per_child) ──►
                               quota reached: retiring ──► idle: removed, replaced
    a launched worker dies ──► replaced (same manager, host, options; initializer again),
                               unless 5 were replaced in 30 s: the executor is broken

ProcessPoolExecutor breaks the whole pool when a worker dies; loky and dask replace the
worker. Here only the dead worker's tasks fail and a replacement restores the capacity.
Workers the executor did not launch (``pool=``) are never replaced or retired: they are the
user's.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .cluster import membership
from .errors import ProcessExitedException, RemoteException
from .protocol import serialization
from .protocol.frames import Flag, Kind
from .runtime.context import ClusterContext, WorkerState, using_context

log = logging.getLogger("concurrent.futures")

#: A launched worker that dies more often than this within ``REPLACEMENT_WINDOW`` seconds
#: makes the executor broken instead of being replaced forever.
MAX_REPLACEMENTS = 5
REPLACEMENT_WINDOW = 30.0


def check_initializer(initializer: Callable | None, initargs: tuple) -> None:
    """Raise ``TypeError`` now when the initializer cannot reach the workers.

    ProcessPoolExecutor hands ``initargs`` to its children by inheritance, which is how a
    ``multiprocessing.Value`` or ``Lock`` gets there; distexec workers are separate programs,
    so everything must pickle. Failing here beats a task that waits for ever.
    """
    if initializer is None:
        return
    if not callable(initializer):
        raise TypeError("initializer must be a callable")
    try:
        serialization.dumps((initializer, initargs, {}), None)
    except Exception as exc:
        raise TypeError(
            f"the initializer and its initargs must be picklable to reach the workers, and "
            f"pickling them failed: {type(exc).__name__}: {exc}. multiprocessing's Value, "
            f"Array, Lock, Queue and other synchronization objects are shared with child "
            f"processes by inheritance only, and distexec workers are not children of this "
            f"process: keep per-worker state in a global the initializer sets, and share data "
            f"through a distexec.RemoteChannel or a multiprocessing.Manager() server."
        ) from exc


class WorkerLifecycle:
    """One executor's view of its workers; see the module docstring.

    ``pump`` is called whenever a worker became able to take tasks; ``broken(reason)``
    when the executor can go on no longer; ``wanted()`` says whether capacity is still
    needed (the executor is open, or has work left), so that a worker lost after the last
    task is not replaced. None of them is called with this object's lock held.
    """

    def __init__(self, ctx: ClusterContext, pool, *, initializer: Callable | None,
                 initargs: tuple, max_tasks: int | None, launch_params: dict | None,
                 owned: list[int], pump: Callable[[], None], broken: Callable[[str], None],
                 wanted: Callable[[], bool]) -> None:
        self._ctx, self._pool = ctx, pool
        self._initializer, self._initargs = initializer, initargs
        self._max_tasks = max_tasks
        self._launch_params = launch_params  # None: not launched by the executor
        self._pump, self._broken, self._wanted = pump, broken, wanted
        self._lock = threading.Condition()
        self._owned: list[int] = list(owned)
        self._ready: set[int] = set()
        self._initializing: set[int] = set()
        self._sent: dict[int, int] = {}       # tasks sent to each worker (max_tasks_per_child)
        self._retiring: set[int] = set()      # quota reached: no more tasks, removed once idle
        self._leaving: set[int] = set()       # retiring workers whose replacement has begun
        self._launching = 0                   # replacements on their way
        self._deaths: deque[float] = deque()  # when launched workers died and were replaced
        self._closed = False                  # shut down or terminated: replace nothing

    # -- which workers take tasks (called by the executor's pump) ----------------------------
    def usable(self, targets: list[int]) -> tuple[list[int], list[int]]:
        """The ``targets`` that may take a task now, and those whose initializer must run
        first (marked as initializing: the caller starts them with ``initialize``)."""
        if self._initializer is None and not self._retiring:  # the common case, lock-free
            return targets, []
        with self._lock:
            usable, new = [], []
            for pid in targets:
                if pid in self._retiring:
                    continue
                if self._initializer is None or pid in self._ready:
                    usable.append(pid)
                elif pid not in self._initializing:
                    self._initializing.add(pid)
                    new.append(pid)
            return usable, new

    def quota(self, pid: int) -> int | None:
        """How many more tasks ``pid`` may be sent (None: no limit)."""
        if self._max_tasks is None:
            return None
        with self._lock:
            return self._max_tasks - self._sent.get(pid, 0)

    def count_sent(self, pid: int, n: int) -> None:
        """``n`` tasks went to ``pid``; at its quota it retires once its tasks are done."""
        if self._max_tasks is None:
            return
        with self._lock:
            sent = self._sent[pid] = self._sent.get(pid, 0) + n
            if sent >= self._max_tasks:
                self._retiring.add(pid)

    def replacing(self) -> bool:
        """Whether workers are on their way, so the queue should wait for them: being
        launched, or lost a moment ago and about to be replaced (``lost`` not yet called)."""
        with self._lock:
            if self._launching:
                return True
            if self._closed or self._launch_params is None:
                return False
            owned = list(self._owned)
        live = set(self._ctx.live_pids())
        return any(p not in live for p in owned)

    def owned(self) -> list[int]:
        with self._lock:
            return list(self._owned)

    # -- initializers ------------------------------------------------------------------------
    def initialize(self, pids: list[int]) -> None:
        """Send the initializer to each of ``pids`` as the first task of its main thread."""
        for pid in pids:
            rrid = self._ctx.next_rrid()
            try:
                with using_context(self._ctx):  # references among initargs check their cluster
                    payload, buffers = serialization.dumps(
                        (self._initializer, self._initargs, {}), pid)
                self._ctx.add_waiter(rrid, _InitializerWaiter(self, pid))
                self._ctx.send(pid, Kind.CALL_FETCH, payload=payload, buffers=buffers,
                               notify=rrid, flags=Flag.IN_ORDER)
            except (ProcessExitedException, OSError):
                self._ctx.pop_waiter(rrid)  # the worker is gone: lost() deals with it
                self._initialized(pid, ok=False)
            except Exception as exc:  # checked at construction; a __reduce__ may still fail
                self._ctx.pop_waiter(rrid)
                self._initializer_failed(pid, repr(exc))

    def _initialized(self, pid: int, ok: bool) -> None:
        with self._lock:
            self._initializing.discard(pid)
            if ok:
                self._ready.add(pid)
        if ok:
            self._pump()

    def _initializer_failed(self, pid: int, text: str) -> None:
        log.critical("Exception in initializer:\n%s", text)
        self._initialized(pid, ok=False)
        lines = [line for line in text.strip().splitlines() if line.strip()]
        error = lines[-1].strip() if lines else "unknown error"
        self._broken(f"the initializer failed on worker {pid} ({error}); "
                     "the executor is broken")

    # -- retiring and replacing --------------------------------------------------------------
    def idle(self, pid: int) -> None:
        """``pid`` has no task in flight: if it is retiring, remove and replace it now."""
        with self._lock:
            if pid not in self._retiring or pid in self._leaving:
                return
            self._leaving.add(pid)
            self._launching += 1
        threading.Thread(target=self._retire, args=(pid,), daemon=True,
                         name=f"distexec-retire-{pid}").start()

    def _retire(self, pid: int) -> None:
        try:
            membership.rmprocs(self._ctx, [pid], waitfor=None)
        except Exception:
            log.exception("could not remove worker %d after its max_tasks_per_child tasks", pid)
        self._replace(pid, reason="retired after max_tasks_per_child tasks")

    def lost(self, pid: int) -> None:
        """Peer ``pid`` is gone: replace it if the executor launched it and it died."""
        with self._lock:
            self._ready.discard(pid)
            self._initializing.discard(pid)
            if pid in self._retiring:
                if pid in self._leaving:
                    return  # removed by _retire, which replaces it
                self._leaving.add(pid)  # died with its last tasks: its retirement starts here
                self._launching += 1
                retired = True
            elif pid not in self._owned:
                return  # not ours to replace
            else:
                retired = False
        if retired:
            threading.Thread(target=self._replace, daemon=True, name=f"distexec-replace-{pid}",
                             args=(pid, "died after its last (max_tasks_per_child) task")).start()
            return
        with self._lock:
            self._owned.remove(pid)
            record = self._ctx.deleted.get(pid)
            if (self._closed or self._launch_params is None or record is None
                    or record.state == WorkerState.TERMINATED):  # removed on purpose
                return
            now = time.monotonic()
            while self._deaths and now - self._deaths[0] > REPLACEMENT_WINDOW:
                self._deaths.popleft()
            if len(self._deaths) >= MAX_REPLACEMENTS:
                giving_up = True
            else:
                giving_up = False
                self._deaths.append(now)
                self._launching += 1
        if giving_up:
            self._broken(f"the executor's workers keep dying: {MAX_REPLACEMENTS} were replaced "
                         f"in the last {REPLACEMENT_WINDOW:.0f} s, and then {record.exited_exception()}")
            return
        if not self._wanted():
            with self._lock:
                self._launching -= 1
                self._lock.notify_all()
            return
        threading.Thread(target=self._replace, args=(pid, "died"), daemon=True,
                         name=f"distexec-replace-{pid}").start()

    def _replace(self, pid: int, reason: str) -> None:
        """Launch one worker like ``pid`` (counted in ``_launching`` by the caller)."""
        new: list[int] = []
        error: BaseException | None = None
        try:
            if self._wanted():
                new = self._launch_like(pid)
                log.info("Worker %d %s; replaced by worker(s) %s", pid, reason, new)
        except Exception as exc:
            error = exc
            log.error("Worker %d %s and could not be replaced: %s", pid, reason, exc)
        with self._lock:
            self._owned = [p for p in self._owned if p != pid]
            self._launching -= 1
            leftover = new if self._closed else []
            if not self._closed:
                self._owned.extend(new)
                for p in new:
                    self._pool.push(p)
            self._lock.notify_all()
        if leftover:  # shut down meanwhile: nobody will use them
            membership.rmprocs(self._ctx, leftover, waitfor=None)
        if error is not None and not self.replacing():
            live = set(self._ctx.live_pids())
            if not any(p in live for p in self.owned()):
                self._broken(f"worker {pid} {reason} and no replacement could be launched: "
                             f"{error}")
        self._pump()

    def _launch_like(self, pid: int) -> list[int]:
        found = membership.launched_by(self._ctx, pid)
        manager = found[0].replacement(found[1]) if found is not None else None
        if manager is None:
            log.warning("Worker %d cannot be replaced: its manager has no replacement()", pid)
            return []
        assert self._launch_params is not None  # lost() checked
        return membership.addprocs(self._ctx, manager, dict(self._launch_params))

    def close(self) -> list[int]:
        """Replace nothing from now on; wait for launches under way; the workers to remove."""
        with self._lock:
            self._closed = True
            while self._launching:
                self._lock.wait()
            owned, self._owned = self._owned, []
            return owned

    def stop_replacing(self) -> list[int]:
        """Replace nothing from now on (terminate/kill); the workers launched, at once."""
        with self._lock:
            self._closed = True
            return list(self._owned)


class _InitializerWaiter:
    """Receives the RESULT of one worker's initializer."""

    __slots__ = ("waitingfor", "lifecycle")

    def __init__(self, lifecycle: WorkerLifecycle, pid: int):
        self.waitingfor, self.lifecycle = pid, lifecycle

    def deliver(self, value: Any, is_error: bool) -> None:
        if not is_error:
            self.lifecycle._initialized(self.waitingfor, ok=True)
            return
        text = (value.captured.traceback_text if isinstance(value, RemoteException)
                else repr(value))
        self.lifecycle._initializer_failed(self.waitingfor, text)

    def fail(self, exc: BaseException) -> None:  # the worker died: lost() replaces it
        self.lifecycle._initialized(self.waitingfor, ok=False)
