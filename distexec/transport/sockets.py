"""Listening, accepting and connecting: every new socket passes the handshake first.

Owns the pre-authentication phase of every connection, and its deadline
(``DISTEXEC_HANDSHAKE_TIMEOUT``, read by ``handshake_timeout``). Imports ``distexec.errors``,
``distexec.protocol`` and ``.tls``.

    accept thread ──► (pre-auth cap) ──► handshake thread per socket, with a deadline
                                          ├─ [TLS: TLS_HELLO, TLS handshake, peer cert checked]
                                          ├─ fails ──► log (rate-limited), close
                                          └─ passes ──► on_authenticated(sock)
    connect() ──► TCP connect ──► [TLS] ──► client handshake ──► authenticated socket (or raise)

Before the peer has authenticated, at most ``REPLY_SIZE`` bytes are read from it (fewer when
its first bytes are not the magic: it is rejected there) and nothing is unpickled; the
accept loop only accepts, so a stalled or hostile peer never blocks others. With TLS the
TLS handshake comes first (OpenSSL reads the peer's handshake records, bounded by TLS), then
the same cookie challenge runs inside the encrypted channel.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Callable

from ..errors import AuthenticationError, ProtocolError
from ..protocol import handshake
from .tls import ssl_error

if TYPE_CHECKING:
    import ssl

log = logging.getLogger("distexec.transport")

DEFAULT_HANDSHAKE_TIMEOUT = 10.0
MAX_PREAUTH_CONNECTIONS = 128
# The accept loop starts a thread per connection, far slower than a client can connect; with
# a short backlog a burst (a port scan, many workers connecting at once) overflows it and the
# kernel drops SYNs, which costs each dropped client a one-second retransmit.
LISTEN_BACKLOG = 1024


def parse_bind_to(spec: str | None, default_host: str = "127.0.0.1") -> tuple[str, int | None, bool]:
    """Parse ``ADDR``, ``ADDR:PORT`` (fixed) or ``ADDR:[PORT]`` (hint).

    Returns (host, port or None, port_is_hint). Julia: ``--bind-to``.
    """
    if not spec:
        return default_host, None, True
    host, sep, port = spec.rpartition(":")
    if not sep or (host.startswith("[") and not host.endswith("]") and "]" not in port):
        return spec.strip("[]") if spec.startswith("[") else spec, None, True
    hint = port.startswith("[")
    if hint:
        if not port.endswith("]"):
            raise ValueError("Malformed bind port string, please see the addprocs documentation "
                             f"for the formatting rules: {spec}")
        port = port[1:-1]
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"invalid port in bind address {spec!r}")
    return host.strip("[]") or default_host, int(port), hint


def bind_listener(host: str, port: int | None, hint: bool) -> socket.socket:
    """Bind a listening socket; with a hint, scan upward (wrapping) from it for a free port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if port is None:
        port = 0  # the kernel picks a free port: no scan, no collisions between workers
    candidates = [port] if (not hint or port == 0) else _hint_ports(port)
    last_error: OSError | None = None
    for candidate in candidates:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.bind((host, candidate))
            sock.listen(LISTEN_BACKLOG)
            return sock
        except OSError as exc:
            sock.close()
            last_error = exc
    raise OSError(f"no ports available to bind on {host}") from last_error


def _hint_ports(start: int):
    for offset in range(0, 65536 - 1024):
        yield 1024 + (start - 1024 + offset) % (65536 - 1024)


