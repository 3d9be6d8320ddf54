"""Network and authentication faults (spec/faults.md N1-N5, N8-N10).

A worker's port is reachable by anyone on the host, so whatever arrives there before the
peer has proved it knows the cookie must be cheap to reject: a wrong cookie, garbage, port
scans and stalled handshakes are closed without unpickling anything, without reading more
than the fixed-size handshake, and without disturbing the master's session. Tests against a
real worker use the address the master recorded for it; tests that must observe the
server's side (bytes read, ``loads`` calls, handshake deadlines) run a
:class:`~distexec.transport.sockets.Listener` in the test process.
"""

from __future__ import annotations

import logging
import os
import pickle
import secrets
import socket
import struct
import threading
import time

import psutil
import pytest

import distexec
from distexec import AuthenticationError
from distexec.protocol import handshake, serialization
from distexec.protocol.frames import Kind
from distexec.runtime.context import default_context
from distexec.transport import sockets
from distexec.transport.connection import Connection
from tests.faults.helpers import connect_at, counting_listen_socket
from tests.helpers import os_pid, wait_for_output, wait_until

pytestmark = pytest.mark.timeout(60)

KEY = secrets.token_bytes(32)


def _cookie_key() -> bytes:
    """The master's cluster secret (exists once workers were added)."""
    return default_context().cookie.key


def _assert_worker_serves(pid: int) -> None:
    assert distexec.remotecall_fetch(lambda: 6 * 7, pid) == 42


def _read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes (a reset counts as closed)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass
    return data


# --------------------------------------------------------------------------------------------
# An in-process server: counts handshakes that passed and every unpickling
# --------------------------------------------------------------------------------------------
class _Server:
    def __init__(self, monkeypatch, **listener_options):
        self.authenticated: list[socket.socket] = []
        self.loads_calls = 0
        self.sock = counting_listen_socket()
        self.listener = sockets.Listener(self.sock, KEY, self._on_authenticated,
                                         **listener_options)
        for target, name in ((pickle, "loads"), (serialization, "loads")):
            monkeypatch.setattr(target, name, self._counting(getattr(target, name)))
        self.listener.start()

    def _counting(self, loads):
        def counted(*args, **kwargs):
            self.loads_calls += 1
            return loads(*args, **kwargs)
        return counted

    def _on_authenticated(self, sock, _version) -> None:
        self.authenticated.append(sock)

    @property
    def address(self) -> tuple[str, int]:
        return self.listener.address

    def close(self) -> None:
        self.listener.close()
        for sock in self.authenticated:
            sock.close()


@pytest.fixture
def server(monkeypatch):
    made: list[_Server] = []

    def make(**listener_options) -> _Server:
        made.append(_Server(monkeypatch, **listener_options))
        return made[-1]

    yield make
    for srv in made:
        srv.close()


def _legit_client(address) -> socket.socket:
    return sockets.connect(*address, KEY, timeout=5)


# --------------------------------------------------------------------------------------------
# N1: wrong cookie
# --------------------------------------------------------------------------------------------
def test_wrong_cookie_is_rejected_and_the_worker_keeps_serving(add_workers):
    (pid,) = add_workers(1)
    address = connect_at(pid)
    started = time.monotonic()
    with pytest.raises(AuthenticationError, match="wrong cluster cookie"):
        sockets.connect(*address, secrets.token_bytes(32), timeout=5)
    assert time.monotonic() - started < 1
    assert distexec.workers() == [pid]
    _assert_worker_serves(pid)


def test_wrong_cookies_unpickle_nothing_and_log_one_warning(server, caplog):
    caplog.set_level(logging.DEBUG, logger="distexec.transport")
    srv = server()
    for _ in range(5):
        with pytest.raises(AuthenticationError):
            sockets.connect(*srv.address, secrets.token_bytes(32), timeout=5)
    _legit_client(srv.address).close()
    wait_until(lambda: len(srv.authenticated) == 1, 5)
    assert srv.loads_calls == 0

    def rejections():
        return [r for r in caplog.records if "invalid connection credentials" in r.getMessage()]

    wait_until(lambda: len(rejections()) == 5, 5, message="the listener to log 5 rejections")
    assert [r.levelno for r in rejections()].count(logging.WARNING) == 1  # rate-limited


