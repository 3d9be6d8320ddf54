"""The ClusterContext: all mutable state of one process's membership in one cluster.

Owns the registry of peers (worker records and their connections), the owned-reference table,
the table of reply waiters, the counters, the callback and status registries and the threads
that serve the cluster. Every other module reaches this state through a context, never through
globals: the only module-level state is the lazily created default context. Julia: the
``ClusterContext`` of DistributedNext 1.3.

May import ``distexec.errors``, ``distexec.protocol``, ``distexec.transport`` and the sibling
runtime modules it names.

    user thread ──► ctx.send(pid, ...) ──► connection_for(pid) ──► Connection.send
                                              └─ no link yet ──► ctx.connector (cluster layer)
    reader thread ──► dispatch.on_frame(ctx, conn, frame) ──► inline handler or CallRunner
    reader thread closes ──► ctx.peer_lost(pid) ──► fail waiters, clientsets, callbacks
"""

from __future__ import annotations

import contextvars
import enum
import itertools
import logging
import threading
import time
import weakref
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol

from ..errors import DistributedError, ProcessExitedException
from ..protocol.frames import RRID, Flag, Kind, NULL_RRID
from ..protocol import serialization
from ..transport.connection import Connection

if TYPE_CHECKING:  # annotations only: pools is a later layer
    import concurrent.futures as cf
    import queue

    from ..pools import AbstractWorkerPool, WorkerPool
    from ..protocol.secret import ClusterSecret
    from ..transport.sockets import Listener
    from ..transport.tls import Security

log = logging.getLogger("distexec")


class WorkerState(str, enum.Enum):
    """Life of a peer record. Julia: ``WorkerState``."""

    CREATED = "created"            # known, not connected (lazy peer or being set up)
    CONNECTED = "connected"
    TERMINATING = "terminating"    # rmprocs asked it to exit
    TERMINATED = "terminated"      # gone after rmprocs
    EXTERMINATED = "exterminated"  # gone without being asked

    def __str__(self) -> str:
        return self.value


DEAD_STATES = (WorkerState.TERMINATED, WorkerState.EXTERMINATED)

DEREGISTER_WAIT = 2.0
"""Seconds a caller that found a peer's connection closed waits for its deregistration (the
master observes a local worker's exit status for up to a second first)."""


@dataclass(eq=False)
class WorkerRecord:
    """What this process knows about one peer."""

    pid: int
    state: WorkerState = WorkerState.CREATED
    conn: Connection | None = None
    connect_at: tuple[str, int] | None = None   # where other processes reach it
    config: Any = None                          # the WorkerConfig (master only)
    manager: Any = None                         # the ClusterManager that launched it (master)
    os_pid: int | None = None
    cpu_threads: int | None = None
    exitcode: int | None = None
    signal: int | None = None
    connecting: Any = None                      # a concurrent.futures.Future while a lazy connect runs
    userdata: dict = field(default_factory=dict)
    lost_reason: str | None = None              # set when distexec itself gave up on the peer
    oom_evidence: str | None = None             # why its SIGKILL was the OOM killer's

    def exited_exception(self) -> ProcessExitedException:
        """What callers of this (gone) peer raise."""
        return ProcessExitedException(self.pid, self.exitcode, self.signal, self.lost_reason,
                                      self.oom_evidence)


class Connector(Protocol):
    """How the runtime gets a link to a peer it has no connection to (cluster layer)."""

    def connect_peer(self, ctx: "ClusterContext", record: WorkerRecord) -> Connection: ...


class Waiter(Protocol):
    """A local party waiting for a RESULT or DONE message (a reply slot or a Future)."""

    waitingfor: int

    def deliver(self, value: Any, is_error: bool) -> None: ...

    def fail(self, exc: BaseException) -> None: ...


class _CountedCondition(threading.Condition):
    """A Condition that counts its ``notify_all`` calls (see ``membership_version``)."""

    def __init__(self, lock):
        super().__init__(lock)
        self.notifications = 0

    def notify_all(self) -> None:
        self.notifications += 1
        super().notify_all()


