"""The worker side: ``start_worker``, joining a cluster, and serving until the master leaves.

Owns a worker process's life: reading the cookie, listening, printing the address line,
accepting the master's JOIN and peers' IDENTIFY (and closing links that never identify
themselves), the startup deadline, the lifelines to the master, interrupts (SIGINT) and exit.
Imports the other cluster modules, ``distexec.runtime`` and below. Julia: ``start_worker``,
``init_worker``, ``handle_msg(::JoinPGRPMsg)``.

    stdin (cookie) ──► listen ──► print distexec_worker:PORT#ADDR ──► main thread runs calls
    master connects ──► handshake ──► JOIN(pid, peers, topology, lazy) ──► RESULT(cpus, os pid)
    any authenticated link without JOIN/IDENTIFY by its deadline ──► closed, logged
    master connection EOF / stdin EOF / parent death ──► exit
"""

from __future__ import annotations

import builtins
import ctypes
import logging
import os
import pickle
import signal
import socket
import sys
import threading
import types
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from ..errors import DistributedError, ProtocolError
from ..protocol import secret as secret_mod
from ..protocol import serialization
from ..protocol.frames import Flag, Kind
from ..runtime import dispatch
from ..runtime.context import (ClusterContext, WorkerRecord, WorkerState, current_context,
                               default_context)
from ..transport import sockets
from ..transport.connection import Connection
from ..transport.lane import LaneReader
from ..transport.streams import as_transport, expire_after
from . import process_view
from .launch import worker_timeout
from .manager import exit_now
from .membership import install_handlers, on_connection_closed
from .peers import PeerConnector, register_peers
from .security import read_tls_line

if TYPE_CHECKING:  # annotations only
    from ..transport.tls import Security
    from .manager import ClusterManager

log = logging.getLogger("distexec")

EXIT_MASTER_LOST = 1
EXIT_STDIN_CLOSED = 70
EXIT_BAD_STDIN = 1
"""A worker's status when stdin lacks a valid cookie line (or TLS line): it never listened."""


def init_worker(cookie: str, manager: ClusterManager | None = None,
                ctx: ClusterContext | None = None, *,
                security: Security | None = None) -> ClusterContext:
    """Make this process a worker of the cluster whose cookie is ``cookie``. Julia: same name.

    ``security`` (a :class:`~distexec.Security` with certificates) makes its links use TLS.
    """
    ctx = ctx or default_context()
    with ctx.lock:
        if ctx.peers or ctx.refs:
            raise RuntimeError("init_worker: this process already takes part in a cluster")
        ctx.role = "worker"
        ctx.myid = 0  # unknown until the master's JOIN
        ctx.cookie = secret_mod.ClusterSecret(cookie.strip())
        ctx.security = security
        ctx.connector = PeerConnector(manager, on_close=_on_close)
    install_handlers(ctx)
    ctx.handlers[Kind.JOIN] = _on_join
    return ctx


def start_worker(out: TextIO | None = None, cookie: str | None = None, *,
                 close_stdin: bool = True,
                 stderr_to_stdout: bool = True, bind_to: str | None = None,
                 die_with_stdin: bool = False, parent_pid: int | None = None,
                 security: Security | None = None, tls_from_stdin: bool = False,
                 master_fd: int | None = None, lane_fd: int | None = None) -> None:
    """Run this process as a worker until the master goes away (never returns normally).

    Reads the cookie from the first line of stdin unless given, listens on ``bind_to``
    (``ADDR``, ``ADDR:PORT`` or ``ADDR:[PORT_HINT]``; default 127.0.0.1), prints
    ``distexec_worker:PORT#ADDR`` to ``out`` and serves calls. With ``security`` (or
    ``tls_from_stdin``: the TLS line that follows the cookie line, ``distexec worker --tls``)
    every link is TLS. ``master_fd``: an inherited socket to the master (a local worker's
    end of a socket pair), authenticated like an accepted connection; the address line
    still tells peers where to connect. ``lane_fd``: the worker's end of its task lane
    (``transport.lane``), read once the master has joined. Julia: ``start_worker``.
    """
    out = out or sys.stdout
    if cookie is None or tls_from_stdin:
        cookie, security = _read_stdin(cookie, security, tls_from_stdin)
    if parent_pid is not None:
        _die_with_parent(parent_pid)
    if stderr_to_stdout:
        os.dup2(out.fileno() if hasattr(out, "fileno") else 1, 2)
    if close_stdin:
        _detach_stdin(die_with_stdin)
    _fresh_main_module()
    ctx = init_worker(cookie, security=security)
    ctx.adopts_master_view = True  # this process is the worker program: see process_view
    ctx.runner.reserve_main_thread()  # before anyone can connect: calls wait for this thread
    assert ctx.cookie is not None  # init_worker set it
    if lane_fd is not None:  # (before anyone can connect: the JOIN may come at once)
        lane = LaneReader(lane_fd)
        ctx.handlers[Kind.JOIN] = lambda ctx, conn, frame: _on_join(ctx, conn, frame, lane)
    host, port, hint = sockets.parse_bind_to(bind_to)
    tls = security.server_context() if security is not None and security.tls else None
    listener = sockets.Listener(sockets.bind_listener(host, port, hint), ctx.cookie.key,
                                lambda sock, _v: _accept(ctx, sock),
                                handshake_timeout=sockets.handshake_timeout(), tls=tls)
    ctx.listener = listener
    listener.start()
    if master_fd is not None:
        link = socket.socket(fileno=master_fd)
        link.set_inheritable(False)  # inherited from the launcher; no further
        listener.adopt(link)
    host, port = listener.address
    ctx.worker_address = (host, port)
    _install_sigint(ctx)
    threading.Thread(target=_master_watchdog, args=(ctx.joined,), daemon=True,
                     name="distexec-watchdog").start()
    out.write(f"distexec_worker:{port}#{host}\n")
    out.flush()
    ctx.runner.serve_main_thread(lambda: ctx.closed)
    exit_now(0)


