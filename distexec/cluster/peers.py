"""Worker-to-worker links: the topologies, lazy connections and the IDENTIFY exchange.

Owns how a worker reaches another worker. Imports the other cluster modules,
``distexec.runtime`` and below. Julia: ``connect_to_peer``, lazy ``all_to_all``,
``IdentifySocketMsg``.

    all_to_all, lazy (default): the first message from A to B opens the link:
        A > B: A connects to B, sends IDENTIFY(A), waits for the ack
        A < B: A asks pid 1 to ask B to connect to A, then waits for B's link to register
    all_to_all, eager: a joining worker connects to every lower pid before it replies to JOIN
    custom: a joining worker connects to the workers whose ``ident`` its manager listed in
        ``connect_idents``, before it replies to JOIN; other pairs behave like master_worker
    master_worker: workers never connect to each other; trying is a clear error

The higher pid always initiates, so two workers never open two links to each other.
"""

from __future__ import annotations

import concurrent.futures as cf
import pickle
import time

from ..errors import DistributedError, ProtocolError
from ..protocol import serialization
from ..protocol.frames import Flag, Kind
from ..runtime import dispatch
from ..runtime.calls import ReplySlot, remote_do
from ..runtime.context import ClusterContext, WorkerRecord, WorkerState, current_context
from ..transport import sockets
from ..transport.connection import Connection
from .launch import worker_timeout


class PeerConnector:
    """The runtime's ``Connector`` on workers: opens links to other workers on demand."""

    def __init__(self, manager=None, on_close=None):
        self.manager = manager
        self.on_close = on_close  # on_close(ctx, conn, error) of the links it opens

    def connect_peer(self, ctx: ClusterContext, record: WorkerRecord) -> Connection:
        if ctx.role == "master":
            raise DistributedError(f"no process with id {record.pid} exists")
        if ctx.topology != "all_to_all":
            raise DistributedError(f"peer {record.pid} is not connected to {ctx.myid}. "
                                   f"Topology : {ctx.topology}")
        with ctx.lock:
            attempt = record.connecting
            starter = attempt is None or (attempt.done() and attempt.exception() is None
                                          and record.conn is None)
            if starter:
                attempt = record.connecting = cf.Future()
        if starter:
            try:
                attempt.set_result(self._open(ctx, record))
            except BaseException as exc:
                attempt.set_exception(exc)
        return attempt.result()

    def _open(self, ctx: ClusterContext, record: WorkerRecord) -> Connection:
        if ctx.myid > record.pid:
            if record.connect_at is None:
                raise DistributedError(f"peer {record.pid} has no known address")
            return connect_to_peer(ctx, record.pid, record.connect_at)
        remote_do(ctx, _ask_to_connect, 1, (record.pid, ctx.myid), {}, background=True)
        return _await_link(ctx, record.pid)


def _await_link(ctx: ClusterContext, pid: int) -> Connection:
    timeout = worker_timeout()
    deadline = time.monotonic() + timeout
    with ctx.lock:
        while True:
            record = ctx.peers.get(pid)
            if record is not None and record.conn is not None:
                return record.conn
            if pid in ctx.deleted:
                ctx.raise_if_gone(pid)
            left = deadline - time.monotonic()
            if left <= 0:
                raise DistributedError(f"peer {pid} didn't connect to {ctx.myid} within "
                                       f"{timeout} seconds")
            ctx.changed.wait(left)


def _ask_to_connect(higher: int, lower: int) -> None:
    """On pid 1: ask worker ``higher`` to open its link to ``lower``."""
    ctx = current_context()
    remote_do(ctx, _connect_back, higher, (lower,), {}, background=True)


def _connect_back(lower: int) -> None:
    """On the higher pid: open the link a lower pid asked for."""
    ctx = current_context()
    ctx.connection_for(lower)


