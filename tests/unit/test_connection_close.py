"""A connection that dies in the middle of a large frame frees the part it received.

The peer resets the connection (``SO_LINGER`` 0: an RST, as when a worker is killed with
unread bytes queued) after sending part of a 256 MiB frame. The reader reports the reset
as the connection's error; keeping that error (a dead worker's record does) must not keep the
partial frame alive (spec/faults.md W8: the master releases the partial buffer).
"""

from __future__ import annotations

import gc
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


def test_a_reset_mid_frame_frees_the_partial_frame_even_while_its_error_is_kept():
    listener = socket.create_server(("127.0.0.1", 0))
    peer = socket.create_connection(listener.getsockname())
    ours, _ = listener.accept()
    listener.close()
    errors: list[BaseException | None] = []
    closed = threading.Event()

    def on_close(conn, error):
        errors.append(error)
        closed.set()

    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        conn = Connection(ours, on_frame=lambda conn, frame: None, on_close=on_close,
                          max_message_size=1 << 40)
        conn.start()
        head = frames.encode_header(Kind.RESULT, FRAME, [], max_message_size=1 << 40)
        peer.sendall(head)
        chunk = bytes(1 << 20)
        for _ in range(SENT // len(chunk)):
            peer.sendall(chunk)
        # Unread bytes at our side are not needed for an RST: SO_LINGER 0 forces one.
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()
        assert closed.wait(10), "the reader did not report the reset"
        conn.join(10)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - baseline
    finally:
        tracemalloc.stop()
    assert isinstance(errors[0], ConnectionResetError)  # the reset is reported, and kept here
    assert held < 16 << 20, f"{held >> 20} MiB still held after the connection died"
