"""Running incoming calls: an elastic pool of reusable threads, preferring the main thread.

Owns the threads that execute user code on a process, and interrupting them. Imports
``distexec.errors`` and the standard library only (``transport.connection`` for types).

    reader thread ──► CallRunner.submit(task)              (Julia-style calls)
                        ├─ main thread idle (workers) ──► runs there (SIGINT interrupts it)
                        ├─ an idle pool thread ───────► runs there
                        └─ none idle ─────────────────► a new thread (no upper bound)
    reader thread ──► CallRunner.submit_in_order(task)     (executor and Pool tasks)
                        └─ the main thread's queue ─────► one at a time, in arrival order,
                                                          after the call the main thread runs

Executor tasks follow ProcessPoolExecutor's model: they run alone, on the main thread, so
thread-affine state (an sqlite connection made by an initializer) and ``signal`` work in
them. A Julia-style call that arrives while the main thread is busy runs on a pool thread at
once; one that finds the main thread idle runs there, and executor tasks queue behind it.

A worker's idle main thread does not wait to be woken: it reads its master connection itself
(``idle_connection``, the read role of ``transport.connection``), so a call arriving there is
read by the thread that will run it; other submitters ``poke`` it out of that read.

There is deliberately no upper bound: a call may block for as long as it likes (a ``take``
on a channel whose producer needs another call on this process, a nested call back to its
caller), and a bounded pool would deadlock exactly where Julia's one-task-per-request does not.
Idle pool threads exit after ``IDLE_SECONDS``.
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import logging
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from ..transport.connection import Connection

log = logging.getLogger("distexec")

IDLE_SECONDS = 30.0
IDLE_POLL = 0.5  # how often an idle main thread that cannot read looks whether to stop
LANE_POLL = 0.005  # how often it looks at its task lane while another thread reads (rare)


class _PoolThread:
    """One reusable thread; waits for a task, runs it, returns itself to the idle list."""

    def __init__(self, runner: "CallRunner"):
        self.runner = runner
        self.task: Callable[[], None] | None = None
        self.wake = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="distexec-call", daemon=True)

    def _loop(self) -> None:
        runner = self.runner
        while True:
            task, self.task = self.task, None
            if task is not None:
                runner._run(task)
            if not runner._park(self):
                return


class CallRunner:
    """Runs tasks (zero-argument callables) on reusable threads; see the module docstring."""

    def __init__(self, ctx) -> None:
        from .context import use_context  # (context imports this module)

        self._ctx = ctx
        self._use_context = use_context  # not imported again for each call
        self._lock = threading.Lock()
        self._idle: list[_PoolThread] = []
        self._main_queue: deque | None = None
        # Released once to wake the idle main thread: a bare lock is the cheapest hand-off
        # there is, and every call a worker runs on its main thread goes through it.
        self._main_wake = threading.Lock()
        self._main_wake.acquire()
        self._main_idle = False
        self._main_finishing = False
        self._main_ident: int | None = None
        # A worker's idle main thread reads its master connection itself (read_until), so
        # that a call arriving there needs no wake-up; set by the cluster layer on JOIN.
        self.idle_connection: Connection | None = None
        # A local worker's task lane (transport.lane): ``take_from_lane()`` moves the next
        # task waiting there into the main queue, if one is; set by the cluster layer on JOIN.
        self.lane_fd: int | None = None
        self.take_from_lane: Callable[[], None] | None = None
        self._in_user_code: dict[int, float] = {}  # thread ident -> when its call began
        self._lane: deque = deque()  # in-order tasks while no main thread serves (submit_in_order)
        self._lane_running = False
        self._stopped = False

    # -- submitting --------------------------------------------------------------------------
    def submit(self, task: Callable[[], None], *, main: bool = True) -> None:
        """Run ``task`` soon; ``main=False`` keeps it off the main thread."""
        with self._lock:
            # The main thread takes the call if it is idle, or if its user code is done and it
            # is only sending a reply: then SIGINT can interrupt the call (see interrupt()).
            if main and (self._main_idle or (self._main_finishing and not self._main_queue)):
                assert self._main_queue is not None  # serve_main_thread made it before idling
                self._main_queue.append(task)
                self._wake_main()
                return
            pooled = self._idle.pop() if self._idle else None
            if pooled is not None:
                pooled.task = task
                pooled.wake.set()
                return
        pooled = _PoolThread(self)
        pooled.task = task
        pooled.thread.start()

    def submit_in_order(self, task: Callable[[], None]) -> None:
        """Run ``task`` on the main thread after every task submitted this way before it.

        The lane of executor tasks (ProcessPoolExecutor's model): one at a time, in order, on
        the thread that runs ``serve_main_thread``; a task waits there while the main thread
        runs another call. A process whose main thread serves nothing (a custom transport's
        ``process_messages``, the master) runs its lane on one thread of its own instead.
        """
        with self._lock:
            if self._main_queue is not None:
                self._main_queue.append(task)
                self._wake_main()
                return
            self._lane.append(task)
            if self._lane_running:
                return
            self._lane_running = True
        threading.Thread(target=self._drain_lane, name="distexec-lane", daemon=True).start()

    def _wake_main(self) -> None:
        """With the lock held, a task just queued for the main thread (or a lane to read):
        wake it if idle."""
        waiting = self._main_idle
        self._main_idle = self._main_finishing = False
        if waiting:
            self._main_wake.release()
            conn = self.idle_connection
            if conn is not None and threading.get_ident() != self._main_ident:
                conn.poke()  # out of its read of the master connection

    def _drain_lane(self) -> None:
        while True:
            with self._lock:
                if not self._lane or self._stopped:
                    self._lane_running = False
                    return
                task = self._lane.popleft()
            self._run(task)

    def _park(self, pooled: _PoolThread) -> bool:
        """Wait idle for the next task; False means the thread should end."""
        with self._lock:
            if self._stopped:
                return False
            pooled.wake.clear()
            self._idle.append(pooled)
        if pooled.wake.wait(IDLE_SECONDS):
            return pooled.task is not None
        with self._lock:
            if pooled in self._idle:
                self._idle.remove(pooled)
                return False
        pooled.wake.wait()  # a submitter picked us just as we timed out
        return pooled.task is not None

    # -- the main thread (workers) -----------------------------------------------------------
    def reserve_main_thread(self) -> None:
        """The calling thread will ``serve_main_thread``: calls that arrive before it gets
        there wait for it rather than run elsewhere.

        A worker calls this before it can be reached. Its first call must not run on a pool
        thread (where SIGINT cannot stop a ``time.sleep``) or its first executor task on the
        lane thread (where ``signal`` fails) only because the master was quick.
        """
        with self._lock:
            if self._main_queue is None:
                self._main_queue = deque()
                self._main_ident = threading.get_ident()
                self._main_idle = True  # on its way: the wake-up waits in _main_wake

    def serve_main_thread(self, should_stop: Callable[[], bool]) -> None:
        """Run tasks on the calling (main) thread until ``should_stop()``; used by workers."""
        self.reserve_main_thread()
        assert self._main_ident == threading.get_ident(), "reserved by another thread"
        while not should_stop():
            try:
                task = self._next_main_task(should_stop)
                if task is not None:
                    self._run(task)
            except KeyboardInterrupt:
                continue  # an interrupt that arrived between tasks: nothing to cancel

    def _next_main_task(self, should_stop) -> Callable[[], None] | None:
        with self._lock:
            # A wake-up given after the last wait timed out: its task is in the queue. Only
            # a submitter that finds the main thread idle releases, so while idle it is held.
            self._main_wake.acquire(blocking=False)
        task = self._queued_or_from_lane()  # the next task the master left on the lane
        if task is not None:
            return task
        with self._lock:
            if self._main_queue:  # a call came in meanwhile
                return self._pop_main_task()
            self._main_idle = True
            conn, lane_fd = self.idle_connection, self.lane_fd
        # No timeout: whatever gives it work or stops it pokes it out of the read
        # (``_wake_main``, ``wake_idle_main``, ``stop``), so an idle worker sleeps until then.
        if conn is None or not conn.read_until(self._main_has_task, also=lane_fd):
            # Another thread reads the connection (or none can): a task on the lane wakes
            # nobody then, so look at the lane often until the reading is ours again.
            self._main_wake.acquire(timeout=IDLE_POLL if lane_fd is None else LANE_POLL)
        return self._queued_or_from_lane()  # the lane is what ended the wait, most likely

    def _queued_or_from_lane(self) -> Callable[[], None] | None:
        """The next queued task, or else the one the task lane holds (read here), if any."""
        with self._lock:
            task = self._pop_main_task()
        if task is None and self.take_from_lane is not None:
            self.take_from_lane()
            with self._lock:
                task = self._pop_main_task()
        return task

    def wake_idle_main(self) -> None:
        """Make an idle main thread look again: it has a task lane to read now."""
        with self._lock:
            free = self._main_idle or self._main_finishing
            self._wake_main()  # out of a read that began without the lane, too
            # It comes back to the queue without running anything: a call arriving meanwhile
            # is still its own, as one arriving while it finishes a call (see submit).
            self._main_finishing = free

    def _pop_main_task(self) -> Callable[[], None] | None:
        """With the lock held: the next task of the main queue, if any."""
        if not self._main_queue:
            return None
        self._main_idle = self._main_finishing = False
        return self._main_queue.popleft()

    def _main_has_task(self) -> bool:
        return bool(self._main_queue) or self._stopped

    # -- running and interrupting ------------------------------------------------------------
    def _run(self, task: Callable[[], None]) -> None:
        self._use_context(self._ctx)
        try:
            task()
        except BaseException:  # tasks report their own errors; this is a last resort
            log.exception("unhandled error in a distexec call thread")

    def user_code(self):
        """Context manager marking the current thread as running interruptible user code."""
        return _UserCode(self)

    def interrupt(self) -> bool:
        """Interrupt the calls running user code; returns True if the main thread is one of them.

        Called from the SIGINT handler on the main thread: the handler itself raises
        ``KeyboardInterrupt`` when this returns True; other threads get it asynchronously.
        """
        # No lock: this runs in a signal handler, which may have interrupted the main thread
        # inside the lock (dispatching a frame it read). set() of a dict is one atomic step.
        busy = set(self._in_user_code)
        main_busy = self._main_ident in busy
        for ident in busy - {self._main_ident}:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident),
                                                       ctypes.py_object(KeyboardInterrupt))
        return main_busy

    def running_since(self) -> list[float]:
        """When (``time.monotonic()``) each call now running user code began."""
        with self._lock:
            return list(self._in_user_code.values())

    def in_user_code(self) -> bool:
        """Whether the current thread runs a call (``interrupt`` may target it)."""
        return threading.get_ident() in self._in_user_code

    def next_call_begins(self) -> None:
        """The current thread, running user code, goes on to another call (a batch's next task):
        from now on its call counts as begun now."""
        ident = threading.get_ident()
        with self._lock:
            if ident in self._in_user_code:
                self._in_user_code[ident] = time.monotonic()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            idle, self._idle = self._idle, []
            if self._main_idle:
                self._main_idle = False
                self._main_wake.release()
                if self.idle_connection is not None:
                    self.idle_connection.poke()
        for pooled in idle:
            pooled.wake.set()


class _UserCode:
    __slots__ = ("runner", "ident", "outermost")

    def __init__(self, runner: CallRunner):
        self.runner = runner
        self.ident = threading.get_ident()
        self.outermost = False

    def __enter__(self):
        with self.runner._lock:
            # A call nested in another on the same thread (a call to this process itself)
            # keeps the outer call's start: the thread has been busy since then.
            self.outermost = self.ident not in self.runner._in_user_code
            if self.outermost:
                self.runner._in_user_code[self.ident] = time.monotonic()

    def __exit__(self, *exc):
        with self.runner._lock:
            if self.outermost:
                self.runner._in_user_code.pop(self.ident, None)
            if self.ident == self.runner._main_ident:
                self.runner._main_finishing = True
        return False


def running_calls() -> tuple[float, list[float]]:
    """On any process: its ``time.monotonic()`` now, and when each of its running calls began.

    The master asks a worker this after an interrupt's grace (``cluster.interrupts``).
    """
    from .context import current_context
    return time.monotonic(), current_context().runner.running_since()


def in_thread(fn: Callable, *args, name: str = "distexec-task") -> "cf.Future":
    """Run ``fn(*args)`` on a new daemon thread; returns a Future of its outcome.

    For the cluster's own background steps (set-ups, callbacks, removals), never user calls.
    """
    future: cf.Future = cf.Future()

    def run():
        try:
            future.set_result(fn(*args))
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, daemon=True, name=name).start()
    return future
