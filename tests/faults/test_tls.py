"""TLS between cluster processes, and safe default bind addresses (spec/faults.md N12, N14, G10).

A cluster started with ``security=Security(...)`` runs TLS on every link (master to worker,
worker to worker), with certificates checked against the private CA on both sides and the
cookie challenge inside the encrypted channel. A client that speaks plaintext, or shows a
certificate from another CA, is turned away before anything is unpickled, and the worker keeps
serving its master. Without TLS, workers listen on loopback only unless told otherwise, and
binding beyond it warns.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import psutil
import pytest

import distexec
from distexec import (
    AuthenticationError,
    DistributedError,
    DistributedExecutor,
    Security,
    SecurityWarning,
)
from distexec.protocol import handshake
from distexec.protocol.frames import Kind
from distexec.runtime.context import current_context, default_context
from distexec.transport import sockets
from distexec.transport.connection import Connection
from distexec.transport.tls import TLSChannel, _temporary_material
from tests.faults.helpers import (
    UnpicklingCounter,
    connect_at,
    count_preauth_unpickling,
    preauth_unpickling_seen,
)
from tests.helpers import os_pid, wait_until

pytestmark = pytest.mark.timeout(120)

SECURITY = Security.temporary()
REJECT_BUDGET = 1.0
"""N12: seconds from the connection attempt to its failure."""
MIB = 1024 * 1024
TLS = ("TLSChannel", "TLSv1.3")
"""How a TLS link looks from either end (OpenSSL 3 negotiates TLS 1.3 between our ends)."""


@pytest.fixture(autouse=True)
def plaintext_afterwards():
    """The master's cluster is per process: later tests must start without TLS again."""
    yield
    default_context().security = None


def _foreign_material() -> tuple[str, str, str]:
    """(CA, certificate, key) of another cluster: nothing ours trusts."""
    return _temporary_material()


def _our_ca() -> str:
    return SECURITY._ca


def _link_kind(pid: int) -> tuple[str, str | None]:
    """How this process is connected to ``pid``: (channel type, TLS version)."""
    sock = current_context().record(pid).conn.sock
    return type(sock).__name__, getattr(sock, "version", lambda: None)()


def _links_of_this_worker() -> dict[int, tuple[str, str | None]]:
    """Runs on a worker: the kind of each of its links."""
    ctx = current_context()
    with ctx.lock:
        pids = [p for p, r in ctx.peers.items() if r.conn is not None]
    return {p: _link_kind(p) for p in pids}


def _call_peer(other: int) -> int:
    """Runs on a worker: a call to another worker (opens the worker-to-worker link)."""
    return distexec.remotecall_fetch(distexec.myid, other)


def _assert_serves(pid: int) -> None:
    assert distexec.remotecall_fetch(lambda: 6 * 7, pid) == 42


# --------------------------------------------------------------------------------------------
# A cluster without TLS loads no TLS code
# --------------------------------------------------------------------------------------------
def test_a_plaintext_cluster_loads_no_tls_code(add_workers, monkeypatch):
    """``ssl`` and OpenSSL take milliseconds to load in every process, worker and template:
    a cluster without certificates never loads them."""
    (forked,) = add_workers(1)
    monkeypatch.setenv("DISTEXEC_TEMPLATE", "0")
    (spawned,) = add_workers(1)
    for pid in (forked, spawned):  # a lambda travels by value: the worker imports no test module
        assert distexec.remotecall_fetch(lambda: "ssl" in sys.modules, pid) is False, pid
    # This process imported ssl long ago (pytest, numpy); a fresh one shows what distexec does.
    code = ("import sys; before = 'ssl' in sys.modules; import distexec; "
            "print(before, 'ssl' in sys.modules)")
    seen = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=60).stdout.split()
    assert seen[1] == seen[0]  # loaded after the import only if before it (the site's doing)


# --------------------------------------------------------------------------------------------
# A TLS cluster works like any other
# --------------------------------------------------------------------------------------------
@pytest.mark.fault("N12")
def test_every_link_of_a_tls_cluster_is_tls_and_calls_work(add_workers):
    a, b = add_workers(2, security=SECURITY)
    assert distexec.remotecall_fetch(lambda x: x + 1, a, 41) == 42
    assert distexec.remotecall_fetch(_call_peer, b, a) == a  # b opens a TLS link to a
    assert {p: _link_kind(p) for p in (a, b)} == {a: TLS, b: TLS}
    assert distexec.remotecall_fetch(_links_of_this_worker, b) == {1: TLS, a: TLS}


