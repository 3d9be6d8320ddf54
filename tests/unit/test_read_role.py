"""The read role of a connection: a waiting thread may read its own frames (read_until).

One real TCP connection on loopback per test; the far end is a raw socket that writes frames
as a peer would. Whoever reads, frames are dispatched once each and in order, and the reader
thread alone reports the end of the connection.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

import pytest

from distexec.protocol import frames
from distexec.protocol.frames import Kind
from distexec.transport.connection import Connection
from distexec.transport.streams import StreamTransport

pytestmark = pytest.mark.timeout(30)


def _frame(n: int, size: int = 8) -> bytes:
    payload = n.to_bytes(8, "little") + bytes(max(0, size - 8))
    return frames.encode_header(Kind.RESULT, len(payload)) + payload


class _Peer:
    """A Connection on one end of a loopback TCP connection, and the raw socket at the other."""

    def __init__(self, **kwargs):
        listener = socket.create_server(("127.0.0.1", 0))
        self.raw = socket.create_connection(listener.getsockname())
        ours, _ = listener.accept()
        listener.close()
        self.received: list[tuple[int, str]] = []  # (frame number, thread that dispatched it)
        self.seen = threading.Condition()
        self.closes: list[BaseException | None] = []
        self.closed = threading.Event()
        self.conn = Connection(ours, on_frame=self._on_frame, on_close=self._on_close, **kwargs)
        self.conn.start()

    def _on_frame(self, conn, frame):
        with self.seen:
            self.received.append((int.from_bytes(frame.payload[:8], "little"),
                                  threading.current_thread().name))
            self.seen.notify_all()

    def _on_close(self, conn, error):
        self.closes.append(error)
        self.closed.set()

    def count(self) -> int:
        with self.seen:
            return len(self.received)

    def wait_for(self, n: int, timeout: float = 10) -> None:
        with self.seen:
            assert self.seen.wait_for(lambda: len(self.received) >= n, timeout), \
                f"{len(self.received)} of {n} frames arrived"

    def finish(self) -> None:
        self.raw.close()
        assert self.closed.wait(10), "the reader thread did not report the close"
        self.conn.join(10)


@pytest.fixture
def peer():
    p = _Peer()
    yield p
    p.finish()


def test_a_waiting_thread_reads_its_own_frame_on_its_own_thread(peer):
    peer.raw.sendall(_frame(0))
    peer.wait_for(1)  # read by the reader thread: nobody waited
    threading.Timer(0.05, peer.raw.sendall, args=(_frame(1),)).start()
    assert peer.conn.read_until(lambda: peer.count() >= 2)
    assert peer.received[0] == (0, "distexec-reader-peer")
    assert peer.received[1] == (1, threading.current_thread().name)


def test_frames_are_dispatched_once_each_and_in_order_whoever_reads(peer):
    total = 3000

    def send_all():
        for k in range(0, total, 50):
            peer.raw.sendall(b"".join(_frame(n, 8 + (n % 7) * 300) for n in range(k, k + 50)))

    sender = threading.Thread(target=send_all)
    sender.start()
    # Waiting threads take the role and give it back again and again while frames stream in.
    for target in range(100, total + 1, 100):
        peer.conn.read_until(lambda: peer.count() >= target, spin=0.0)
    sender.join(10)
    peer.wait_for(total)
    numbers = [n for n, _ in peer.received]
    assert numbers == list(range(total))
    readers = {name for _, name in peer.received}
    assert threading.current_thread().name in readers


def test_a_second_waiting_thread_waits_its_own_way(peer):
    inside = threading.Event()
    release = threading.Event()
    results = []

    def first():
        results.append(peer.conn.read_until(lambda: inside.set() or release.is_set()))

    t = threading.Thread(target=first)
    t.start()
    assert inside.wait(10)
    assert peer.conn.read_until(lambda: False) is False  # one thread reads at a time
    release.set()
    peer.conn.poke()  # done() changed without a frame: the reading thread looks up
    t.join(10)
    assert results == [True]


def test_read_until_returns_after_its_timeout_when_nothing_comes(peer):
    started = time.monotonic()
    assert peer.conn.read_until(lambda: False, timeout=0.2, spin=0.0001)
    assert 0.15 <= time.monotonic() - started < 5
    peer.raw.sendall(_frame(7))
    peer.wait_for(1)  # the reader thread reads again once the waiting thread has gone
    assert peer.received == [(7, "distexec-reader-peer")]


def test_the_end_met_by_a_waiting_thread_is_reported_once_by_the_reader_thread(peer):
    threading.Timer(0.05, peer.raw.close).start()
    assert peer.conn.read_until(lambda: peer.closed.is_set())
    assert peer.closed.wait(10)
    peer.conn.join(10)
    assert peer.closes == [None]  # a clean EOF
    assert not peer.conn.can_read_here
    assert peer.conn.read_until(lambda: False) is False


def test_a_reset_met_by_a_waiting_thread_is_the_connection_error(peer):
    def reset():
        peer.raw.sendall(frames.encode_header(Kind.RESULT, 1 << 20) + bytes(1000))
        peer.raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.raw.close()

    threading.Timer(0.05, reset).start()
    peer.conn.read_until(lambda: peer.closed.is_set())
    assert peer.closed.wait(10)
    peer.conn.join(10)
    assert len(peer.closes) == 1 and isinstance(peer.closes[0], ConnectionResetError)
    assert peer.closes[0].__traceback__ is None  # keeps no frames (spec/faults.md W8)


def test_closing_the_connection_ends_a_blocked_waiting_thread(peer):
    closer = threading.Timer(0.1, peer.conn.close)
    closer.start()
    assert peer.conn.read_until(lambda: False, spin=0.0)
    closer.join()
    assert peer.closed.wait(10)
    peer.conn.join(10)
    assert peer.closes == [None]


def test_the_wake_fd_is_closed_with_the_connection(peer):
    fds_before = set(os.listdir("/proc/self/fd"))
    peer.finish()
    # the raw far end; ours: the socket, its wake fd, and where the reader thread stands
    # aside (an eventfd and an alarm)
    assert len(fds_before - set(os.listdir("/proc/self/fd"))) == 5


def _when_asleep(thread: threading.Thread, deadline_s: float = 10) -> int:
    """Once ``thread`` sleeps: how many times it has gone to sleep so far."""
    deadline = time.monotonic() + deadline_s
    task = f"/proc/self/task/{thread.native_id}"
    while True:
        with open(f"{task}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        if state == "S":
            with open(f"{task}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        return int(line.split()[1])
        assert time.monotonic() < deadline, f"the thread does not go to sleep ({state})"
        time.sleep(0.001)


def test_a_waiting_thread_back_before_the_linger_ends_wakes_nobody(peer, monkeypatch):
    # Reply after reply, the reader thread stands aside the whole time: a waiting thread
    # that leaves and comes back within the linger does not wake it to find that out (it
    # did: about two wake-ups of the reader thread per millisecond of calls).
    from distexec.transport import connection
    monkeypatch.setattr(connection, "LINGER_SECONDS", 5.0)  # far longer than the test takes
    first = threading.Thread(target=peer.conn.read_until, args=(lambda: peer.count() >= 1,),
                             kwargs={"spin": 0.0})
    first.start()
    deadline = time.monotonic() + 10
    while not peer.conn._parked:  # the reader thread gave the role up and stands aside
        assert time.monotonic() < deadline, "the reader thread does not stand aside"
        time.sleep(0.001)
    reader = peer.conn.reader_thread
    before = _when_asleep(reader)
    peer.raw.sendall(_frame(0))
    first.join(10)
    for n in range(1, 201):
        peer.raw.sendall(_frame(n))
        assert peer.conn.read_until(lambda: peer.count() > n, spin=0.0)
    assert _when_asleep(reader) == before
    assert "distexec-reader-peer" not in {name for _, name in peer.received}


def test_a_waiting_thread_that_stays_away_leaves_the_reading_to_the_reader_thread(peer):
    peer.raw.sendall(_frame(0))
    assert peer.conn.read_until(lambda: peer.count() >= 1)
    peer.raw.sendall(_frame(1))  # nobody waits for it: read once the linger is over
    peer.wait_for(2)
    assert peer.received[1] == (1, "distexec-reader-peer")


def test_waits_for_frames_that_come_late_do_not_poll(peer):
    # Polling pays only when the frame is near: after a few waits of 20 ms, a waiting
    # thread blocks at once instead of burning the CPU for the polling limit each time.
    cpu = []
    for n in range(12):
        threading.Timer(0.02, peer.raw.sendall, args=(_frame(n),)).start()
        started = time.thread_time()
        assert peer.conn.read_until(lambda: peer.count() > n)
        cpu.append(time.thread_time() - started)
    assert sum(cpu[4:]) < 0.004, cpu  # 8 waits: well under one polling limit (1 ms) each


def test_the_polling_window_follows_the_waits_it_sees():
    from distexec.transport.connection import _Spinner
    limit = 0.001
    spinner = _Spinner()
    assert spinner.window(limit) == limit  # nothing learnt yet
    for _ in range(40):
        spinner.waited(100e-6, limit)
    assert spinner.window(limit) == pytest.approx(200e-6)  # twice the typical wait
    assert spinner.window(0.0) == 0.0  # DISTEXEC_SPIN_US=0
    for _ in range(20):
        spinner.waited(60.0, limit)  # an idle worker, long calls
    assert spinner.window(limit) == 0.0
    for _ in range(20):
        spinner.waited(50e-6, limit)
    assert 0 < spinner.window(limit) < limit  # short waits again: it polls again


def test_stream_transports_keep_to_the_reader_thread():
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    with open(r1, "rb", buffering=0) as reader, open(w2, "wb", buffering=0) as writer:
        conn = Connection(StreamTransport(reader, writer), on_frame=lambda c, f: None,
                          on_close=lambda c, e: None)
        assert not conn.can_read_here
        assert conn.read_until(lambda: False) is False
    os.close(w1)
    os.close(r2)
