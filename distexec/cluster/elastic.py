"""Workers that join a running master on their own: ``ElasticManager`` and ``--join``.

Owns both sides of a join: the master's listening port (``ElasticManager``: accept,
authenticate, read the joiner's address, then ``addprocs`` it like any launched worker), and
the worker's (``distexec worker --join HOST:PORT``: read the cookie from stdin or an
owner-only file, connect with retries, authenticate, then serve as any worker). Imports the
other cluster modules, ``distexec.runtime`` and below. Julia: ``ElasticManager``
(ClusterManagers.jl).

    worker ──► TCP connect (retried with backoff until --join-timeout) ──► [TLS] ──► the
      cookie challenge, the worker initiating, the master accepting (its own nonce; nothing
      unpickled, a refusal logged) ──► worker sends distexec_worker:PORT#ADDR (where its
      peers reach it) ──► master: joiner thread ──► addprocs(em): launch hands over the link,
      connect returns it ──► JOIN, RESULT(cpus, os pid) as for every worker ──► pid,
      callbacks, workers(), default_worker_pool()

The worker initiates the challenge (it opened the connection), so the master only ever
answers challenges with MACs over nonces it chose itself: its port is no signing oracle for
someone who wants to pose as the master to a worker.
"""

from __future__ import annotations

import logging
import os
import random
import select
import shlex
import socket
import stat
import sys
import threading
import time
from typing import NoReturn

from ..errors import AuthenticationError, ProtocolError, WaitTimeout
from ..protocol import handshake
from ..protocol import secret as secret_mod
from ..runtime.context import WorkerState, current_context, use_context
from ..transport import sockets
from ..transport.tls import Security, ssl_error
from . import membership
from . import security as security_mod
from .launch import ADDRESS_LINE
from .manager import ClusterManager, WorkerConfig, exit_now

log = logging.getLogger("distexec")

DEFAULT_JOIN_TIMEOUT = 60.0
"""Seconds ``distexec worker --join`` keeps trying to reach its master, by default."""
EXIT_REFUSED = 77
"""A joining worker's status when the master refused it (wrong cookie, TLS on one side only):
at once, without retrying (sysexits' EX_NOPERM)."""
EXIT_UNREACHABLE = 69
"""A joining worker's status when the master could not be reached within ``--join-timeout``
(sysexits' EX_UNAVAILABLE)."""
EXIT_BAD_COOKIE = 78
"""A joining worker's status when its cookie cannot be read: no cookie line, or a cookie file
that others may read (sysexits' EX_CONFIG)."""
MAX_ADDRESS_LINE = 300
"""Bytes the master reads at most for a joined worker's address line."""
_FIRST_DELAY, _MAX_DELAY = 0.1, 5.0  # the worker's retry delays: doubling, capped, jittered