class Listener:
    """Accepts connections and authenticates each on its own thread before handing it on."""

    def __init__(self, sock: socket.socket, secret: bytes,
                 on_authenticated: Callable[[socket.socket, int], object], *,
                 handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
                 max_preauth: int = MAX_PREAUTH_CONNECTIONS,
                 tls: ssl.SSLContext | None = None):
        self.sock = sock
        self._secret = secret
        self._tls = tls  # a server context: every connection must speak TLS first
        self._on_authenticated = on_authenticated
        self._handshake_timeout = handshake_timeout
        self._max_preauth = max_preauth
        self._preauth = 0
        self._lock = threading.Lock()
        self._closed = False
        self._last_warning = 0.0
        self._thread = threading.Thread(target=self._accept_loop, name="distexec-accept", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return host, port

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def adopt(self, conn: socket.socket) -> None:
        """Authenticate ``conn``, a socket connected by other means (the launcher's end of a
        socket pair), as if this listener had accepted it."""
        with self._lock:
            self._preauth += 1
        threading.Thread(target=self._authenticate, args=(conn,), daemon=True,
                         name="distexec-handshake").start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _addr = self.sock.accept()
            except OSError:
                if self._closed:
                    return
                continue  # e.g. ECONNABORTED from a scanner: keep serving
            with self._lock:
                admitted = self._preauth < self._max_preauth
                if admitted:
                    self._preauth += 1
            if not admitted:
                conn.close()
                continue
            threading.Thread(target=self._authenticate, args=(conn,), daemon=True,
                             name="distexec-handshake").start()

    def _authenticate(self, conn: socket.socket) -> None:
        deadline = time.monotonic() + self._handshake_timeout
        try:
            if self._tls is not None:
                conn = accept_tls(conn, self._tls, deadline)
            peer_version = serve_handshake(conn, self._secret, remaining(deadline))
        except (AuthenticationError, ProtocolError) as exc:
            self._warn(f"rejected connection: {exc}")
            conn.close()
            return
        except ssl_error() as exc:  # plaintext client, certificate not from our CA, ...
            self._warn(f"rejected connection: TLS handshake failed: {_ssl_reason(exc)}")
            conn.close()
            return
        except (OSError, EOFError) as exc:
            log.debug("connection dropped during handshake: %r", exc)
            conn.close()
            return
        finally:
            with self._lock:
                self._preauth -= 1
        self._on_authenticated(conn, peer_version)

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_warning >= 1.0:  # rate-limited: a scanner must not flood the log
            self._last_warning = now
            log.warning("Process %d - %s", os.getpid(), message)
        else:
            log.debug(message)


def serve_handshake(conn: socket.socket, secret: bytes, timeout: float) -> int:
    """Run the acceptor's side of the handshake; returns the peer's protocol version."""
    deadline = time.monotonic() + timeout
    server = handshake.ServerHandshake(secret)
    _send_before(conn, server.hello(), deadline)
    prefix, verdict = _recv_magic_before(conn, server, deadline)
    if verdict is None:
        rest = _recv_exact_before(conn, handshake.REPLY_SIZE - len(prefix), deadline)
        verdict = server.receive_reply(prefix + rest)
    _send_before(conn, verdict, deadline)
    if server.error is not None:
        raise server.error
    if server.peer_version is None:  # cannot happen: a reply that passed announced it
        raise ProtocolError("handshake passed without a peer protocol version")
    conn.settimeout(None)
    return server.peer_version


def connect(host: str, port: int, secret: bytes, timeout: float, *,
            tls: ssl.SSLContext | None = None) -> socket.socket:
    """Open a TCP connection (TLS with a client context) and authenticate as the initiator.

    Returns the socket (an ``ssl.SSLSocket`` with TLS).
    """
    deadline = time.monotonic() + timeout
    sock = socket.create_connection((host, port), timeout=timeout)
    if tls is not None:
        sock = connect_tls(sock, tls, deadline, f"{host}:{port}")
    initiate_handshake(sock, secret, _remaining_or_expired(deadline), f"{host}:{port}")
    return sock


def accept_tls(conn: socket.socket, context: ssl.SSLContext, deadline: float) -> ssl.SSLSocket:
    """Acceptor: send ``TLS_HELLO``, then run the TLS handshake (the peer must show a
    certificate signed by our CA). Closes the connection on failure."""
    try:
        _send_before(conn, handshake.TLS_HELLO, deadline)
        tls = context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
    except BaseException:
        conn.close()
        raise
    try:
        tls.settimeout(remaining(deadline))
        tls.do_handshake()
    except BaseException:
        tls.close()
        raise
    return tls


def connect_tls(sock: socket.socket, context: ssl.SSLContext, deadline: float,
                peer: str) -> ssl.SSLSocket:
    """Initiator: check the acceptor's ``TLS_HELLO``, then run the TLS handshake.

    Raises:
        AuthenticationError: the acceptor does not speak TLS, or either side rejected the
            other's certificate (the SSL error is the cause). The socket is then closed.
    """
    try:
        handshake.check_tls_hello(_recv_exact_before(sock, handshake.HELLO_SIZE, deadline))
        tls = context.wrap_socket(sock, server_side=False, do_handshake_on_connect=False)
    except EOFError:
        sock.close()
        raise AuthenticationError(f"{peer} closed the connection before TLS "
                                  "(not a distexec worker?)") from None
    except (AuthenticationError, ProtocolError) as exc:
        sock.close()
        raise type(exc)(f"{peer}: {exc}") from None
    except BaseException:
        sock.close()
        raise
    try:
        tls.settimeout(remaining(deadline))
        tls.do_handshake()
    except ssl_error() as exc:
        tls.close()
        raise AuthenticationError(f"{peer}: TLS handshake failed: {_ssl_reason(exc)}") from exc
    except BaseException:
        tls.close()
        raise
    return tls


def _ssl_reason(exc: ssl.SSLError) -> str:
    """The readable part of an SSL error (``CERTIFICATE_VERIFY_FAILED``, ...)."""
    detail = getattr(exc, "verify_message", None)
    reason = getattr(exc, "reason", None) or str(exc)
    return f"{reason} ({detail})" if detail else reason


def initiate_handshake(sock, secret: bytes, timeout: float, peer: str) -> int:
    """Run the initiator's side on a connected socket (or stream transport); closes it on failure.

    Returns the peer's protocol version.
    """
    deadline = time.monotonic() + timeout
    try:
        client = handshake.ClientHandshake(secret)
        reply = client.receive_hello(_recv_exact_before(sock, handshake.HELLO_SIZE, deadline))
        _send_before(sock, reply, deadline)
        client.receive_verdict(_recv_exact_before(sock, handshake.VERDICT_SIZE, deadline))
    except EOFError:
        sock.close()
        raise AuthenticationError(f"{peer} closed the connection during the handshake "
                                  "(wrong cluster cookie or not a distexec worker?)") from None
    except ssl_error() as exc:  # TLS 1.3: the acceptor rejects our certificate after our
        sock.close()             # handshake completed; we learn it at the first read
        raise AuthenticationError(f"{peer}: TLS connection rejected: {_ssl_reason(exc)}") \
            from exc
    except BaseException as exc:
        sock.close()
        if isinstance(exc, (AuthenticationError, ProtocolError)):
            exc.args = (f"{peer}: {exc.args[0] if exc.args else exc}",)
        raise
    if client.peer_version is None:  # cannot happen: a HELLO that passed announced it
        raise ProtocolError("handshake passed without a peer protocol version")
    sock.settimeout(None)
    return client.peer_version


def handshake_timeout() -> float:
    """Seconds an incoming connection gets to authenticate, and then to identify itself (a
    worker's listener, the elastic master's join port).

    ``DISTEXEC_HANDSHAKE_TIMEOUT`` (workers inherit the master's environment), else 10 s.
    """
    value = os.environ.get("DISTEXEC_HANDSHAKE_TIMEOUT")
    if not value:
        return DEFAULT_HANDSHAKE_TIMEOUT
    try:
        timeout = float(value)
    except ValueError:
        timeout = math.nan
    if not (math.isfinite(timeout) and timeout > 0):
        raise ValueError("DISTEXEC_HANDSHAKE_TIMEOUT must be a positive number of seconds, "
                         f"got {value!r}")
    return timeout


def remaining(deadline: float) -> float:
    """Seconds left until ``deadline`` (``time.monotonic``); ``socket.timeout`` once past."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise socket.timeout("handshake deadline passed")
    return left


def _remaining_or_expired(deadline: float) -> float:
    """Time left, or a token amount so the next step times out (closing its socket)."""
    return max(deadline - time.monotonic(), 0.001)


def _send_before(sock: socket.socket, data: bytes, deadline: float) -> None:
    sock.settimeout(remaining(deadline))
    sock.sendall(data)


def _recv_magic_before(sock: socket.socket, server: handshake.ServerHandshake,
                       deadline: float) -> tuple[bytes, bytes | None]:
    """Read the REPLY's magic, checking each chunk, so a stranger is rejected at once.

    Returns the bytes read and None, or a reject verdict as soon as they cannot be a REPLY.
    """
    data = b""
    while len(data) < len(handshake.MAGIC):
        sock.settimeout(remaining(deadline))
        chunk = sock.recv(len(handshake.MAGIC) - len(data))
        if not chunk:
            raise EOFError("connection closed during the handshake")
        data += chunk
        verdict = server.receive_magic(data)
        if verdict is not None:
            return data, verdict
    return data, None


def _recv_exact_before(sock: socket.socket, n: int, deadline: float) -> bytes:
    data = bytearray()
    while len(data) < n:
        sock.settimeout(remaining(deadline))
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError("connection closed during the handshake")
        data += chunk
    return bytes(data)