# --------------------------------------------------------------------------------------------
# N2: garbage
# --------------------------------------------------------------------------------------------
GARBAGE = {
    "random-32B": os.urandom(32),
    "random-64KiB": os.urandom(64 * 1024),
    "http-get": b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "tls-client-hello": bytes.fromhex("16030100c4010000c00303") + os.urandom(32) + b"\x00" * 8,
}


@pytest.mark.parametrize("garbage", GARBAGE.values(), ids=GARBAGE.keys())
def test_garbage_closes_the_connection_and_spares_the_worker(add_workers, garbage):
    (pid,) = add_workers(1)
    with socket.create_connection(connect_at(pid), timeout=5) as sock:
        sock.settimeout(5)
        assert sock.recv(handshake.HELLO_SIZE).startswith(handshake.MAGIC)
        started = time.monotonic()
        try:
            sock.sendall(garbage)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed before taking all of it: also a rejection
        _read_until_closed(sock, timeout=5)
        assert time.monotonic() - started < 1, "the server should close at the first bad byte"
    assert distexec.workers() == [pid]
    _assert_worker_serves(pid)


@pytest.mark.parametrize("garbage", GARBAGE.values(), ids=GARBAGE.keys())
def test_garbage_is_never_unpickled(server, garbage):
    srv = server()
    with socket.create_connection(srv.address, timeout=5) as sock:
        try:
            sock.sendall(garbage)
        except (BrokenPipeError, ConnectionResetError):
            pass
        _read_until_closed(sock, timeout=5)
    _legit_client(srv.address).close()
    wait_until(lambda: len(srv.authenticated) == 1, 5)
    assert srv.loads_calls == 0
    assert all(s.bytes_read <= handshake.REPLY_SIZE for s in srv.sock.accepted)


# --------------------------------------------------------------------------------------------
# N3: port scan
# --------------------------------------------------------------------------------------------
def test_port_scan_leaves_the_worker_serving_quietly(add_workers, capfd):
    (pid,) = add_workers(1)
    address = connect_at(pid)
    worker = psutil.Process(os_pid(pid))
    fds_before = worker.num_fds()
    started = time.monotonic()
    for _ in range(1000):
        socket.create_connection(address, timeout=5).close()
    sockets.connect(*address, _cookie_key(), timeout=5).close()
    assert time.monotonic() - started < 5
    wait_until(lambda: worker.num_fds() <= fds_before, 10,
               message="the worker's file descriptors to return to their count before the scan")
    assert distexec.workers() == [pid]
    _assert_worker_serves(pid)
    # Probes are logged at DEBUG at most: nothing reaches the worker's output before a marker
    # printed after the scan (its output is one ordered stream).
    distexec.remotecall_fetch(print, pid, "scan over", flush=True)
    output = wait_for_output(capfd, f"From worker {pid}:\tscan over")
    assert output.count(f"From worker {pid}:") == 1, output


# --------------------------------------------------------------------------------------------
# N4: stalled handshakes
# --------------------------------------------------------------------------------------------
def _stall(address) -> socket.socket:
    """Connect, read the HELLO, send the magic and half the version, then nothing."""
    sock = socket.create_connection(address, timeout=5)
    sock.recv(handshake.HELLO_SIZE)
    sock.sendall(handshake.MAGIC + b"\x00")
    return sock


