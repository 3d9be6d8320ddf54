"""Misbehaving peers that passed the handshake (spec/faults.md N11).

There are no per-frame MACs: once a peer has proved it knows the cookie, its connection is
trusted -- the design assumes a trusted network after authentication, with TLS for networks
that are not (docs/security.md). So the "bad frame MAC" half of N11 becomes a bad frame
*header*, which the receiver can check without trusting anything: an unknown kind, a length
over ``max_message_size``, too many buffers. What must hold:

* an identified worker that sends half a frame and stalls is caught by the heartbeat: its
  connection closes after ``DISTEXEC_HEARTBEAT_TIMEOUT``, its callers get
  ``ProcessExitedException``, the other workers are unaffected;
* an identified worker that sends a bad frame header is dropped at once, with the same
  outcome;
* an authenticated connection that never identifies itself (no JOIN, no IDENTIFY: silent, half
  a frame, only PINGs) is closed, and logged, at the handshake deadline
  (``DISTEXEC_HANDSHAKE_TIMEOUT``); a bad header on it closes it at once. The worker keeps
  serving and its file descriptors return to their count before.
"""

from __future__ import annotations

import socket
import threading
import time

import psutil
import pytest

import distexec
from distexec import ProcessExitedException
from distexec.protocol.frames import HEADER, Kind, encode_header
from distexec.runtime.context import default_context
from distexec.transport import sockets
from tests.faults.catalogue import T_DET
from tests.faults.helpers import connect_at, sleep_marked, wait_until_running
from tests.helpers import os_pid, wait_for_output, wait_until

pytestmark = pytest.mark.timeout(60)

HEARTBEAT_TIMEOUT = 2.0
HANDSHAKE_TIMEOUT = 1.0
SLACK = 0.5
"""``T_hs`` ± this: when an unidentified connection must be closed (spec/faults.md G7)."""


@pytest.fixture
def short_deadlines(monkeypatch):
    """Set before the workers start, so they inherit them."""
    monkeypatch.setenv("DISTEXEC_HEARTBEAT_TIMEOUT", str(HEARTBEAT_TIMEOUT))
    monkeypatch.setenv("DISTEXEC_HEARTBEAT_INTERVAL", "0.25")
    monkeypatch.setenv("DISTEXEC_HANDSHAKE_TIMEOUT", str(HANDSHAKE_TIMEOUT))


def _bad_header(kind=Kind.RESULT, nbufs=0, length=0) -> bytes:
    return HEADER.pack(kind, 0, nbufs, 0, 0, 0, 0, 0, length)