def test_a_remote_channel_between_workers_over_tls(add_workers):
    a, b = add_workers(2, security=SECURITY)
    channel = distexec.RemoteChannel(a, size=4)
    distexec.remotecall_fetch(lambda ch: [ch.put(i) for i in range(3)], b, channel)
    assert [channel.take() for _ in range(3)] == [0, 1, 2]


def _echo(value):
    return value


def test_64_mib_bytes_and_arrays_cross_a_tls_cluster_both_ways_at_once(add_workers):
    (pid,) = add_workers(1, security=SECURITY)
    blob = os.urandom(64 * MIB)
    array = np.random.default_rng(1).random(8 * MIB)  # 64 MiB of float64
    with cf.ThreadPoolExecutor(2) as pool:  # one call's reply flows while the other's argument does
        echoes = [pool.submit(distexec.remotecall_fetch, _echo, pid, value)
                  for value in (blob, array)]
        blob_back, array_back = (f.result(timeout=60) for f in echoes)
    assert hashlib.sha256(blob_back).digest() == hashlib.sha256(blob).digest()
    np.testing.assert_array_equal(array_back, array)


def test_an_executor_maps_over_tls_workers(empty_cluster):
    with DistributedExecutor(2, security=SECURITY) as executor:
        assert list(executor.map(pow, range(20), [2] * 20)) == [i * i for i in range(20)]
        assert {_link_kind(p) for p in executor.workers()} == {TLS}


