"""A pair of byte streams (pipes, a subprocess's stdin/stdout, ...) used like a socket.

Owns the adapter that lets custom cluster managers bring their own transport: anything with
``readinto``/``read`` on one side and ``write``/``flush`` on the other carries distexec frames
and the handshake exactly as a TCP socket does. Imports nothing from distexec.

Streams have no timeouts, so a deadline is enforced by closing them (``expire_after``).
"""

from __future__ import annotations

import socket
import threading


class StreamTransport:
    """The subset of the socket API that the handshake and ``Connection`` use."""

    family = None

    def __init__(self, reader, writer, name: str = "streams"):
        self.reader, self.writer, self.name = reader, writer, name
        self._closed = False
        self._close_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<StreamTransport {self.name}>"

    # reading ----------------------------------------------------------------------------------
    def recv_into(self, buffer) -> int:
        try:
            n = self.reader.readinto1(buffer) if hasattr(self.reader, "readinto1") \
                else self.reader.readinto(buffer)
        except ValueError:  # read from a closed file: the same as EOF
            return 0
        return n or 0

    def recv(self, n: int) -> bytes:
        buffer = bytearray(n)
        got = self.recv_into(memoryview(buffer))
        return bytes(buffer[:got])

    # writing ----------------------------------------------------------------------------------
    def sendall(self, data) -> None:
        try:
            self.writer.write(data)
            self.writer.flush()
        except ValueError as exc:  # closed file
            raise BrokenPipeError(str(exc)) from None

    def sendmsg(self, buffers) -> int:
        total = 0
        for view in buffers:
            self.sendall(view)
            total += memoryview(view).nbytes
        return total

    # lifetime -----------------------------------------------------------------------------------
    def settimeout(self, _timeout) -> None:
        """Streams cannot time out by themselves; see :func:`expire_after`."""

    def setsockopt(self, *args) -> None:
        pass

    def shutdown(self, _how=socket.SHUT_RDWR) -> None:
        self.close()

    def close(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        for stream in (self.writer, self.reader):
            try:
                stream.close()
            except (OSError, ValueError):
                pass


def as_transport(reader, writer):
    """A socket stays a socket; any other pair of streams becomes a :class:`StreamTransport`."""
    if reader is writer and isinstance(reader, socket.socket):
        return reader
    return StreamTransport(reader, writer)


def expire_after(transport, timeout: float) -> threading.Timer:
    """Close ``transport`` after ``timeout`` seconds unless the returned timer is cancelled."""
    timer = threading.Timer(timeout, transport.close)
    timer.daemon = True
    timer.start()
    return timer