# ============================================================================================
# the master's side
# ============================================================================================
class ElasticManager(ClusterManager):
    """Accept workers that join on their own (``distexec worker --join HOST:PORT``).

    Listens on ``address:port`` (``port=0``: a free port) from construction until
    :meth:`close`. Each worker that passes the cookie challenge (inside TLS when the cluster
    uses TLS: ``security=``, or the ``Security`` of the workers already there) is added as
    ``addprocs`` adds a launched one: it gets the next pid, the worker callbacks fire, and it
    appears in ``workers()`` and in ``default_worker_pool()``, where pools, ``pmap`` and
    executors built on it find it. A worker that leaves fails only its own calls.
    ``topology`` is ``"all_to_all"`` (workers reach each other at the address they report)
    or ``"master_worker"``. Listen on ``"0.0.0.0"`` (or one interface's address) for
    workers on other machines. Julia: ``ElasticManager`` (ClusterManagers.jl).

    Raises:
        ValueError: an unsupported topology.
        OSError: the port cannot be bound.
        DistributedError: not on the master, or a ``security`` the cluster cannot use.
    """

    links_authenticated = True
    """The links ``connect`` returns passed the cookie challenge already (``addprocs`` does
    not run it again)."""

    def __init__(self, address: str = "127.0.0.1", port: int = 9009, *,
                 security: Security | None = None, topology: str = "all_to_all") -> None:
        if topology not in ("all_to_all", "master_worker"):
            raise ValueError("ElasticManager: topology must be 'all_to_all' or "
                             f"'master_worker', got {topology!r}")
        ctx = current_context()
        membership.init_multi(ctx)
        membership.require_master(ctx)
        with ctx.worker_lock:
            self._security = security_mod.resolve(ctx, security)
        self._ctx = ctx
        self._topology = topology
        self._cond = threading.Condition()
        self._pending: list[WorkerConfig] = []
        self._settled: set[int] = set()  # pids whose addprocs has returned
        self._closed = False
        chosen = self._security
        tls = chosen.server_context() if chosen is not None and chosen.tls else None
        # Read once (a bad value fails here, not in a handshake thread), as a worker does.
        self._handshake_timeout = sockets.handshake_timeout()
        self._listener = _JoinListener(
            ctx, sockets.bind_listener(address, port, False), self._authenticated,
            handshake_timeout=self._handshake_timeout, tls=tls)
        self._address = self._listener.address  # kept: readable after close()
        self._listener.start()
        threading.Thread(target=self._join_loop, daemon=True,
                         name="distexec-elastic-joiner").start()
        log.info("ElasticManager listening on %s:%d%s", self.address, self.port,
                 " (TLS)" if tls is not None else "")

    # -- public ------------------------------------------------------------------------------
    @property
    def address(self) -> str:
        """The address the manager listens on."""
        return self._address[0]

    @property
    def port(self) -> int:
        """The port the manager listens on (the one the kernel chose for ``port=0``)."""
        return self._address[1]

    def join_command(self, host: str | None = None) -> str:
        """The shell line that starts a worker joining this master from another machine.

        ``host``: how that machine reaches this one (default: the listening address, or this
        machine's host name when listening on every interface). The cookie is not in it: give
        it on the worker's stdin or with ``--cookie-file`` (docs/security.md).
        """
        if host is None:
            host = self.address
            if host in ("0.0.0.0", "::"):
                host = socket.gethostname()
        where = f"[{host}]" if ":" in host else host
        words = ["distexec", "worker", "--join", f"{where}:{self.port}"]
        words += security_mod.worker_flags(self._security)
        return shlex.join(words)

    def workers(self) -> list[int]:
        """The pids of the live workers that joined through this manager."""
        with self._ctx.lock:
            return sorted(p for p, r in self._ctx.peers.items()
                          if r.manager is self and r.state == WorkerState.CONNECTED
                          and p in self._settled)

    def wait_for_workers(self, n: int, timeout: float | None = None) -> list[int]:
        """Wait until ``n`` workers that joined through this manager are live; their pids.

        Raises:
            WaitTimeout: fewer than ``n`` within ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._ctx.lock:
            while True:
                pids = self.workers()
                if len(pids) >= n:
                    return pids
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise WaitTimeout(f"{len(pids)} of {n} workers joined within "
                                      f"{timeout} seconds")
                self._ctx.changed.wait(left)

    def close(self) -> None:
        """Stop accepting workers (those that joined stay)."""
        with self._cond:
            self._closed = True
            pending, self._pending = self._pending, []
            self._cond.notify_all()
        self._listener.close()
        for config in pending:
            _close_link(config)

    def __repr__(self) -> str:
        return f"ElasticManager(address={self.address!r}, port={self.port})"

    # -- accepting (handshake threads) -------------------------------------------------------
    def _authenticated(self, link, _version: int) -> None:
        """A worker passed the challenge: read where it listens, queue it for the joiner."""
        try:
            peer = link.getpeername()[0]
            host, port = _read_address(link, time.monotonic() + self._handshake_timeout)
        except (OSError, EOFError, ProtocolError) as exc:
            log.warning("ElasticManager: a worker that authenticated did not send its address "
                        "line: %s", exc)
            link.close()
            return
        config = WorkerConfig(host=peer, port=port, bind_addr=host, connect_at=(host, port),
                              userdata={"link": link})
        with self._cond:
            if self._closed:
                link.close()
                return
            self._pending.append(config)
            self._cond.notify_all()

    # -- joining (the joiner thread) ---------------------------------------------------------
    def _join_loop(self) -> None:
        use_context(self._ctx)
        while True:
            with self._cond:
                while not self._pending and not self._closed and not self._ctx.closed:
                    self._cond.wait()
                if self._closed or self._ctx.closed:
                    return
            try:
                membership.addprocs(self._ctx, self, {"topology": self._topology,
                                                      "security": self._security})
            except Exception as exc:  # each failure was logged or concerns its worker only
                log.warning("ElasticManager: a worker could not join: %s", exc)
            finally:
                with self._ctx.lock:
                    self._settled.update(p for p, r in self._ctx.peers.items()
                                         if r.manager is self)
                    self._ctx.changed.notify_all()

    # -- the ClusterManager interface --------------------------------------------------------
    def launch(self, params: dict, launched: list[WorkerConfig],
               launch_ntfy: threading.Condition) -> None:
        """Hand over the workers that joined since the last call."""
        with self._cond:
            configs, self._pending = self._pending, []
        with launch_ntfy:
            launched.extend(configs)
            launch_ntfy.notify_all()

    def connect(self, pid: int, config: WorkerConfig):
        link = config.userdata["link"]
        return link, link

    def manage(self, pid: int, config: WorkerConfig, op: str) -> None:
        if op == "deregister":
            log.info("Worker %d (joined from %s) left", pid, config.host)

    def kill(self, pid: int, config: WorkerConfig) -> None:
        if config.os_pid is None:  # it never joined: nothing to ask, only a link to close
            _close_link(config)
            return
        super().kill(pid, config)


def _close_link(config: WorkerConfig) -> None:
    link = (config.userdata or {}).get("link")
    if link is not None:
        try:
            link.close()
        except OSError:
            pass


class _JoinListener(sockets.Listener):
    """The master's join port: every refusal is logged with the address it came from.

    A connection closed before it began the challenge (a port scan, a TCP health probe) is
    only a debug line. The key is the cluster's cookie when the worker comes (one set with
    ``cluster_cookie(value)`` after the manager was made counts).
    """

    def __init__(self, ctx, sock: socket.socket, on_authenticated, **options) -> None:
        super().__init__(sock, b"", on_authenticated, **options)
        self._ctx = ctx

    def _authenticate(self, conn: socket.socket) -> None:
        try:
            peer = "%s:%s" % conn.getpeername()[:2]
        except OSError:
            peer = "an unknown address"
        deadline = time.monotonic() + self._handshake_timeout
        try:
            if self._tls is not None:
                conn = sockets.accept_tls(conn, self._tls, deadline)
            version = sockets.serve_handshake(conn, self._ctx.cookie.key,
                                              sockets.remaining(deadline))
        except (AuthenticationError, ProtocolError) as exc:
            self._refused(peer, str(exc), conn)
            return
        except ssl_error() as exc:
            self._refused(peer, f"TLS handshake failed ({exc.reason or exc}): the cluster "
                                "requires TLS with its own CA (a worker without --tls, or "
                                "with another certificate?)", conn)
            return
        except (OSError, EOFError) as exc:
            log.debug("join port: connection from %s dropped during the handshake: %r",
                      peer, exc)
            conn.close()
            return
        finally:
            with self._lock:
                self._preauth -= 1
        self._on_authenticated(conn, version)

    def _refused(self, peer: str, reason: str, conn) -> None:
        self._warn(f"ElasticManager refused a worker joining from {peer}: {reason}")
        conn.close()


def _read_address(link, deadline: float) -> tuple[str, int]:
    """The ``distexec_worker:PORT#ADDR`` line a joined worker sends after the challenge."""
    data = bytearray()
    while not data.endswith(b"\n"):
        if len(data) >= MAX_ADDRESS_LINE:
            raise ProtocolError("address line too long")
        link.settimeout(sockets.remaining(deadline))
        chunk = link.recv(1)  # byte by byte: what follows is the worker's first frame
        if not chunk:
            raise EOFError("connection closed before the address line")
        data += chunk
    link.settimeout(None)
    match = ADDRESS_LINE.match(data.decode("ascii", "replace").strip())
    if match is None:
        raise ProtocolError("malformed address line")
    return match.group(2), int(match.group(1))


