"""What an unauthenticated connection may cost the acceptor (spec/faults.md G7; N4, N5).

However much a stranger sends -- megabytes of junk, a huge length, a frame straight after the
HELLO -- the acceptor reads at most 4 KiB from it (in fact at most one REPLY, 74 bytes) and
allocates at most 64 KiB for it, measured with ``tracemalloc`` around an in-process
:class:`~distexec.transport.sockets.Listener`. Connections that stall are closed at their own
handshake deadline (``T_hs`` ± 0.5 s), and while 100 of them stall, legitimate clients still
authenticate within 1 s (p99 of 20). ``tests/faults/test_network.py`` checks the exact bytes
read for garbage and oversized lengths, one stalled burst and the pre-auth cap.
"""

from __future__ import annotations

import math
import os
import secrets
import socket
import struct
import threading
import time
import tracemalloc

import pytest

from distexec.protocol import handshake
from distexec.protocol.frames import HEADER, Kind
from distexec.transport import sockets
from tests.faults.helpers import UnpicklingCounter, counting_listen_socket, stall_handshake
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(60)

KEY = secrets.token_bytes(32)
READ_LIMIT = 4 * 1024
ALLOCATION_LIMIT = 64 * 1024
JUNK = os.urandom(4 * 1024 * 1024)


class _Server:
    """An in-process listener that records the sockets it authenticated."""

    def __init__(self, **options):
        self.sock = counting_listen_socket()
        self.authenticated: list[socket.socket] = []
        self.listener = sockets.Listener(self.sock, KEY, lambda s, _v: self.authenticated.append(s),
                                         **options)
        self.listener.start()
        self.address = self.listener.address

    def close(self) -> None:
        self.listener.close()
        for sock in self.authenticated:
            sock.close()


@pytest.fixture
def server():
    made: list[_Server] = []

    def make(**options) -> _Server:
        made.append(_Server(**options))
        return made[-1]

    yield make
    for srv in made:
        srv.close()


def _read_until_closed(sock: socket.socket, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass
    return data


# --------------------------------------------------------------------------------------------
# Bytes read and memory allocated, whatever a stranger sends
# --------------------------------------------------------------------------------------------
def _frame_header(length: int) -> bytes:
    return HEADER.pack(Kind.CALL, 0, 0, 0, 0, 0, 1, 1, length)


# (what is sent after reading the HELLO, fault rows)
FLOODS = [
    pytest.param(JUNK, id="4MiB-junk", marks=pytest.mark.fault("N2")),
    pytest.param(handshake.MAGIC + JUNK, id="magic-then-4MiB", marks=pytest.mark.fault("N2")),
    pytest.param(handshake.MAGIC + struct.pack(">Q", 2**63) + JUNK, id="huge-length-2**63",
                 marks=pytest.mark.fault("N5")),
    pytest.param(handshake.MAGIC + struct.pack(">Q", 2**31 - 1) + JUNK, id="huge-length-2**31",
                 marks=pytest.mark.fault("N5")),
    pytest.param(_frame_header(2**63) + JUNK, id="frame-claiming-2**63-after-hello",
                 marks=pytest.mark.fault("N5")),
]


def _flood(address, data: bytes) -> None:
    """Connect, read the HELLO, send ``data`` (the server may close meanwhile), await the close."""
    with socket.create_connection(address, timeout=5) as sock:
        sock.recv(handshake.HELLO_SIZE)
        try:
            sock.sendall(data)
        except OSError:
            pass  # rejected before it took everything: the point
        _read_until_closed(sock)


@pytest.mark.parametrize("data", FLOODS)
def test_a_flood_costs_at_most_4KiB_read_and_64KiB_allocated(server, data):
    srv = server()
    _flood(srv.address, data)  # warm-up: first-use caches (logging, codecs) are not per connection
    connections = 5
    with UnpicklingCounter() as unpickling:
        tracemalloc.start()
        try:
            baseline = tracemalloc.get_traced_memory()[0]
            worst = 0
            for _ in range(connections):
                tracemalloc.reset_peak()
                _flood(srv.address, data)
                worst = max(worst, tracemalloc.get_traced_memory()[1] - baseline)
        finally:
            tracemalloc.stop()
    assert worst <= ALLOCATION_LIMIT, f"{worst} bytes allocated for one connection"
    assert len(srv.sock.accepted) == connections + 1
    assert all(s.bytes_read <= READ_LIMIT for s in srv.sock.accepted)
    assert not srv.authenticated
    assert unpickling.total == 0


@pytest.mark.fault("N4")
def test_stalled_connections_hold_at_most_64KiB_each(server):
    srv = server(handshake_timeout=5.0)
    stalled = 50
    socks = []
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        for _ in range(stalled):
            sock = socket.create_connection(srv.address, timeout=5)
            sock.recv(handshake.HELLO_SIZE)
            sock.sendall(handshake.MAGIC + b"\x00")
            socks.append(sock)
        # Held while they stall: each waits in its handshake thread for the rest of its REPLY.
        wait_until(lambda: sum(s.bytes_read for s in srv.sock.accepted)
                   == stalled * (len(handshake.MAGIC) + 1), 5,
                   message="every stalled connection to be waiting in its handshake")
        held = tracemalloc.get_traced_memory()[0] - baseline
    finally:
        tracemalloc.stop()
        for sock in socks:
            sock.close()
    assert held / stalled <= ALLOCATION_LIMIT, f"{held / stalled:.0f} bytes held per connection"


# --------------------------------------------------------------------------------------------
# Deadlines under load: 100 stalled connections, 20 legitimate clients
# --------------------------------------------------------------------------------------------
@pytest.mark.fault("N4")
def test_legitimate_clients_get_through_100_stalled_ones_and_they_close_on_time(server):
    deadline = 3.0
    srv = server(handshake_timeout=deadline)
    stalled: list[tuple[socket.socket, float]] = []
    try:
        for _ in range(100):
            stalled.append((stall_handshake(srv.address), time.monotonic()))
        latencies = []
        for _ in range(20):
            started = time.monotonic()
            sockets.connect(*srv.address, KEY, timeout=5).close()
            latencies.append(time.monotonic() - started)
        p99 = sorted(latencies)[math.ceil(0.99 * len(latencies)) - 1]
        assert p99 <= 1.0, f"legitimate handshakes took {sorted(latencies)}"
        closed_after = _close_times(stalled)
    finally:
        for sock, _ in stalled:
            sock.close()
    late = [t for t in closed_after if not deadline - 0.5 <= t <= deadline + 0.5]
    assert not late, f"stalled connections closed after {late} s, deadline {deadline} s"
    wait_until(lambda: len(srv.authenticated) == 20, 5)


def _close_times(stalled) -> list[float]:
    """For each stalled socket, seconds from its connect to the server's close, read in parallel
    (reading them one after another would add each wait to the next one's measurement)."""
    times = [math.inf] * len(stalled)

    def watch(i: int, sock: socket.socket, since: float) -> None:
        if _read_until_closed(sock, timeout=10) == b"":
            times[i] = time.monotonic() - since

    watchers = [threading.Thread(target=watch, args=(i, s, t), daemon=True)
                for i, (s, t) in enumerate(stalled)]
    for w in watchers:
        w.start()
    for w in watchers:
        w.join(15)
    return times
