"""A connection that dies in the middle of a large frame frees the part it received.

The peer resets the connection (``SO_LINGER`` 0: an RST, as when a worker is killed with
unread bytes queued) or closes it (EOF) after sending part of a 256 MiB frame. The reader
reports the reset as the connection's error; keeping that error (a dead worker's record does)
or the connection must not keep the partial frame alive (spec/faults.md W8: the master
releases the partial buffer) -- whether the reader thread or a waiting thread (``read_until``)
was reading the frame.
"""

from __future__ import annotations

import gc
import queue
import socket
import struct
import threading
import tracemalloc

import pytest

from distexec.protocol import frames
from distexec.protocol.frames import Kind
from distexec.transport.connection import Connection

pytestmark = pytest.mark.timeout(30)

FRAME = 256 << 20
SENT = 64 << 20


@pytest.mark.parametrize("reader", ["reader thread", "waiting thread"])
@pytest.mark.parametrize("end", ["reset", "eof"])
def test_a_connection_ending_mid_frame_frees_the_partial_frame_even_while_kept(reader, end):
    listener = socket.create_server(("127.0.0.1", 0))
    peer = socket.create_connection(listener.getsockname())
    ours, _ = listener.accept()
    listener.close()
    errors: list[BaseException | None] = []
    closed = threading.Event()
    dispatched = queue.Queue()

    def on_close(conn, error):
        errors.append(error)
        closed.set()

    def on_frame(conn, frame):
        dispatched.put(threading.current_thread().name)

    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        conn = Connection(ours, on_frame=on_frame, on_close=on_close, max_message_size=1 << 40)
        conn.start()
        if reader == "waiting thread":
            waiting = threading.Thread(target=conn.read_until, args=(closed.is_set,),
                                       name="waiting")
            waiting.start()
            for _ in range(100):  # small frames until the waiting thread is the one reading
                peer.sendall(frames.encode_header(Kind.PING, 0))
                if dispatched.get(timeout=10) == "waiting":
                    break
            else:
                raise AssertionError("the waiting thread never took the read role")
        head = frames.encode_header(Kind.RESULT, FRAME, [], max_message_size=1 << 40)
        peer.sendall(head)
        chunk = bytes(1 << 20)
        for _ in range(SENT // len(chunk)):
            peer.sendall(chunk)
        if end == "reset":  # unread bytes at our side are not needed: SO_LINGER 0 forces one
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()
        assert closed.wait(10), "the reader did not report the end"
        if reader == "waiting thread":
            waiting.join(10)
        conn.join(10)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - baseline
    finally:
        tracemalloc.stop()
    if end == "reset":
        assert isinstance(errors[0], ConnectionResetError)  # reported, and kept here
    else:
        assert errors == [None]  # a peer that closed: no error
    assert held < 16 << 20, f"{held >> 20} MiB still held after the connection died"