# ============================================================================================
# the worker's side: distexec worker --join HOST:PORT
# ============================================================================================
def join_cluster(master: str, *, cookie_file: str | None = None, tls: bool = False,
                 bind_to: str | None = None,
                 join_timeout: float = DEFAULT_JOIN_TIMEOUT) -> NoReturn:
    """Run this process as a worker that joins the master's ElasticManager at ``master``.

    The cookie is the first line of ``cookie_file`` (which only its owner may read) or of
    stdin; with ``tls`` the TLS line (``Security.stdin_line()``) follows it. The master is
    tried until ``join_timeout`` seconds have passed (with backoff); a refusal ends the
    process at once. Never returns: the process exits when its master goes away.
    """
    try:
        host, port = parse_master(master)
    except ValueError as exc:
        _die(2, str(exc))
    cookie, security = read_join_secret(cookie_file, tls)
    link = connect_with_retries(host, port, cookie, security, join_timeout)
    _serve(link, cookie, security, bind_to)


def parse_master(spec: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[V6]:PORT``) -> ``(host, port)``."""
    host, sep, port = spec.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--join needs HOST:PORT, got {spec!r}")
    return host.strip("[]"), int(port)


def read_join_secret(cookie_file: str | None, tls: bool) -> tuple[str, Security | None]:
    """The cookie (and with ``tls`` the Security) from ``cookie_file`` or stdin; exits with
    ``EXIT_BAD_COOKIE`` and one line on stderr when it cannot."""
    if cookie_file is not None:
        try:
            stream = open_owner_only(cookie_file)
        except OSError as exc:
            _die(EXIT_BAD_COOKIE, str(exc))
    else:
        stream = sys.stdin.buffer
    where = f"cookie file {cookie_file!r}" if cookie_file else "stdin"
    line = stream.readline(secret_mod.MAX_LENGTH + 2)
    cookie = line.decode("ascii", "replace").strip()
    try:
        secret_mod.validate(cookie)
    except ValueError as exc:  # never quotes the line: it may be a secret
        _die(EXIT_BAD_COOKIE, f"the first line of {where} is not a cluster cookie: {exc}")
    security = None
    if tls:
        try:
            security = security_mod.read_tls_line(stream)
        except ValueError as exc:
            _die(EXIT_BAD_COOKIE, f"{where}: {exc}")
    if cookie_file is not None:
        stream.close()
    return cookie, security


def open_owner_only(path: str):
    """Open ``path`` for reading if only its owner (this user, or root) can read it, as ssh
    checks a private key.

    Raises:
        PermissionError: group or others have any permission on it, or another user owns it.
        OSError: it cannot be opened, or is not a regular file.
    """
    stream = open(path, "rb")
    try:
        info = os.fstat(stream.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"cookie file {path!r} is not a regular file")
        if info.st_mode & 0o077:
            raise PermissionError(
                f"cookie file {path!r} is readable by others (permissions "
                f"{stat.S_IMODE(info.st_mode):04o}): it must be accessible by its owner only "
                f"(chmod 600 {shlex.quote(path)})")
        if info.st_uid not in (os.geteuid(), 0):
            raise PermissionError(f"cookie file {path!r} belongs to uid {info.st_uid}, "
                                  "not to this user")
    except BaseException:
        stream.close()
        raise
    return stream


def connect_with_retries(host: str, port: int, cookie: str, security: Security | None,
                         join_timeout: float):
    """An authenticated link to the master; exits ``EXIT_UNREACHABLE`` after
    ``join_timeout`` seconds of failed attempts, ``EXIT_REFUSED`` at the first refusal."""
    deadline = time.monotonic() + join_timeout
    delay, attempts, announced = _FIRST_DELAY, 0, False
    while True:
        attempts += 1
        try:
            return _attempt(host, port, cookie, security, deadline)
        except (AuthenticationError, ProtocolError) as exc:
            _die(EXIT_REFUSED, f"the master refused this worker: {exc}")
        except (OSError, EOFError) as exc:
            reason = _reason(exc)
        left = deadline - time.monotonic()
        if left <= 0:
            _die(EXIT_UNREACHABLE, f"could not join the master at {host}:{port} within "
                                   f"{join_timeout:g} seconds ({attempts} attempts; last: "
                                   f"{reason})")
        if not announced:
            announced = True
            _say(f"cannot reach the master at {host}:{port} yet ({reason}); retrying for "
                 f"{left:.0f} more seconds")
        time.sleep(min(left, delay * random.uniform(0.5, 1.0)))  # backoff between attempts
        delay = min(delay * 2, _MAX_DELAY)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, socket.gaierror):
        return f"name not resolved: {exc.strerror}"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _attempt(host: str, port: int, cookie: str, security: Security | None, deadline: float):
    """One try: TCP, the master's first bytes (a master that hangs up before them is busy,
    not refusing), [TLS], then the cookie challenge with this worker initiating."""
    timeout = max(min(deadline - time.monotonic(), 10.0), 1.0)
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        first = _peek_hello(sock, time.monotonic() + timeout)
        use_tls = security_mod.uses_tls(security)
        if first == handshake.TLS_HELLO and not use_tls:
            sock.sendall(handshake.MAGIC)  # an answer its TLS layer rejects and logs
            raise AuthenticationError("the master requires TLS (start the worker with --tls "
                                      "and the cluster's TLS line after the cookie)")
        peer = f"{host}:{port}"
        if use_tls:
            assert security is not None
            sock = sockets.connect_tls(sock, security.client_context(),
                                       time.monotonic() + timeout, peer)
        sockets.initiate_handshake(sock, secret_mod.ClusterSecret(cookie).key, timeout, peer)
    except BaseException:
        sock.close()
        raise
    return sock


def _peek_hello(sock: socket.socket, deadline: float) -> bytes:
    """The master's HELLO (or TLS_HELLO), left unread; EOFError if it hangs up first."""
    while True:
        sock.settimeout(sockets.remaining(deadline))
        data = sock.recv(handshake.HELLO_SIZE, socket.MSG_PEEK)
        if not data:
            raise EOFError("the master closed the connection before its greeting")
        if len(data) >= handshake.HELLO_SIZE:
            return data
        select.select([sock], [], [], min(sockets.remaining(deadline), 0.05))