def _docs_openssl_recipe() -> str:
    """The shell block of docs/security.md that makes a CA and a certificate with openssl."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "security.md").read_text()
    blocks = re.findall(r"^```sh\n(.*?)^```", text, re.S | re.M)
    (recipe,) = [block for block in blocks if "openssl req -x509" in block]
    return recipe


@pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command is not installed")
def test_a_ca_made_with_the_documented_openssl_commands_works(add_workers, tmp_path):
    subprocess.run(["sh", "-e", "-c", _docs_openssl_recipe()], cwd=tmp_path, check=True,
                   capture_output=True, timeout=60)
    security = Security(tmp_path / "ca.pem", tmp_path / "cluster.pem", tmp_path / "cluster.key")
    a, b = add_workers(2, security=security)
    assert distexec.remotecall_fetch(_call_peer, b, a) == a
    assert _link_kind(a) == TLS


# --------------------------------------------------------------------------------------------
# TLSChannel: one reader thread and one writer thread on each end, at full load
# --------------------------------------------------------------------------------------------
class _Ends:
    """Both ends of one authenticated TLS connection, each a Connection with a reader thread."""

    def __init__(self):
        self.key = secrets.token_bytes(32)
        self.received = {"server": [], "client": []}
        accepted: list[Connection] = []
        listener = sockets.Listener(sockets.bind_listener("127.0.0.1", None, True), self.key,
                                    lambda sock, _v: accepted.append(self._open(sock, "server")),
                                    tls=SECURITY.server_context())
        listener.start()
        self.listener = listener
        self.client = self._open(sockets.connect(*listener.address, self.key, 10,
                                                 tls=SECURITY.client_context()), "client")
        self.server = wait_until(lambda: accepted and accepted[0], 10, message="the accept")

    def _open(self, sock, side: str) -> Connection:
        conn = Connection(sock, on_frame=lambda _c, f: self.received[side].append(f),
                          on_close=lambda _c, _e: None, name=side)
        conn.start()
        return conn

    def close(self) -> None:
        self.client.close()
        self.server.close()
        self.listener.close()
        self.client.join(10)
        self.server.join(10)


@pytest.fixture
def ends():
    made = _Ends()
    yield made
    made.close()


def test_64_mib_both_ways_at_once_over_one_tls_connection(ends):
    assert isinstance(ends.client.sock, TLSChannel) and isinstance(ends.server.sock, TLSChannel)
    up, down = os.urandom(64 * MIB), os.urandom(64 * MIB)
    # Each end's writer encrypts while its reader decrypts the other direction.
    sending = threading.Thread(target=ends.server.send, args=(Kind.RESULT, b"down", [down]))
    sending.start()
    ends.client.send(Kind.RESULT, b"up", [up])
    sending.join(60)
    wait_until(lambda: ends.received["server"] and ends.received["client"], 60,
               message="both 64 MiB messages")
    (at_server,), (at_client,) = ends.received["server"], ends.received["client"]
    assert (at_server.payload, at_client.payload) == (b"up", b"down")
    assert hashlib.sha256(at_server.buffers[0]).digest() == hashlib.sha256(up).digest()
    assert hashlib.sha256(at_client.buffers[0]).digest() == hashlib.sha256(down).digest()


def test_many_small_messages_both_ways_arrive_in_order(ends):
    count = 2000

    def send_all(conn, tag: bytes):
        for i in range(count):
            conn.send(Kind.RESULT, tag + i.to_bytes(4, "big"))

    sender = threading.Thread(target=send_all, args=(ends.server, b"s"))
    sender.start()
    send_all(ends.client, b"c")
    sender.join(60)
    wait_until(lambda: len(ends.received["server"]) == len(ends.received["client"]) == count,
               30, message="every small message")
    assert [f.payload for f in ends.received["server"]] == \
        [b"c" + i.to_bytes(4, "big") for i in range(count)]
    assert [f.payload for f in ends.received["client"]] == \
        [b"s" + i.to_bytes(4, "big") for i in range(count)]


# --------------------------------------------------------------------------------------------
# N12: who cannot get in
# --------------------------------------------------------------------------------------------
def _plaintext_client(address, key):
    return sockets.connect(*address, key, 5)


def _foreign_ca_client(address, key):
    ca, cert, private = _foreign_material()
    return sockets.connect(*address, key, 5, tls=Security(ca, cert, private).client_context())


def _foreign_certificate_client(address, key):
    """Trusts our CA (so it accepts the worker), but shows a certificate of another CA."""
    _ca, cert, private = _foreign_material()
    return sockets.connect(*address, key, 5,
                           tls=Security(_our_ca(), cert, private).client_context())


REJECTED = [
    pytest.param(_plaintext_client, "requires TLS", id="N12-plaintext-client",
                 marks=pytest.mark.fault("N12")),
    pytest.param(_foreign_ca_client, "TLS handshake failed", id="N12-foreign-ca",
                 marks=pytest.mark.fault("N12")),
    pytest.param(_foreign_certificate_client, "TLS", id="N12-foreign-client-certificate",
                 marks=pytest.mark.fault("N12")),
]


@pytest.mark.parametrize(("client", "message"), REJECTED)
def test_a_tls_worker_turns_away_the_client_and_keeps_serving(add_workers, client, message):
    (pid,) = add_workers(1, security=SECURITY)
    distexec.remotecall_fetch(count_preauth_unpickling, pid)
    started = time.monotonic()
    with pytest.raises(AuthenticationError, match=message):
        client(connect_at(pid), default_context().cookie.key)
    assert time.monotonic() - started < REJECT_BUDGET
    _assert_serves(pid)
    assert distexec.workers() == [pid]
    assert distexec.remotecall_fetch(preauth_unpickling_seen, pid) == (0, 0)


class _TLSServer:
    """An in-process TLS listener that counts what passed the handshake."""

    def __init__(self):
        self.key = secrets.token_bytes(32)
        self.authenticated: list = []
        self.listener = sockets.Listener(sockets.bind_listener("127.0.0.1", None, True),
                                         self.key, lambda s, _v: self.authenticated.append(s),
                                         tls=SECURITY.server_context())
        self.listener.start()

    def close(self) -> None:
        self.listener.close()
        for sock in self.authenticated:
            sock.close()


@pytest.mark.fault("N12")
@pytest.mark.parametrize("client", [_plaintext_client, _foreign_ca_client,
                                    _foreign_certificate_client],
                         ids=["plaintext", "foreign-ca", "foreign-certificate"])
def test_nothing_from_a_rejected_client_is_unpickled(client):
    server = _TLSServer()
    try:
        with UnpicklingCounter() as unpickling:
            started = time.monotonic()
            with pytest.raises(AuthenticationError):
                client(server.listener.address, server.key)
            assert time.monotonic() - started < REJECT_BUDGET
        assert unpickling.total == 0
        assert server.authenticated == []
        _assert_listener_serves(server)
    finally:
        server.close()


@pytest.mark.fault("N12")
def test_garbage_instead_of_a_client_hello_is_closed_at_once():
    server = _TLSServer()
    try:
        with UnpicklingCounter() as unpickling, \
                socket.create_connection(server.listener.address, timeout=5) as sock:
            assert _recv_exactly(sock, len(handshake.TLS_HELLO)) == handshake.TLS_HELLO
            started = time.monotonic()
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n" + os.urandom(512))
            sock.settimeout(REJECT_BUDGET)
            with contextlib.suppress(ConnectionResetError):  # a reset is a close too
                while sock.recv(4096):  # a TLS alert, then EOF
                    pass
            assert time.monotonic() - started < REJECT_BUDGET
        assert unpickling.total == 0
        assert server.authenticated == []
        _assert_listener_serves(server)
    finally:
        server.close()


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n and (chunk := sock.recv(n - len(data))):
        data += chunk
    return data


def _assert_listener_serves(server: _TLSServer) -> None:
    legit = sockets.connect(*server.listener.address, server.key, 5,
                            tls=SECURITY.client_context())
    legit.close()
    wait_until(lambda: server.authenticated, 5, message="the legitimate client")


@pytest.mark.fault("N12")
def test_a_tls_master_refuses_a_plaintext_worker_at_once(add_workers):
    (pid,) = add_workers(1)
    started = time.monotonic()
    with pytest.raises(AuthenticationError, match="does not use TLS"):
        sockets.connect(*connect_at(pid), default_context().cookie.key, 5,
                        tls=SECURITY.client_context())
    assert time.monotonic() - started < REJECT_BUDGET
    _assert_serves(pid)


# --------------------------------------------------------------------------------------------
# N12 / G10: require_encryption
# --------------------------------------------------------------------------------------------
@pytest.mark.fault("N12")
def test_require_encryption_refuses_plaintext_workers(empty_cluster):
    with pytest.raises(ValueError, match="needs TLS certificates"):
        distexec.addprocs(1, security=Security(require_encryption=True))
    assert distexec.procs() == [1]
    required = Security.temporary(require_encryption=True)
    pids = distexec.addprocs(1, security=required)
    try:
        with pytest.raises(DistributedError, match="requires encryption"):
            distexec.addprocs(1, security=Security())
        distexec.rmprocs(pids, waitfor=20)
        # With no workers left the master still requires it: a plain addprocs uses TLS ...
        pids = distexec.addprocs(1)
        assert _link_kind(pids[0]) == TLS
        # ... and plaintext is still refused.
        with pytest.raises(DistributedError, match="requires encryption"):
            distexec.addprocs(1, security=Security())
    finally:
        distexec.rmprocs([p for p in distexec.procs() if p != 1], waitfor=20)
    assert distexec.procs() == [1]


def test_workers_of_another_ca_or_plaintext_cannot_join_a_tls_cluster(add_workers):
    add_workers(1, security=SECURITY)
    for other in (Security.temporary(), Security()):
        with pytest.raises(DistributedError, match="another TLS configuration"):
            add_workers(1, security=other)
    assert len(distexec.workers()) == 1
    (later,) = add_workers(1)  # no security=: joins the cluster's configuration
    assert _link_kind(later) == TLS


# --------------------------------------------------------------------------------------------
# N14: where workers listen
# --------------------------------------------------------------------------------------------
def _listening(process: psutil.Process) -> list[str]:
    connections = getattr(process, "net_connections", process.connections)(kind="inet")
    return [c.laddr.ip for c in connections if c.status == psutil.CONN_LISTEN]


@pytest.mark.fault("N14")
def test_a_default_cluster_listens_on_loopback_only(add_workers):
    with warnings.catch_warnings():
        warnings.simplefilter("error", SecurityWarning)
        pids = add_workers(2)
    addresses = [ip for p in pids for ip in _listening(psutil.Process(os_pid(p)))]
    assert addresses and set(addresses) == {"127.0.0.1"}
    assert all(ip.startswith("127.") for ip in _listening(psutil.Process()))


@pytest.mark.fault("N14")
def test_listening_beyond_loopback_without_tls_warns(add_workers):
    with pytest.warns(SecurityWarning, match="beyond loopback, without TLS"):
        (pid,) = add_workers(1, restrict=False)
    assert _listening(psutil.Process(os_pid(pid))) == ["0.0.0.0"]


@pytest.mark.fault("N14")
def test_listening_beyond_loopback_with_tls_does_not_warn(add_workers):
    with warnings.catch_warnings():
        warnings.simplefilter("error", SecurityWarning)
        (pid,) = add_workers(1, restrict=False, security=SECURITY)
    assert _listening(psutil.Process(os_pid(pid))) == ["0.0.0.0"]
    _assert_serves(pid)


def test_the_key_is_on_no_command_line_and_in_no_environment(add_workers):
    pids = add_workers(2, security=SECURITY)
    key_body = SECURITY._key.splitlines()[1].encode()
    for pid in pids:
        process = psutil.Process(os_pid(pid))
        # a spawned worker's (distexec worker --tls) or its template's (forked workers)
        assert any("distexec" in arg for arg in process.cmdline())
        for name in ("cmdline", "environ"):
            with open(f"/proc/{process.pid}/{name}", "rb") as f:
                assert key_body not in f.read(), name