def connect_to_peer(ctx: ClusterContext, pid: int, connect_at) -> Connection:
    """Open and identify a link from this worker to worker ``pid``. Julia: same name."""
    connector = ctx.connector
    on_close = getattr(connector, "on_close", None) or _ignore_close
    host, port = connect_at
    security = ctx.security
    tls = security.client_context() if security is not None and security.tls else None
    assert ctx.cookie is not None  # init_worker set it
    sock = sockets.connect(host, port, ctx.cookie.key, worker_timeout(), tls=tls)
    conn = Connection(sock, on_frame=lambda c, f: dispatch.on_frame(ctx, c, f),
                      on_close=lambda c, e: on_close(ctx, c, e), name=f"worker-{pid}")
    conn.peer_pid = pid
    slot = ReplySlot(pid)
    notify = ctx.next_rrid()
    ctx.add_waiter(notify, slot)
    conn.start()
    payload, _ = serialization.dumps(ctx.myid, pid)
    conn.send(Kind.IDENTIFY, payload, notify=notify)
    slot.wait()
    with ctx.lock:
        record = ctx.peers.get(pid)
        if record is None:
            record = WorkerRecord(pid, connect_at=tuple(connect_at))
            ctx.peers[pid] = record
        record.conn = conn
        record.state = WorkerState.CONNECTED
        ctx.changed.notify_all()
    return conn


def _ignore_close(ctx: ClusterContext, conn: Connection, error) -> None:
    """A link's close when this process has no worker-side handler for it (none in practice:
    only workers open peer links, and ``init_worker`` gives their connector one)."""


def on_identify(ctx: ClusterContext, conn: Connection, frame) -> None:
    """Accepting side: a worker opened a link to us and says who it is."""
    if ctx.role != "worker" or conn.peer_pid is not None or ctx.myid == 0:
        raise ProtocolError("unexpected IDENTIFY message")
    pid = pickle.loads(frame.payload)
    if not isinstance(pid, int) or pid < 2 or pid == ctx.myid:
        raise ProtocolError(f"invalid worker id {pid!r} in IDENTIFY")
    with ctx.lock:
        if pid in ctx.deleted:
            raise ProtocolError(f"worker id {pid} was removed and is never reused")
        record = ctx.peers.get(pid)
        if record is not None and record.conn is not None and not record.conn.closed:
            raise ProtocolError(f"a connection claims worker id {pid}, which is already connected")
        if ctx.topology == "master_worker" or (ctx.topology == "all_to_all" and pid < ctx.myid):
            # In all_to_all the higher pid always opens a link (in custom, the joining worker),
            # and master_worker has no links between workers: anything else claims an identity
            # it cannot have.
            raise ProtocolError(f"worker {pid} may not open a link to worker {ctx.myid} "
                                f"(topology {ctx.topology})")
        if record is None:
            record = WorkerRecord(pid)
            ctx.peers[pid] = record
        conn.peer_pid = pid
        conn.name = f"worker-{pid}"
        record.conn = conn
        record.state = WorkerState.CONNECTED
        ctx.changed.notify_all()
    conn.send(Kind.RESULT, serialization.dumps(None, pid)[0], response=frame.header.notify,
              flags=Flag.NONE)


def register_peers(ctx: ClusterContext, peers, *, eager: bool = False) -> None:
    """Record other workers' addresses; with ``eager``, connect to each now (Julia lazy=false)."""
    for pid, connect_at in peers:
        if pid == ctx.myid:
            continue
        with ctx.lock:
            if pid in ctx.deleted:
                continue
            record = ctx.peers.get(pid)
            if record is None:
                record = WorkerRecord(pid, connect_at=tuple(connect_at))
                ctx.peers[pid] = record
            else:
                record.connect_at = tuple(connect_at)
    if eager:
        for pid, connect_at in peers:
            if ctx.topology == "custom":  # the joining worker links to exactly its listed peers
                connect_to_peer(ctx, pid, connect_at)
            elif pid < ctx.myid:
                ctx.connection_for(pid)


def learn_peers(peers) -> None:
    """On a worker: the master lists the cluster's workers and their addresses."""
    ctx = current_context()
    register_peers(ctx, peers)


def deregister_peer(pid: int) -> None:
    """On a worker: the master says worker ``pid`` is gone."""
    ctx = current_context()
    record = ctx.record(pid)
    if record is None:
        with ctx.lock:
            if pid not in ctx.deleted:
                ctx.deleted[pid] = WorkerRecord(pid, WorkerState.TERMINATED)
        return
    if record.conn is not None:
        record.conn.close()
    ctx.peer_lost(record)