def _fresh_main_module() -> None:
    """Make ``__main__`` an empty module, where ``everywhere`` and the globals of functions
    shipped from the master's ``__main__`` live.

    The module running is distexec's own ``__main__`` (``python -m distexec worker``): its
    names (``main``, ``sys``) must not stand in for the user's, and a ``multiprocessing``
    child started with spawn must not run it again as its main module.
    """
    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = main


def _read_stdin(cookie: str | None, security: Security | None,
                tls: bool) -> tuple[str, Security | None]:
    """The cookie line (unless given) and, with ``tls``, the TLS line after it."""
    if cookie is None:
        cookie = _cookie_from_stdin()
    if tls:
        try:
            security = read_tls_line(sys.stdin.buffer)
        except ValueError as exc:  # never a traceback: the line holds a key
            _refuse_stdin(str(exc))
    return cookie, security


def _cookie_from_stdin() -> str:
    """The first line of stdin, checked to be a cookie as every launcher writes it.

    Without the check, a worker given no cookie (run by hand, or its stdin closed) would
    listen with an empty key and wait silently for a master that cannot authenticate.
    """
    line = sys.stdin.buffer.readline()
    if not line:
        _refuse_stdin("stdin ended before the cookie line (the master writes the cluster "
                      "cookie as the first line of stdin)")
    cookie = line.decode("ascii", "replace").strip()
    try:
        secret_mod.validate(cookie)
    except ValueError as exc:  # its message never shows the cookie, a secret
        _refuse_stdin(f"the first line of stdin is not a cluster cookie: {exc}")
    return cookie


def _refuse_stdin(message: str) -> NoReturn:
    print(f"distexec worker: {message}", file=sys.stderr, flush=True)
    exit_now(EXIT_BAD_STDIN)


def _accept(ctx: ClusterContext, sock) -> Connection:
    conn = Connection(sock, on_frame=lambda c, f: dispatch.on_frame(ctx, c, f),
                      on_close=lambda c, e: _on_close(ctx, c, e), name="incoming")
    conn.start()
    _expect_identity(ctx, conn)
    return conn


def _expect_identity(ctx: ClusterContext, conn: Connection) -> None:
    """Close ``conn`` unless its peer says who it is (JOIN or IDENTIFY) before a deadline.

    Passing the handshake proves that a peer knows the cookie, not that it will ever use the
    link: one that never identifies itself would otherwise hold a socket and a reader thread
    for as long as this worker lives (fault N11). Until this worker has joined, the connection
    may be the master's, which can wait for other workers to join before it sends JOIN, so it
    gets the startup deadline instead (the same one after which an unjoined worker exits).
    """
    timeout = sockets.handshake_timeout() if ctx.joined.is_set() else worker_timeout()
    timer = threading.Timer(timeout, _close_if_unidentified, args=(ctx, conn, timeout))
    timer.daemon = True
    timer.name = "distexec-identify-deadline"
    timer.start()


def _close_if_unidentified(ctx: ClusterContext, conn: Connection, timeout: float) -> None:
    if conn.peer_pid is None and not conn.closed:
        log.warning("Process %d - closing an authenticated connection that did not identify "
                    "itself within %.1f seconds", ctx.myid, timeout)
        conn.close()


def process_messages(reader: Any, writer: Any, incoming: bool = True) -> threading.Thread:
    """Serve the cluster protocol over a pair of streams (a custom transport).

    ``incoming=True`` (a worker serving its master's link): this side answers the cookie
    challenge as the acceptor; ``False``: this side initiated the link and starts the
    challenge. Call ``init_worker(cookie)`` first on a worker. Returns the reader thread;
    joining it waits until the link closes (for a worker, the process then exits).
    Julia: ``process_messages``.
    """
    ctx = current_context()
    if ctx.cookie is None:
        raise DistributedError("process_messages: no cluster cookie yet; call "
                               "init_worker(cookie) first on a worker")
    transport = as_transport(reader, writer)
    timeout = sockets.handshake_timeout()
    timer = expire_after(transport, timeout) if transport is not reader else None
    try:
        if incoming:
            sockets.serve_handshake(transport, ctx.cookie.key, timeout)
        else:
            sockets.initiate_handshake(transport, ctx.cookie.key, timeout, repr(transport))
    finally:
        if timer is not None:
            timer.cancel()
    reader_thread = _accept(ctx, transport).reader_thread
    assert reader_thread is not None  # _accept started the connection
    return reader_thread


