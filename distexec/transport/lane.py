"""The task lane: executor tasks to a local worker, read by its main thread between tasks.

Owns the second link between the master and a worker it started on this host: a Unix
``SOCK_SEQPACKET`` socket pair made at launch, one end inherited by the worker. Imports
``distexec.errors``, ``distexec.protocol`` and ``transport.connection`` (its ``Frame``).

    master: executor ──► TaskLane.offer(frame) ── one datagram ──► worker's main thread,
            (small tasks only; a full lane or a large    (LaneReader.take, when its task is
             task: the connection, see executor)          done or while it idles)

Why a second link. A worker runs executor tasks one at a time on its main thread, and the
next task travels while the current one runs, so that the worker never waits a round trip
for work. Over the connection, that task's arrival wakes the worker's reader thread, which
must take the GIL from the main thread that computes: about 100 µs of the worker's CPU per
task on a virtual machine, and on a machine with as many busy workers as cores, that comes
out of the tasks. On the lane nobody waits: the task sits in the socket until the main
thread is done and reads it itself, as a ``ProcessPoolExecutor`` worker reads its call queue.

A datagram is all or nothing: a send that does not fit fails whole (``offer`` says False),
never leaving half a frame that only a blocking write could finish. Only the master and the
worker hold the pair (it is made by the master and inherited at launch, like the cookie's
pipe); the worker reads it only once its master connection is authenticated.
"""

from __future__ import annotations

import socket

from ..errors import ProtocolError
from ..protocol import frames
from ..protocol.frames import Flag, Header, Kind, RRID
from .connection import Frame

#: The largest message that takes the lane; larger ones (and any with out-of-band buffers,
#: which start at 64 KiB) take the connection. Small enough that the few a worker can have
#: waiting always fit the socket's buffer; large enough for any ordinary task.
LANE_MAX = 32 * 1024
_DONTWAIT = int(socket.MSG_DONTWAIT)


def lane_pair() -> tuple[socket.socket, socket.socket]:
    """``(master_end, worker_end)``; the worker's end is to be inherited by the worker."""
    master_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    worker_end.set_inheritable(True)
    return master_end, worker_end


class TaskLane:
    """The master's end: offers small in-order calls to the worker's main thread."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self.closed = False

    def offer(self, kind: Kind, payload: bytes, *, flags: Flag, notify: RRID) -> bool:
        """Send one message whole, without waiting; False when it must take the connection
        (too large, the lane full, or the worker gone: the connection then says so)."""
        if self.closed or len(payload) > LANE_MAX:
            return False
        head = frames.encode_header(kind, len(payload), (), flags=flags, notify=notify)
        try:
            self._sock.sendmsg([head, payload], [], _DONTWAIT)
        except OSError:  # EAGAIN (full), EPIPE (gone), closed meanwhile
            return False
        return True

    def close(self) -> None:
        self.closed = True
        self._sock.close()


class LaneReader:
    """The worker's end: one frame at a time, without blocking, on the main thread."""

    def __init__(self, fd: int):
        self._sock = socket.socket(fileno=fd)
        self._sock.set_inheritable(False)
        self._sock.setblocking(False)
        self.ended = False

    def fileno(self) -> int:
        return self._sock.fileno()

    def take(self) -> Frame | None:
        """The next frame if one is there, else None (also once the master's end closed)."""
        if self.ended:
            return None
        try:
            data = self._sock.recv(frames.HEADER.size + LANE_MAX + 1)
        except (BlockingIOError, InterruptedError):
            return None
        if not data:  # the master is gone: its connection's end says the rest
            self.ended = True
            return None
        return decode(data)

    def close(self) -> None:
        self.ended = True
        self._sock.close()


def decode(data: bytes) -> Frame:
    """A lane datagram as a frame; a malformed one is a ``ProtocolError``."""
    kind, flags, nbufs, response, notify, payload_len = frames.decode_fixed_header(
        data[:frames.HEADER.size])
    payload = data[frames.HEADER.size:]
    if nbufs or len(payload) != payload_len:
        raise ProtocolError("malformed message on the task lane")
    return Frame(Header(kind, flags, response, notify, payload_len, ()), payload, [])