_current: contextvars.ContextVar["ClusterContext | None"] = contextvars.ContextVar(
    "distexec_context", default=None)
_default: "ClusterContext | None" = None
_default_lock = threading.Lock()


def current_context() -> "ClusterContext":
    """The context of the running call, else the process's default context (created lazily)."""
    ctx = _current.get()
    if ctx is not None:
        return ctx
    return default_context()


def default_context() -> "ClusterContext":
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = ClusterContext()
    return _default


def use_context(ctx: "ClusterContext"):
    """Make ``ctx`` current in this thread (call threads and reader threads do this)."""
    return _current.set(ctx)


class using_context:
    """``with using_context(ctx):`` make ``ctx`` current in this thread, then restore the
    previous one (a thread that acts for a cluster other than its own for a while)."""

    __slots__ = ("ctx", "token")

    def __init__(self, ctx: "ClusterContext"):
        self.ctx = ctx

    def __enter__(self) -> "ClusterContext":
        self.token = _current.set(self.ctx)
        return self.ctx

    def __exit__(self, *exc) -> None:
        _current.reset(self.token)


def private_master_context(outer: "ClusterContext") -> "ClusterContext":
    """A new context in which this process is process 1 of a cluster of its own.

    Why it exists: a worker is process ``myid`` of its master's cluster, where only process 1
    adds workers (Julia's rule, kept for ``addprocs``). A task on a worker may still make an
    executor or ``Pool`` of its own, as a ProcessPoolExecutor task can; that executor gets
    this separate cluster, which the worker masters: its own cookie (made on first
    ``addprocs``), peers, call runner and threads, used by that executor alone. It is never
    the process default, so the worker's own calls, its globals and the outer cluster are
    untouched; the code acting for it makes it current while it does (``using_context``).

    ``outer`` is the context the creating thread was in: a thread running a call of the
    outer cluster must not read this cluster's links itself (``read_while_waiting``).
    """
    ctx = ClusterContext()
    ctx.outer = outer
    return ctx