HALF_HEADER = encode_header(Kind.RESULT, 100)[:HEADER.size // 2]
HEADER_AND_HALF_PAYLOAD = encode_header(Kind.RESULT, 100) + b"\x80" * 50
BAD_KIND = _bad_header(kind=200)
HUGE_LENGTH = _bad_header(length=2**64 - 1)
TOO_MANY_BUFFERS = _bad_header(nbufs=65535)


# --------------------------------------------------------------------------------------------
# An identified worker misbehaves on its link to the master
# --------------------------------------------------------------------------------------------
def _write_to_master(data: bytes, stall: bool) -> None:
    """Runs on a worker: write raw bytes on its link to the master, then hold it if ``stall``.

    The bytes go out under the link's send lock, as a frame would, so nothing interleaves;
    holding the lock afterwards stops every later frame, heartbeats included, mid-frame.
    """
    from distexec.runtime.context import current_context
    conn = current_context().record(1).conn
    with conn._send_lock:
        conn.sock.sendall(data)
        if stall:
            threading.Event().wait()


# (bytes, stall, budget from the injection to the callers' exception, words in the reason)
MASTER_LINK_CASES = [
    pytest.param(HALF_HEADER, True, HEARTBEAT_TIMEOUT + 1.0, "heartbeat",
                 id="half-header-then-stall", marks=pytest.mark.fault("N11")),
    pytest.param(HEADER_AND_HALF_PAYLOAD, True, HEARTBEAT_TIMEOUT + 1.0, "heartbeat",
                 id="half-payload-then-stall", marks=pytest.mark.fault("N11")),
    pytest.param(BAD_KIND, False, T_DET, "unknown message kind 200",
                 id="bad-kind", marks=pytest.mark.fault("N11")),
    pytest.param(HUGE_LENGTH, False, T_DET, "max_message_size",
                 id="huge-length", marks=pytest.mark.fault("N11")),
    pytest.param(TOO_MANY_BUFFERS, False, T_DET, "65535 buffers",
                 id="too-many-buffers", marks=pytest.mark.fault("N11")),
]


@pytest.mark.parametrize("data, stall, budget, reason", MASTER_LINK_CASES)
def test_a_misbehaving_worker_fails_only_its_own_callers(short_deadlines, add_workers, data,
                                                         stall, budget, reason):
    bad, good = add_workers(2)
    running = distexec.remotecall(sleep_marked, bad, "n11_running", 30)
    wait_until_running(bad, "n11_running")
    survivor = distexec.remotecall(lambda: time.sleep(budget) or "survived", good)

    injected_at = time.monotonic()
    injecting = distexec.remotecall(_write_to_master, bad, data, stall)
    for future in (running, injecting):
        exc = future.exception(timeout=budget + 5)
        assert isinstance(exc, ProcessExitedException), repr(exc)
        assert exc.worker_id == bad
        assert reason in str(exc)
    assert time.monotonic() - injected_at <= budget

    assert survivor.fetch(timeout=10) == "survived"
    wait_until(lambda: bad not in distexec.workers(), 5, message=f"worker {bad} to be removed")
    assert distexec.workers() == [good]
    assert distexec.remotecall_fetch(lambda xs: [2 * x for x in xs], good, range(100)) == [
        2 * x for x in range(100)]
    with pytest.raises(ProcessExitedException):
        distexec.remotecall_fetch(lambda: 1, bad)


# --------------------------------------------------------------------------------------------
# An authenticated connection that never identifies itself
# --------------------------------------------------------------------------------------------
def _send(data: bytes):
    def send(sock: socket.socket) -> None:
        sock.sendall(data)
    return send


def _ping_until_closed(sock: socket.socket) -> None:
    """Keep the connection busy with PINGs (ignored before identification) on a thread."""
    ping = encode_header(Kind.PING, 0)
    done = threading.Event()

    def loop():
        while not done.wait(0.1):
            try:
                sock.sendall(ping)
            except OSError:
                return

    threading.Thread(target=loop, daemon=True, name="n11-pinger").start()


AT_THE_DEADLINE = (HANDSHAKE_TIMEOUT - SLACK, HANDSHAKE_TIMEOUT + SLACK)
AT_ONCE = (0.0, SLACK)
DEADLINE_LOG = f"did not identify itself within {HANDSHAKE_TIMEOUT:.1f} seconds"

# (what the peer does once authenticated, when it must be closed, what the worker logs)
UNIDENTIFIED_CASES = [
    pytest.param(_send(b""), AT_THE_DEADLINE, DEADLINE_LOG, id="silent",
                 marks=pytest.mark.fault("N11")),
    pytest.param(_send(HALF_HEADER), AT_THE_DEADLINE, DEADLINE_LOG, id="half-header",
                 marks=pytest.mark.fault("N11")),
    pytest.param(_send(encode_header(Kind.IDENTIFY, 100) + b"\x80" * 50), AT_THE_DEADLINE,
                 DEADLINE_LOG, id="identify-with-half-payload", marks=pytest.mark.fault("N11")),
    pytest.param(_ping_until_closed, AT_THE_DEADLINE, DEADLINE_LOG, id="pings-only",
                 marks=pytest.mark.fault("N11")),
    pytest.param(_send(BAD_KIND), AT_ONCE, "unknown message kind 200", id="bad-kind",
                 marks=pytest.mark.fault("N11")),
    pytest.param(_send(HUGE_LENGTH), AT_ONCE, "max_message_size", id="huge-length",
                 marks=pytest.mark.fault("N11")),
]


def _read_until_closed(sock: socket.socket, timeout: float) -> None:
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass


@pytest.mark.parametrize("behave, window, logged", UNIDENTIFIED_CASES)
def test_an_unidentified_connection_is_closed(short_deadlines, add_workers, capfd, behave,
                                              window, logged):
    (pid,) = add_workers(1)
    worker = psutil.Process(os_pid(pid))
    fds_before = worker.num_fds()

    sock = sockets.connect(*connect_at(pid), default_context().cookie.key, timeout=5)
    authenticated_at = time.monotonic()
    with sock:
        behave(sock)
        _read_until_closed(sock, timeout=HANDSHAKE_TIMEOUT + 10)
        closed_after = time.monotonic() - authenticated_at
    assert window[0] <= closed_after <= window[1], f"closed after {closed_after:.2f} s"

    wait_for_output(capfd, f"From worker {pid}:", logged, stream="err")  # a log record
    wait_until(lambda: worker.num_fds() <= fds_before, 10,
               message="the worker's file descriptors to return to their count before")
    assert distexec.workers() == [pid]
    assert distexec.remotecall_fetch(lambda: 6 * 7, pid) == 42


def test_links_that_identify_are_kept_past_the_deadline(short_deadlines, add_workers):
    """The deadline closes only connections that never said who they are."""
    first, second = add_workers(2)
    link = distexec.remotecall_fetch(_open_link_and_wait, second, first, 3 * HANDSHAKE_TIMEOUT)
    assert link == "still open"


def _open_link_and_wait(pid: int, seconds: float) -> str:
    """Runs on a worker: open the link to ``pid``, outlive the handshake deadline, use it."""
    from distexec.runtime.context import current_context
    distexec.remotecall_fetch(distexec.myid, pid)
    conn = current_context().record(pid).conn
    time.sleep(seconds)  # the scenario itself: the link idles past the deadline
    distexec.remotecall_fetch(distexec.myid, pid)
    return "still open" if current_context().record(pid).conn is conn else "reopened"