def _serve(link, cookie: str, security: Security | None, bind_to: str | None) -> NoReturn:
    """Become a worker whose master link is ``link``: listen for peers, tell the master
    where, then serve as ``start_worker`` does."""
    from . import worker
    worker._detach_stdin(False)  # the cookie was read: user code gets an empty stdin
    worker._fresh_main_module()
    ctx = worker.init_worker(cookie, security=security)
    ctx.adopts_master_view = True
    ctx.runner.reserve_main_thread()
    local = link.getsockname()[0]  # this host's address on the route to the master
    host, port, hint = sockets.parse_bind_to(bind_to, default_host=local)
    tls = security.server_context() if security is not None and security.tls else None
    assert ctx.cookie is not None
    listener = sockets.Listener(sockets.bind_listener(host, port, hint), ctx.cookie.key,
                                lambda sock, _v: worker._accept(ctx, sock),
                                handshake_timeout=sockets.handshake_timeout(), tls=tls)
    ctx.listener = listener
    listener.start()
    bound, port = listener.address
    advertised = local if bound in ("0.0.0.0", "::") else bound
    ctx.worker_address = (advertised, port)
    worker._install_sigint(ctx)
    threading.Thread(target=worker._master_watchdog, args=(ctx.joined,), daemon=True,
                     name="distexec-watchdog").start()
    line = f"distexec_worker:{port}#{advertised}\n"
    link.sendall(line.encode("ascii"))
    worker._accept(ctx, link)
    sys.stdout.write(line)
    sys.stdout.flush()
    ctx.runner.serve_main_thread(lambda: ctx.closed)
    exit_now(0)


def _say(message: str) -> None:
    print(f"distexec worker: {message}", file=sys.stderr, flush=True)


def _die(code: int, message: str) -> NoReturn:
    _say(message)
    exit_now(code)