def test_stalled_handshakes_do_not_block_others_and_close_at_the_deadline(server):
    deadline = 1.0
    srv = server(handshake_timeout=deadline)
    stalled, stalled_at = [], []
    try:
        for _ in range(100):
            stalled_at.append(time.monotonic())
            stalled.append(_stall(srv.address))
        started = time.monotonic()
        _legit_client(srv.address).close()
        assert time.monotonic() - started < 1.0
        for sock, since in zip(stalled, stalled_at, strict=True):
            assert _read_until_closed(sock, timeout=5) == b""
            # Each socket's own handshake deadline closes it (a socket seen closed late
            # only because its predecessors were read first would still be within 0.5 s).
            assert deadline - 0.5 <= time.monotonic() - since <= deadline + 0.5
    finally:
        for sock in stalled:
            sock.close()
    assert len(srv.authenticated) == 1
    assert srv.loads_calls == 0


def test_connections_beyond_the_preauth_cap_are_closed_at_once(server):
    srv = server(handshake_timeout=5.0, max_preauth=3)
    stalled = [_stall(srv.address) for _ in range(3)]
    try:
        with socket.create_connection(srv.address, timeout=5) as extra:
            started = time.monotonic()
            assert _read_until_closed(extra, timeout=5) == b""
            assert time.monotonic() - started < 1.0
    finally:
        for sock in stalled:
            sock.close()
    _legit_client(srv.address).close()  # the slots are free again
    wait_until(lambda: len(srv.authenticated) == 1, 5)


# --------------------------------------------------------------------------------------------
# N5: oversized lengths before authentication
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("length", [2**31 - 1, 2**63])
def test_oversized_length_before_auth_reads_only_the_handshake(server, length):
    srv = server()
    payload = handshake.MAGIC + struct.pack(">Q", length) + os.urandom(1024 * 1024)
    with socket.create_connection(srv.address, timeout=5) as sock:
        sock.recv(handshake.HELLO_SIZE)
        sender = threading.Thread(target=_send_ignoring_reset, args=(sock, payload), daemon=True)
        sender.start()
        _read_until_closed(sock, timeout=5)
        sender.join(5)
    wait_until(lambda: srv.sock.accepted, 5)
    (accepted,) = srv.sock.accepted
    assert accepted.bytes_read == handshake.REPLY_SIZE
    assert srv.loads_calls == 0
    assert not srv.authenticated