def _on_close(ctx: ClusterContext, conn: Connection, error) -> None:
    if ctx.role == "worker" and conn.peer_pid == 1:
        lost_master(ctx)
        return
    on_connection_closed(ctx, conn, error)


def _on_join(ctx: ClusterContext, conn: Connection, frame,
             lane: LaneReader | None = None) -> None:
    """The master's JOIN: learn our pid and peers, connect eagerly if asked, then reply;
    from now on the main thread also takes its tasks from ``lane``, if it has one."""
    if ctx.myid != 0 or conn.peer_pid is not None:
        raise ProtocolError("a second JOIN message: only the master joins a worker, once")
    pid, peers, topology, lazy, view = pickle.loads(frame.payload)
    if ctx.adopts_master_view:
        process_view.adopt(view, pid)
    ctx.myid = pid
    ctx.topology, ctx.lazy = topology, lazy
    conn.peer_pid = 1
    conn.name = "master"
    ctx.register(WorkerRecord(1, WorkerState.CONNECTED, conn))
    if conn.can_read_here:  # the idle main thread reads its calls itself (runtime.runner)
        ctx.runner.idle_connection = conn
    if lane is not None:  # read only now: the master is authenticated
        ctx.runner.lane_fd = lane.fileno()
        ctx.runner.take_from_lane = lambda: _take_from_lane(ctx, conn, lane)
        ctx.runner.wake_idle_main()  # it may be waiting without the lane: a task may be there
    ctx.joined.set()
    threading.Thread(target=_finish_join, args=(ctx, conn, peers, frame.header.notify),
                     daemon=True, name="distexec-join").start()


def _take_from_lane(ctx: ClusterContext, conn: Connection, lane: LaneReader) -> None:
    """On the main thread: the next task the master left in the lane, into the main queue
    (dispatched as if it came on the master connection ``conn``)."""
    frame = lane.take()
    if frame is not None:
        dispatch.on_frame(ctx, conn, frame)


def _finish_join(ctx: ClusterContext, conn: Connection, peers, notify) -> None:
    try:
        register_peers(ctx, peers, eager=ctx.topology == "custom"
                       or (not ctx.lazy and ctx.topology == "all_to_all"))
        reply: object = (os.cpu_count() or 1, os.getpid())
        flags = Flag.NONE
    except Exception as exc:
        reply, flags = exc, Flag.ERROR
    payload, buffers = serialization.dumps(reply, 1)
    conn.send(Kind.RESULT, payload, buffers, response=notify, flags=flags)


def lost_master(ctx: ClusterContext) -> None:
    """Workers never outlive their master connection (Julia: ``exit(1)`` on losing pid 1)."""
    exit_now(EXIT_MASTER_LOST)


def _master_watchdog(joined: threading.Event) -> None:
    timeout = worker_timeout()
    if not joined.wait(timeout):
        print(f"Master process (id 1) could not connect within {timeout} seconds.\nexiting.",
              file=sys.stderr, flush=True)
        exit_now(1)


def _detach_stdin(die_with_stdin: bool) -> None:
    """Give user code an empty stdin; optionally keep the real one as a lifeline."""
    saved = os.dup(0)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    sys.stdin = open(0, closefd=False)
    if die_with_stdin:
        threading.Thread(target=_stdin_lifeline, args=(saved,), daemon=True,
                         name="distexec-lifeline").start()
    else:
        os.close(saved)


def _stdin_lifeline(fd: int) -> None:
    while True:
        try:
            if not os.read(fd, 4096):
                break
        except InterruptedError:
            continue
        except OSError:
            break
    exit_now(EXIT_STDIN_CLOSED)


def _die_with_parent(parent_pid: int) -> None:
    """Linux: SIGKILL this process when the master dies, even while C code holds the GIL."""
    signal_at_parent_death(signal.SIGKILL)
    if os.getppid() != parent_pid:  # the master died before we could ask
        exit_now(EXIT_MASTER_LOST)


def signal_at_parent_death(sig: int) -> None:
    """Linux: the kernel sends ``sig`` to this process when its parent dies
    (``PR_SET_PDEATHSIG``); elsewhere nothing."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def _install_sigint(ctx: ClusterContext) -> None:
    def on_sigint(signum, frame):
        if ctx.runner.interrupt():
            raise KeyboardInterrupt
    signal.signal(signal.SIGINT, on_sigint)