class ClusterContext:
    """All state of this process's part in a cluster. Julia: ``ClusterContext``."""

    def __init__(self) -> None:
        from .gc import GcQueue
        from .heartbeat import Heartbeat
        from .runner import CallRunner

        self.myid = 1
        self.role = "master"
        self.cookie: ClusterSecret | None = None  # set once multi-process mode starts
        self.security: Security | None = None      # set when links use TLS
        self.topology = "all_to_all"
        self.lazy: bool | None = None
        self.lock = threading.RLock()        # guards the registries below
        self.changed = _CountedCondition(self.lock)   # notified on every peer state change
        self.worker_lock = threading.RLock()  # one addprocs/rmprocs at a time (master)
        self.peers: dict[int, WorkerRecord] = {}
        self.deleted: dict[int, WorkerRecord] = {}
        self.refs: dict[RRID, Any] = {}      # owned values: RRID -> RemoteValue
        self.refs_lock = threading.RLock()
        self.client_refs: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self.waiters: dict[RRID, Waiter] = {}
        self._ref_ids = itertools.count(1)
        self._pids = itertools.count(2)
        self._round_robin = itertools.count(0)
        self.runner = CallRunner(self)
        self.gc = GcQueue(self)
        self.heartbeat = Heartbeat(self)
        self.connector: Connector | None = None
        self.listener: Listener | None = None
        self.callbacks: dict[str, dict[Hashable, Callable]] = {
            "starting": {}, "started": {}, "exiting": {}, "exited": {}}
        self.statuses: dict[int, Any] = {}
        self.exiting_pid: int | None = None
        self.default_pool: AbstractWorkerPool | None = None
        # this process's WorkerPools by id, once it has one
        self.pools: weakref.WeakValueDictionary[int, WorkerPool] | None = None
        self.on_peer_lost: list[Callable[["ClusterContext", int], None]] = []
        self.local_launched: set[int] = set()
        # a launch mechanism's helpers that live as long as the context (cluster.template's
        # template process): closed with it, each by its close()
        self.launchers: dict[str, Any] = {}
        self.handlers: dict[Kind, Callable] = {}  # extra inline handlers (cluster layer: JOIN, IDENTIFY)
        self.multi = False                  # multi-process mode started (cookie, exit hook)
        # the long-lived launcher thread's queue (master); None stops the thread
        self.launcher_jobs: queue.SimpleQueue[tuple[Callable[[], Any], cf.Future[Any]] | None] \
            | None = None
        self.worker_address: tuple[str, int] | None = None   # where this worker listens
        self.joined = threading.Event()      # set when this worker has received its JOIN
        # the ``distexec worker`` program (not a user's process serving a custom transport):
        # it takes the master's sys.argv, __main__ path and authkey (cluster.process_view)
        self.adopts_master_view = False
        # a worker's private cluster (private_master_context): the context it was made in
        self.outer: ClusterContext | None = None
        self.closed = False

    def __repr__(self) -> str:
        return f"<ClusterContext myid={self.myid} role={self.role} peers={sorted(self.peers)}>"

    # -- ids ---------------------------------------------------------------------------------
    def next_rrid(self) -> RRID:
        return RRID(self.myid, next(self._ref_ids))

    def next_pid(self) -> int:
        return next(self._pids)

    def next_round_robin(self) -> int:
        return next(self._round_robin)

    # -- membership views --------------------------------------------------------------------
    @property
    def membership_version(self) -> int:
        """Changes whenever a peer comes, goes or changes state: views of the membership
        (an executor's target workers) are cached against it."""
        return self.changed.notifications

    def live_pids(self) -> list[int]:
        """Sorted pids of this process and its peers that count as members. Julia: ``procs()``."""
        with self.lock:
            counted_states: tuple[WorkerState, ...] = (WorkerState.CONNECTED,)
            if self.role == "worker" and (self.lazy or self.topology != "all_to_all"):
                counted_states = (WorkerState.CONNECTED, WorkerState.CREATED)
            pids = [p for p, r in self.peers.items() if r.state in counted_states]
        return sorted(set(pids) | {self.myid})

    def record(self, pid: int) -> WorkerRecord | None:
        with self.lock:
            return self.peers.get(pid)

    def register(self, record: WorkerRecord) -> None:
        with self.lock:
            if record.pid in self.deleted:
                raise DistributedError(f"worker id {record.pid} was removed and is never reused")
            self.peers[record.pid] = record
            self.changed.notify_all()
        self.heartbeat.ensure_started()

    def set_state(self, record: WorkerRecord, state: WorkerState) -> None:
        with self.lock:
            record.state = state
            self.changed.notify_all()

    # -- sending -----------------------------------------------------------------------------
    def connection_for(self, pid: int) -> Connection:
        """The connection to ``pid``, opening it if the topology allows. Raises if gone."""
        with self.lock:
            dead = self.deleted.get(pid)
            if dead is not None:
                raise dead.exited_exception()
            record = self.peers.get(pid)
            if record is None and self.role == "master":
                raise DistributedError(f"no process with id {pid} exists")
            if record is None:
                record = WorkerRecord(pid)
                self.peers[pid] = record
                self.changed.notify_all()
            conn = record.conn
        if conn is not None:
            return conn
        if self.connector is None:
            raise DistributedError(f"no connection to process {pid}")
        return self.connector.connect_peer(self, record)

    def send(self, pid: int, kind: Kind, obj: Any = None, *, flags: Flag = Flag.NONE,
             response: RRID = NULL_RRID, notify: RRID = NULL_RRID, payload: bytes | None = None,
             buffers: Sequence[bytes | bytearray | memoryview] = ()) -> None:
        """Pickle ``obj`` for ``pid`` and send it; pickling errors raise before anything is sent."""
        conn = self.connection_for(pid)
        if payload is None:
            payload, buffers = serialization.dumps(obj, pid)
        try:
            conn.send(kind, payload, buffers, flags=flags, response=response, notify=notify)
        except OSError:
            self.raise_if_gone(pid)
            raise
        self.gc.flush_soon(pid)

    def raise_if_gone(self, pid: int) -> None:
        """Raise ProcessExitedException if ``pid`` is (or is becoming) deregistered.

        A peer whose connection has just closed is deregistered by its reader thread a
        moment later, once the exit code or signal is known; wait (briefly) for that, so the
        exception says how the process died whichever thread noticed first.
        """
        deadline = time.monotonic() + DEREGISTER_WAIT
        with self.lock:
            while (dead := self.deleted.get(pid)) is None:
                record = self.peers.get(pid)
                if record is None or record.conn is None or not record.conn.closed:
                    return
                left = deadline - time.monotonic()
                if left <= 0 or record.conn.reads_on_this_thread():
                    # (the reading thread deregisters it, once this frame's handler is done)
                    dead = record
                    break
                self.changed.wait(left)
        raise dead.exited_exception()

    def read_while_waiting(self, pid: int, done: Callable[[], bool], waitable: Any = None) -> None:
        """Before waiting for a message from ``pid``: read its connection on this thread until
        ``done()``, where that is safe (``Connection.read_until``); otherwise return at once.

        Saves the wake-up of this thread by the reader thread, which on a virtual machine
        costs as much as the message's trip. Threads running a call are left to wait as
        usual: an interrupt reaches them as an asynchronous exception, which must not land
        in the middle of a frame. ``waitable._reading`` names the connection meanwhile, so
        that whoever completes it another way can ``poke`` the reading thread.
        """
        record = self.peers.get(pid)
        conn = record.conn if record is not None else None
        if conn is None or not conn.can_read_here or self.runner.in_user_code():
            return
        if self.outer is not None and self.outer.runner.in_user_code():
            return  # a task of the outer cluster waits here: it may be interrupted as one
        if waitable is not None:
            waitable._reading = conn
        try:
            if not done():
                conn.read_until(done, defer_sigint=True)
        finally:
            if waitable is not None:
                waitable._reading = None

    # -- waiters -----------------------------------------------------------------------------
    def add_waiter(self, rrid: RRID, waiter: Waiter) -> None:
        with self.lock:
            if waiter.waitingfor in self.deleted:
                dead = self.deleted[waiter.waitingfor]
                raise dead.exited_exception()
            self.waiters[rrid] = waiter

    def pop_waiter(self, rrid: RRID) -> Waiter | None:
        with self.lock:
            return self.waiters.pop(rrid, None)

    # -- losing a peer -----------------------------------------------------------------------
    def peer_lost(self, record: WorkerRecord) -> bool:
        """Deregister ``record``: fail everyone waiting on it. Returns False if already done."""
        with self.lock:
            if record.pid in self.deleted or self.peers.get(record.pid) is not record:
                return False
            terminating = record.state == WorkerState.TERMINATING
            record.state = WorkerState.TERMINATED if terminating else WorkerState.EXTERMINATED
            del self.peers[record.pid]
            self.deleted[record.pid] = record
            waiting = [(r, w) for r, w in self.waiters.items() if w.waitingfor == record.pid]
            for rrid, _ in waiting:
                del self.waiters[rrid]
            self.changed.notify_all()
        for _, waiter in waiting:
            waiter.fail(record.exited_exception())
        from .owned import forget_client
        from .refs import fail_futures_owned_by
        forget_client(self, record.pid)
        fail_futures_owned_by(self, record.pid, record.exited_exception())
        for listener in list(self.on_peer_lost):
            try:
                listener(self, record.pid)
            except Exception:
                log.exception("error in a peer-lost listener")
        return True

    # -- shutting down -----------------------------------------------------------------------
    def close(self) -> None:
        """Close every connection and stop the helper threads (atexit, tests)."""
        self.closed = True
        with self.lock:
            conns = [r.conn for r in self.peers.values() if r.conn is not None]
        for conn in conns:
            conn.close()
        if self.listener is not None:
            self.listener.close()
        self.gc.stop()
        self.heartbeat.stop()
        self.runner.stop()
        for launcher in list(self.launchers.values()):
            launcher.close()