def _send_ignoring_reset(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass


# --------------------------------------------------------------------------------------------
# N8: a truncated handshake at every offset
# --------------------------------------------------------------------------------------------
def test_truncated_reply_at_every_offset_is_closed_cleanly(server):
    srv = server(handshake_timeout=2.0)
    for k in range(handshake.REPLY_SIZE):
        with socket.create_connection(srv.address, timeout=5) as sock:
            hello = sock.recv(handshake.HELLO_SIZE)
            reply = handshake.ClientHandshake(KEY).receive_hello(hello)
            sock.sendall(reply[:k])
            sock.shutdown(socket.SHUT_WR)
            assert _read_until_closed(sock, timeout=5) == b"", f"offset {k}"
    _legit_client(srv.address).close()
    wait_until(lambda: len(srv.authenticated) == 1, 5)
    assert srv.loads_calls == 0


def _fake_acceptor(cut: int) -> tuple[socket.socket, threading.Thread]:
    """A real acceptor that stops after ``cut`` bytes of its HELLO+VERDICT, then hangs up."""
    listen = socket.socket()
    listen.bind(("127.0.0.1", 0))
    listen.listen(1)

    def serve():
        conn, _ = listen.accept()
        with conn:
            server = handshake.ServerHandshake(KEY)
            hello = server.hello()
            conn.sendall(hello[:cut])
            if cut > len(hello):
                reply = sockets._recv_exact_before(conn, handshake.REPLY_SIZE,
                                                   time.monotonic() + 5)
                conn.sendall(server.receive_reply(reply)[:cut - len(hello)])
            conn.shutdown(socket.SHUT_WR)
            _read_until_closed(conn, timeout=5)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listen, thread


@pytest.mark.parametrize("cut", range(handshake.HELLO_SIZE + handshake.VERDICT_SIZE))
def test_truncated_hello_or_verdict_fails_the_initiator_cleanly(cut):
    listen, thread = _fake_acceptor(cut)
    with listen:
        with pytest.raises(AuthenticationError, match="closed the connection"):
            sockets.connect(*listen.getsockname(), KEY, timeout=5)
        thread.join(5)


# --------------------------------------------------------------------------------------------
# N9: the cookie never appears where other users can read it
# --------------------------------------------------------------------------------------------
def test_cookie_is_not_in_any_workers_cmdline_or_environ(add_workers):
    pids = add_workers(2)
    cookie = str(distexec.cluster_cookie()).encode()
    for pid in pids:
        worker = os_pid(pid)
        for name in ("cmdline", "environ"):
            with open(f"/proc/{worker}/{name}", "rb") as f:
                assert cookie not in f.read(), f"cookie in /proc/{worker}/{name}"
    secret = default_context().cookie
    assert cookie.decode() not in repr(secret)
    with pytest.raises(TypeError):
        pickle.dumps(secret)


# --------------------------------------------------------------------------------------------
# N10: a connection claiming the id of a live worker
# --------------------------------------------------------------------------------------------
def _link_to(pid: int) -> int:
    """Runs on a worker: open (if needed) the link to ``pid`` and return its identity."""
    from distexec.runtime.context import current_context
    distexec.remotecall_fetch(os.getpid, pid)
    return id(current_context().record(pid).conn)


def _claim(address, key: bytes, pid: int) -> None:
    """Authenticate to a worker, send IDENTIFY claiming ``pid``; wait until it hangs up."""
    closed = threading.Event()
    impostor = Connection(sockets.connect(*address, key, timeout=5),
                          on_frame=lambda c, f: None, on_close=lambda c, e: closed.set(),
                          name="impostor")
    impostor.start()
    impostor.send(Kind.IDENTIFY, pickle.dumps(pid))
    assert closed.wait(5), f"the worker should close a connection claiming id {pid}"


def test_identify_with_a_live_workers_id_is_rejected(add_workers, capfd):
    first, second = add_workers(2)
    link_before = distexec.remotecall_fetch(_link_to, second, first)

    _claim(connect_at(second), _cookie_key(), first)
    wait_for_output(capfd, f"From worker {second}:", "ProtocolError",
                    f"claims worker id {first}")
    assert distexec.remotecall_fetch(_link_to, second, first) == link_before
    assert distexec.workers() == [first, second]


def test_identify_with_a_removed_workers_id_is_rejected(add_workers, capfd):
    removed, second = add_workers(2)
    distexec.rmprocs(removed, waitfor=10)
    wait_until(lambda: removed not in distexec.remotecall_fetch(distexec.procs, second), 5,
               message=f"worker {second} to learn that {removed} was removed")

    _claim(connect_at(second), _cookie_key(), removed)
    wait_for_output(capfd, f"From worker {second}:", "ProtocolError",
                    f"worker id {removed} was removed")
    assert distexec.workers() == [second]
    _assert_worker_serves(second)


def test_identify_claiming_a_lower_unlinked_id_is_rejected(add_workers, capfd):
    """Only the higher pid opens a link: a claim to a lower id is an impostor's."""
    lower, higher = add_workers(2)
    assert not distexec.remotecall_fetch(_has_link_to, higher, lower)  # lazy: no link yet

    _claim(connect_at(higher), _cookie_key(), lower)
    wait_for_output(capfd, f"From worker {higher}:", "ProtocolError",
                    f"worker {lower} may not open a link to worker {higher}")
    # The real worker is still the one answering calls made through that pid.
    assert distexec.remotecall_fetch(
        lambda: distexec.remotecall_fetch(distexec.myid, lower), higher) == lower


def _has_link_to(pid: int) -> bool:
    from distexec.runtime.context import current_context
    record = current_context().record(pid)
    return record is not None and record.conn is not None
