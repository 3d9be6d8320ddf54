"""One authenticated connection: framed sends under a lock, one reader thread.

Owns the socket of an authenticated peer. Imports ``distexec.errors`` and ``distexec.protocol``.

    sender threads ──► send(): header+payload+buffers ──► one sendmsg (under the send lock)
                                                  (TLS: an ``ssl.SSLSocket`` is wrapped in a
                                                   ``tls.TLSChannel``, which emulates sendmsg)
    socket ──► reader thread ──► Frame(header, payload, buffers) ──► on_frame(conn, frame)
                                  └─ EOF / error ──► on_close(conn, error)   (exactly once)

The reader thread only decodes frames and hands them on; it never runs user code (the runtime
decides what runs inline and what goes to a call thread). Small frames are read through one
reusable buffer; large payloads and out-of-band buffers are received straight into their own
preallocated memory.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from typing import Callable, NamedTuple

from ..protocol import frames
from ..protocol.frames import Flag, Header, Kind, RRID, NULL_RRID
from .buffers import ReceiveBuffers
from .tls import TLSChannel

log = logging.getLogger("distexec.transport")

_READ_BUFFER = 256 * 1024
_IOV_MAX = 512


class Frame(NamedTuple):
    header: Header
    payload: bytes | bytearray
    buffers: list[bytearray]


class _BufferedReader:
    """Exact-size reads from a socket through one reusable buffer."""

    def __init__(self, sock: socket.socket | TLSChannel, conn: "Connection | None" = None):
        self._sock = sock
        self._conn = conn
        self._buf = bytearray(_READ_BUFFER)
        self._view = memoryview(self._buf)
        self._start = self._end = 0

    def _fill(self, need: int) -> None:
        if self._start == self._end:
            self._start = self._end = 0
        elif len(self._buf) - self._start < need:
            size = self._end - self._start
            self._view[:size] = self._view[self._start:self._end]
            self._start, self._end = 0, size
        n = self._sock.recv_into(self._view[self._end:])
        if n == 0:
            raise EOFError("connection closed by peer")
        self._heard()
        self._end += n

    def _heard(self) -> None:
        if self._conn is not None:  # any bytes, even part of a long frame, show the peer lives
            self._conn.last_received = time.monotonic()

    def read(self, n: int) -> bytes:
        while self._end - self._start < n:
            self._fill(n)
        out = bytes(self._view[self._start:self._start + n])
        self._start += n
        return out

    def readinto(self, target: memoryview) -> None:
        got = min(len(target), self._end - self._start)
        target[:got] = self._view[self._start:self._start + got]
        self._start += got
        while got < len(target):
            n = self._sock.recv_into(target[got:])
            if n == 0:
                raise EOFError("connection closed by peer")
            self._heard()
            got += n

    def read_large(self, n: int) -> bytes | bytearray:
        if n <= len(self._buf) // 2:
            return self.read(n)
        out = bytearray(n)
        self.readinto(memoryview(out))
        return out


class Connection:
    """A framed, full-duplex connection to one authenticated peer."""

    def __init__(self, sock: socket.socket, *, on_frame: Callable[["Connection", Frame], None],
                 on_close: Callable[["Connection", BaseException | None], None],
                 name: str = "peer", max_message_size: int | None = None):
        stream: socket.socket | TLSChannel = sock
        if isinstance(sock, ssl.SSLSocket):  # OpenSSL allows one thread at a time: see tls.py
            stream = TLSChannel(sock)
        if stream.family in (socket.AF_INET, socket.AF_INET6):
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stream.settimeout(None)
        self.sock = stream
        self.name = name
        self.peer_pid: int | None = None
        self.max_message_size = (frames.configured_max_message_size() if max_message_size is None
                                 else max_message_size)
        self._on_frame = on_frame
        self._on_close = on_close
        self._send_lock = threading.Lock()
        self._closed = threading.Event()
        self._buffers = ReceiveBuffers()  # large receive buffers, reused (see buffers.py)
        self._reader: threading.Thread | None = None
        self.last_received = time.monotonic()  # for heartbeats (runtime.heartbeat)

    def __repr__(self) -> str:
        return f"<Connection {self.name} pid={self.peer_pid}{' closed' if self.closed else ''}>"

    @property
    def reader_thread(self) -> threading.Thread | None:
        """The thread reading this connection (None before ``start``)."""
        return self._reader

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def start(self) -> None:
        self._reader = threading.Thread(target=self._read_loop, name=f"distexec-reader-{self.name}",
                                        daemon=True)
        self._reader.start()

    def send(self, kind: Kind, payload: bytes = b"", buffers=(), *, flags: Flag = Flag.NONE,
             response: RRID = NULL_RRID, notify: RRID = NULL_RRID) -> None:
        """Write one message atomically. Raises ``ConnectionError`` if the peer is gone."""
        lens = [memoryview(b).nbytes for b in buffers]
        head = frames.encode_header(kind, len(payload), lens, flags=flags, response=response,
                                    notify=notify, max_message_size=self.max_message_size)
        parts = [head, payload, *buffers] if payload else [head, *buffers]
        with self._send_lock:
            if self.closed:
                raise ConnectionResetError(f"connection to {self.name} is closed")
            try:
                _sendmsg_all(self.sock, parts)
            except OSError:
                self._shutdown()
                raise

    def close(self) -> None:
        """Close the socket; the reader thread then reports the close."""
        self._shutdown()

    def join(self, timeout: float | None = None) -> None:
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout)

    def _shutdown(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _read_loop(self) -> None:
        reader = _BufferedReader(self.sock, self)
        error: BaseException | None = None
        try:
            while True:
                frame = self._read_frame(reader)
                self._on_frame(self, frame)
        except (EOFError, OSError) as exc:
            error = None if self.closed or isinstance(exc, EOFError) else exc
        except BaseException as exc:  # a protocol violation or a bug: drop this peer, loudly
            error = exc
            log.error("closing connection to %s: %r", self.name, exc)
        finally:
            if error is not None:
                # Whoever keeps the error (a dead worker's record does) must not keep this
                # thread's frames: they hold the partly received frame, up to its full size.
                error = error.with_traceback(None)
            self._closed.set()
            try:
                self.sock.close()
            except OSError:
                pass
            self._on_close(self, error)

    def _read_frame(self, reader: _BufferedReader) -> Frame:
        kind, flags, nbufs, response, notify, payload_len = frames.decode_fixed_header(
            reader.read(frames.HEADER.size))
        lens = frames.decode_buffer_lens(reader.read(8 * nbufs), nbufs) if nbufs else ()
        header = Header(kind, flags, response, notify, payload_len, lens)
        frames.check_size(header, self.max_message_size)
        payload = reader.read_large(payload_len) if payload_len else b""
        buffers = []
        for n in lens:
            buf = self._buffers.take(n)
            reader.readinto(memoryview(buf))
            buffers.append(buf)
        self._buffers.trim()
        return Frame(header, payload, buffers)


def _sendmsg_all(sock: socket.socket | TLSChannel, parts) -> None:
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    while views:
        sent = sock.sendmsg(views[:_IOV_MAX])
        while sent:
            if sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0

