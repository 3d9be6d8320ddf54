"""One authenticated connection: framed sends under a lock, one reader thread.

Owns the socket of an authenticated peer. Imports ``distexec.errors`` and ``distexec.protocol``.

    sender threads ──► send(): header+payload+buffers ──► one sendmsg (under the send lock)
                                                  (TLS: an ``ssl.SSLSocket`` is wrapped in a
                                                   ``tls.TLSChannel``, which emulates sendmsg)
    socket ──► the read role ──► Frame(header, payload, buffers) ──► on_frame(conn, frame)
               (reader thread,    └─ EOF / error ──► on_close(conn, error)   (exactly once,
                or a waiting                                                  reader thread)
                thread: read_until)

Whoever reads does not run user code (the runtime decides what runs inline and what goes to a
call thread). Small frames are read through one reusable buffer; large payloads and
out-of-band buffers are received straight into their own preallocated memory.

Reading on the waiting thread (plain sockets). Handing a frame from the reader thread to the
thread that waits for it costs a thread wake-up, and on a virtual machine a wake-up costs as
much as the network hop itself. So the *read role* (reading a frame and dispatching it, in
order) can move: a thread that waits for something this connection will bring (a caller
waiting for its reply, a worker's idle main thread waiting for its next call) calls
``read_until(done)``, takes the role, and reads and dispatches frames itself until ``done()``
— first polling the socket without blocking, for about as long as this connection's waits
have lately lasted when that is short (``_Spinner``; ``DISTEXEC_SPIN_US`` bounds it), then
blocking in ``poll``. The reader thread holds the role whenever no waiting thread does; it
blocks in ``poll`` on the socket and on a wake-up fd, so that a waiting thread can ask for
the role back. While a waiting thread reads, the reader thread stands aside, and a waiting
thread that leaves sets an alarm (``alarm.py``) rather than waking it: it reads again only if
nobody waits by the time the alarm goes off. One waiting thread at a
time leads; others wait for their frame the usual way. A waiting thread that meets EOF or an
error leaves it to the reader thread to close the connection and report it.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # (the C module signal wraps; no stub)
import logging
import math
import os
import select
import signal
import socket
import threading
import time
import warnings
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator, NamedTuple, cast

from ..protocol import frames
from ..protocol.frames import Flag, Header, Kind, RRID, NULL_RRID
from .alarm import Alarm
from . import shm
from .buffers import ReceiveBuffers
from .tls import TLSChannel, is_tls_socket

if TYPE_CHECKING:
    from .lane import TaskLane

log = logging.getLogger("distexec.transport")

_SIGINT = int(signal.SIGINT)
_DONTWAIT = int(socket.MSG_DONTWAIT)  # (an int: the enum costs an object per polling recv)
_READ_BUFFER = 256 * 1024
_IOV_MAX = 512


_DEFAULT_SPIN_US = 1000.0


def _spin_seconds() -> float:
    """The longest a waiting thread polls the socket without blocking (``DISTEXEC_SPIN_US``,
    microseconds, default 1000; 0 never polls). How long it polls is learnt (_Spinner)."""
    value = os.environ.get("DISTEXEC_SPIN_US", "")
    try:
        micros = float(value) if value else _DEFAULT_SPIN_US
        if not 0 <= micros < math.inf:
            raise ValueError
    except ValueError:
        warnings.warn(f"DISTEXEC_SPIN_US={value!r} is not a number of microseconds >= 0; "
                      f"using {_DEFAULT_SPIN_US:g}", stacklevel=2)
        micros = _DEFAULT_SPIN_US
    return micros / 1e6


SPIN_SECONDS = _spin_seconds()
_POLLING = threading.Lock()  # held by the one thread of this process that polls (see _lead)
# After a waiting thread gives the role up, the reader thread waits this long before taking it
# back: a caller that waits for one reply after another (or a worker's main thread between
# short calls) then finds the role free each time, and nobody wakes the reader thread per
# message. It bounds how late a frame that arrives with no waiting thread reading is read.
LINGER_SECONDS = 0.001


class Frame(NamedTuple):
    header: Header
    payload: bytes | bytearray
    buffers: list[bytearray]


class _BufferedReader:
    """Exact-size reads from a socket through one reusable buffer."""

    def __init__(self, sock: socket.socket | TLSChannel | shm.FdSocket,
                 conn: "Connection | None" = None):
        self._sock = sock
        self._conn = conn
        self._buf = bytearray(_READ_BUFFER)
        self._view = memoryview(self._buf)
        self._start = self._end = 0

    @property
    def pending(self) -> bool:
        """Whether bytes already received wait in the buffer (``poll`` cannot see them)."""
        return self._end > self._start

    def _make_room(self, need: int) -> None:
        if self._start == self._end:
            self._start = self._end = 0
        elif len(self._buf) - self._start < need:
            size = self._end - self._start
            self._view[:size] = self._view[self._start:self._end]
            self._start, self._end = 0, size

    def _fill(self, need: int) -> None:
        self._make_room(need)
        n = self._sock.recv_into(self._view[self._end:])
        if n == 0:
            raise EOFError("connection closed by peer")
        self._heard()
        self._end += n

    def fill_nowait(self) -> bool:
        """Receive what has arrived without blocking; whether anything had (plain sockets)."""
        self._make_room(frames.HEADER.size)
        try:
            n = cast(socket.socket, self._sock).recv_into(self._view[self._end:], 0,
                                                          _DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        if n == 0:
            raise EOFError("connection closed by peer")
        self._heard()
        self._end += n
        return True

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
        if is_tls_socket(sock):  # OpenSSL allows one thread at a time: see tls.py
            stream = TLSChannel(sock)
        if stream.family in (socket.AF_INET, socket.AF_INET6):
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stream.settimeout(None)
        self.sock = stream
        self.name = name
        self.peer_pid: int | None = None
        # Called before a RESULT or DONE from this peer is handed over: the cluster layer
        # writes out a local worker's output first (cluster.console.StreamRelay.settle).
        self.before_results: Callable[[], None] | None = None
        # A local worker's task lane (transport.lane), which ends with this connection.
        self.task_lane: TaskLane | None = None
        self.max_message_size = (frames.configured_max_message_size() if max_message_size is None
                                 else max_message_size)
        self._on_frame = on_frame
        self._on_close = on_close
        self._send_lock = threading.Lock()
        self._closed = threading.Event()
        self._buffers = ReceiveBuffers()  # large receive buffers, reused (see buffers.py)
        self._reader: threading.Thread | None = None
        # A Unix socket (a local worker's link) may carry large NumPy buffers in shared
        # memory (see shm.py): its reader keeps the descriptors that come with the bytes.
        shared = shm.usable(stream)
        self._shm_out = shm.SharedOut() if shared and shm.enabled() else None
        fdsock = shm.FdSocket(cast(socket.socket, stream)) if shared else None
        self._shm_in = shm.SharedIn(fdsock) if fdsock is not None else None
        self._input = _BufferedReader(fdsock or stream, self)
        self._spinner = _Spinner()
        self.last_received = time.monotonic()  # for heartbeats (runtime.heartbeat)
        # The read role (module docstring): only plain sockets can be polled and read
        # without blocking; TLS and stream transports keep to the reader thread.
        self._role = threading.Lock()
        self._role_holder: int | None = None  # a waiting thread that holds it (read_until)
        # (reentrant: the SIGINT handler of a waiting main thread pokes under it)
        self._demand = threading.Condition(threading.RLock())
        self._wanted = 0  # waiting threads that want the role; the reader thread stands aside
        self._leading = False  # one waiting thread at a time reads
        self._linger_until = 0.0  # the reader thread stands aside until then (LINGER_SECONDS)
        self._parked = False  # the reader thread stands aside for the waiting threads
        self._failed: BaseException | None = None  # what a waiting thread's read met
        self._also: tuple[int, select.poll] | None = None  # (fd, poll) of read_until(also=)
        self._wake_fd: int | None = None
        self._poll: select.poll | None = None
        # Where the reader thread stands aside (_stand_aside): an eventfd to wake it, and
        # an alarm that a leaving waiting thread sets instead of waking it (alarm.py).
        self._aside_fd: int | None = None
        self._aside_poll: select.poll | None = None
        self._alarm: Alarm | None = None
        self._alarm_set = False
        if type(stream) is socket.socket and hasattr(os, "eventfd") and hasattr(select, "poll"):
            self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._poll = select.poll()
            self._poll.register(stream, select.POLLIN)
            self._poll.register(self._wake_fd, select.POLLIN)
            self._aside_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._aside_poll = select.poll()
            self._aside_poll.register(self._aside_fd, select.POLLIN)
            self._alarm = Alarm.create()
            if self._alarm is not None:
                self._aside_poll.register(self._alarm.fd, select.POLLIN)

    def __repr__(self) -> str:
        return f"<Connection {self.name} pid={self.peer_pid}{' closed' if self.closed else ''}>"

    @property
    def reader_thread(self) -> threading.Thread | None:
        """The thread reading this connection (None before ``start``)."""
        return self._reader

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    @property
    def can_read_here(self) -> bool:
        """Whether a waiting thread can take the read role (``read_until``)."""
        return self._wake_fd is not None and not self.closed

    def start(self) -> None:
        self._reader = threading.Thread(target=self._read_loop, name=f"distexec-reader-{self.name}",
                                        daemon=True)
        self._reader.start()

    def read_until(self, done: Callable[[], bool], *, timeout: float | None = None,
                   spin: float = SPIN_SECONDS, defer_sigint: bool = False,
                   also: int | None = None) -> bool:
        """Read and dispatch frames on this thread until ``done()`` or ``timeout`` seconds.

        Returns False at once when this thread cannot read here (TLS, another thread reads
        here already, the connection is closing): then wait another way. ``defer_sigint``
        (on the main thread): a Ctrl-C waits until the frame being read is whole, then
        raises as usual. The caller must not be interruptible otherwise (an asynchronous
        exception in the middle of a frame would lose the stream). ``also``: another file
        descriptor (a worker's task lane); the wait ends too when it becomes readable.
        """
        if self._wake_fd is None:
            return False
        # Everything below, bookkeeping included, runs with Ctrl-C held back: an exception
        # between two of these steps would leave the reader thread standing aside for ever.
        with _sigint_deferred(self, defer_sigint) as interrupted:
            with self._demand:
                wake_fd, poll = self._wake_fd, self._poll
                if (wake_fd is None or poll is None or self._leading or self.closed
                        or self._failed is not None):
                    return False
                self._leading = True
                self._wanted += 1
            try:
                if not self._role.acquire(blocking=False):
                    _poke(wake_fd)  # the reader thread gives the role up after its frame
                    self._role.acquire()
                self._role_holder = threading.get_ident()
                try:
                    if also is not None:
                        poll = self._poll_also(also, wake_fd)
                    return self._lead(done, timeout, spin, interrupted, wake_fd, poll, also)
                finally:
                    self._role_holder = None
                    self._role.release()
            finally:
                with self._demand:
                    self._leading = False
                    self._wanted -= 1
                    self._linger_until = time.monotonic() + LINGER_SECONDS
                    if self._wake_fd is None:  # the reader thread closes, and waits for us
                        self._demand.notify_all()
                    elif self._parked:
                        self._call_back_reader()

    def reads_on_this_thread(self) -> bool:
        """Whether the calling thread reads this connection now (a frame's handler runs on
        it): what the reading would show next (the peer's EOF, say) cannot come while it
        waits, so it must not wait for that. (The reader thread runs frame handlers only
        while it holds the role.)"""
        return (self._role_holder == threading.get_ident()
                or threading.current_thread() is self._reader)

    def poke(self) -> None:
        """Make the thread that holds the read role look up (its ``done()`` may have changed)."""
        with self._demand:  # not while the reader thread closes it (the number may be reused)
            if self._wake_fd is not None:
                _poke(self._wake_fd)

    def _poll_also(self, also: int, wake_fd: int) -> select.poll:
        """With the role held: a poll of this connection and ``also``, kept for next time
        (the reader thread's poll must not wake for ``also``)."""
        cached = self._also
        if cached is None or cached[0] != also:
            poll = select.poll()
            poll.register(self.sock, select.POLLIN)
            poll.register(wake_fd, select.POLLIN)
            poll.register(also, select.POLLIN)
            cached = self._also = (also, poll)
        return cached[1]

    def _lead(self, done: Callable[[], bool], timeout: float | None, spin: float,
              interrupted: list, wake_fd: int, poll: select.poll,
              also: int | None = None) -> bool:
        """With the role held: read and dispatch until ``done()``; see ``read_until``."""
        reader = self._input
        deadline = None if timeout is None else time.monotonic() + timeout
        started = time.perf_counter()
        limit, spin = spin, self._spinner.window(spin)
        # One thread of a process polls at a time: polling threads would take the GIL from
        # each other (and from everyone else) between their calls to recv.
        if spin and not _POLLING.acquire(blocking=False):
            spin = 0.0
        spin_until = started + spin
        polling = bool(spin)
        try:
            while not done():
                if interrupted or self._failed is not None or self.closed:
                    return True
                if not reader.pending:
                    if polling and time.perf_counter() < spin_until:
                        # Between two looks, give the CPU to whoever waits for it: on a busy
                        # machine that is often the peer this thread waits for.
                        if also is None:
                            if not reader.fill_nowait():
                                os.sched_yield()
                        elif poll.poll(0):
                            spin_until = 0.0  # something came: look at it the usual way
                        else:
                            os.sched_yield()
                        continue
                    if polling:
                        polling = False
                        _POLLING.release()
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return True
                    ready = poll.poll(None if left is None else left * 1000)
                    if not ready or any(fd == also for fd, _ in ready):
                        return True
                    if any(fd == wake_fd for fd, _ in ready):
                        _drain(wake_fd)
                        continue
                self._on_frame(self, self._read_frame(reader))
        except BaseException as exc:  # EOF, a reset, a protocol violation: the reader reports it
            # Without this thread's frames: they hold the partly received frame (see _read_loop).
            self._failed = exc.with_traceback(None)
            return True
        finally:
            if polling:
                _POLLING.release()
            self._spinner.waited(time.perf_counter() - started, limit)
        return True

    def send(self, kind: Kind, payload: bytes = b"", buffers=(), *, flags: Flag = Flag.NONE,
             response: RRID = NULL_RRID, notify: RRID = NULL_RRID) -> None:
        """Write one message atomically. Raises ``ConnectionError`` if the peer is gone."""
        placed = self._shm_out.place(buffers) if self._shm_out is not None and buffers else None
        if placed is not None:  # large NumPy buffers went to shared memory (shm.py)
            self._send_placed(kind, payload, placed, flags, response, notify)
            return
        lens = [memoryview(b).nbytes for b in buffers] if buffers else ()
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

    def _send_placed(self, kind: Kind, payload: bytes, placed: shm.Placed, flags: Flag,
                     response: RRID, notify: RRID) -> None:
        """``send`` of a message with buffers in shared memory: the records in their place,
        the descriptors of new blocks with the frame's first bytes."""
        sent = False
        try:
            head = frames.encode_header(kind, len(payload), placed.lens, flags=flags,
                                        response=response, notify=notify,
                                        max_message_size=self.max_message_size,
                                        shared=placed.shared)
            parts = [head, payload, *placed.parts] if payload else [head, *placed.parts]
            with self._send_lock:
                if self.closed:
                    raise ConnectionResetError(f"connection to {self.name} is closed")
                try:
                    _sendmsg_all(self.sock, parts, placed.ancillary)
                    sent = True
                except OSError:
                    self._shutdown()
                    raise
        finally:
            placed.finish(sent)

    def close(self) -> None:
        """Close the socket; the reader thread then reports the close."""
        self._shutdown()
        if self._reader is None:  # never started: nobody else will
            self._close_wake_fd()
            if self.task_lane is not None:
                self.task_lane.close()
            self._close_shared()

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
        reader = self._input
        error: BaseException | None = None
        try:
            wake_fd, poll = self._wake_fd, self._poll
            if wake_fd is None or poll is None:
                while True:
                    self._on_frame(self, self._read_frame(reader))
            while True:
                self._read_in_turn(wake_fd, poll)
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
            self._close_wake_fd()
            if self.task_lane is not None:
                self.task_lane.close()
            self._close_shared()
            self._on_close(self, error)

    def _read_in_turn(self, wake_fd: int, poll: select.poll) -> None:
        """The reader thread's turn: one frame read and dispatched, unless a waiting thread
        wants the role (then it stands aside until that thread is done, and a little longer)."""
        with self._demand:
            while self._failed is None:  # (a waiting thread met the end: report it at once)
                if self._wanted:
                    self._stand_aside(None)
                    continue
                left = self._linger_until - time.monotonic()
                if left <= 0:
                    break
                self._stand_aside(left)
        with self._role:
            if self._failed is not None:
                raise self._failed
            if self._wanted:
                return
            if not self._input.pending:
                ready = poll.poll()
                if any(fd == wake_fd for fd, _ in ready):
                    _drain(wake_fd)
                    return
            self._on_frame(self, self._read_frame(self._input))

    def _stand_aside(self, timeout: float | None) -> None:
        """The reader thread, with ``_demand`` held: wait without it until called back
        (``_call_back_reader``) or ``timeout`` seconds."""
        # (made with the wake fd, which reading needs; only this thread closes them)
        poll, aside_fd = cast(select.poll, self._aside_poll), cast(int, self._aside_fd)
        self._parked = True
        self._demand.release()
        try:
            poll.poll(None if timeout is None else timeout * 1000)
        finally:
            self._demand.acquire()
            self._parked = False
        _drain(aside_fd)
        alarm = self._alarm
        if self._alarm_set and alarm is not None:  # (woken another way: it goes off later)
            self._alarm_set = not alarm.drain()

    def _call_back_reader(self) -> None:
        """A waiting thread leaves, with ``_demand`` held: the reader thread must read again
        if nobody waits LINGER_SECONDS from now. With an alarm, it wakes only then (and not
        at all while a waiting thread is back by then, which reading reply after reply is);
        one alarm at a time: an earlier one that goes off finds the linger still running."""
        if self._failed is None and self._alarm is not None:
            if not self._alarm_set:
                self._alarm_set = True
                self._alarm.set(LINGER_SECONDS)
        elif self._aside_fd is not None:
            _poke(self._aside_fd)

    def _close_shared(self) -> None:
        """Give up this connection's shared blocks (arrays built on them keep their memory)."""
        if self._shm_out is not None:
            self._shm_out.close()
        if self._shm_in is not None:
            self._shm_in.close()

    def _close_wake_fd(self) -> None:
        with self._demand:  # read_until refuses once closed; a thread still reading leaves
            fd, self._wake_fd = self._wake_fd, None
            if fd is not None and self._leading:
                _poke(fd)  # out of a poll on the socket, which closing it does not end
            while self._leading:
                self._demand.wait()
            aside_fd, self._aside_fd = self._aside_fd, None
            alarm, self._alarm = self._alarm, None
        for fd_ in (fd, aside_fd):
            if fd_ is not None:
                os.close(fd_)
        if alarm is not None:
            alarm.close()

    def _read_frame(self, reader: _BufferedReader) -> Frame:
        kind, flags, nbufs, response, notify, payload_len = frames.decode_fixed_header(
            reader.read(frames.HEADER.size))
        lens, shared = frames.split_shared(
            frames.decode_buffer_lens(reader.read(8 * nbufs), nbufs)) if nbufs else ((), 0)
        header = Header(kind, flags, response, notify, payload_len, lens, shared)
        frames.check_size(header, self.max_message_size)
        payload = reader.read_large(payload_len) if payload_len else b""
        buffers = []
        for i, n in enumerate(lens):
            if shared >> i & 1:
                buffers.append(self._take_shared(reader, n))
                continue
            buf = self._buffers.take(n)
            reader.readinto(memoryview(buf))
            buffers.append(buf)
        self._buffers.trim()
        if self._shm_in is not None:
            self._shm_in.trim(force=bool(shared))
        if self._shm_out is not None:
            self._shm_out.trim()
        return Frame(header, payload, buffers)

    def _take_shared(self, reader: _BufferedReader, n: int):
        """A buffer the peer put in shared memory: its record from the stream, mapped."""
        if self._shm_in is None:
            raise frames.ProtocolError("a shared-memory buffer on a connection that cannot "
                                       "carry one (not a Unix socket)")
        return self._shm_in.take(reader.read(frames.SHARED_REF.size), n)


class _Spinner:
    """How long a waiting thread polls before it blocks, learnt from how long its waits last.

    Polling (instead of blocking in ``poll``) saves the wake-up when the frame comes within
    the window: a reply to a short call, or the next call of a caller that makes one after
    another. How soon that is depends on the machine and on the work, so the window follows
    the waits this connection has seen: twice their running mean, while that mean is under
    half the limit (``DISTEXEC_SPIN_US``); waits longer than that (long calls, an idle
    worker) are not worth a CPU spent polling, and their waits do not poll at all. A wait
    that blocks still counts, with its wake-up in it, so the window opens again when frames
    come quickly again.
    """

    WEIGHT = 1 / 8  # of the latest wait in the running mean
    FACTOR = 2.0  # the window, in running means

    def __init__(self) -> None:
        self.mean: float | None = None  # seconds; None before the first wait

    def window(self, limit: float) -> float:
        """Seconds to poll this wait, at most ``limit``."""
        if not limit:
            return 0.0
        mean = self.mean
        if mean is None:
            return limit
        return min(self.FACTOR * mean, limit) if mean * self.FACTOR <= limit else 0.0

    def waited(self, seconds: float, limit: float) -> None:
        # A long wait counts as a little over the limit: enough to stop polling, without one
        # idle minute keeping it stopped for the next hundred waits.
        seconds = min(seconds, 1.25 * limit)
        mean = self.mean
        self.mean = seconds if mean is None else mean + self.WEIGHT * (seconds - mean)


def _poke(fd: int) -> None:
    try:
        os.eventfd_write(fd, 1)
    except (BlockingIOError, OSError):  # the counter is full (already poked) or closed
        pass


def _drain(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except (BlockingIOError, OSError):
        pass


@contextmanager
def _sigint_deferred(conn: Connection, defer: bool) -> Iterator[list]:
    """On the main thread with ``defer``: hold a SIGINT back until the block ends, then act on
    it as the handler that was there would have (``KeyboardInterrupt`` by default)."""
    caught: list = []
    if not defer or threading.current_thread() is not threading.main_thread():
        yield caught
        return

    def hold(signum, frame):
        caught.append(frame)
        conn.poke()  # a blocking poll returns, and the waiting thread steps aside

    # _signal, not signal: the module's wrappers convert numbers to enums and back, which
    # cost more than the rest of a waiting caller's bookkeeping (it runs twice per call).
    try:
        previous = _signal.signal(_SIGINT, hold)
    except ValueError:  # not the main interpreter
        yield caught
        return
    try:
        yield caught
    finally:
        _signal.signal(_SIGINT, previous)
        if caught:
            if callable(previous):
                previous(signal.SIGINT, caught[-1])
            elif previous == _signal.SIG_DFL:
                signal.raise_signal(signal.SIGINT)


def _sendmsg_all(sock: socket.socket | TLSChannel, parts, ancillary=()) -> None:
    if not ancillary and len(parts) == 2 and type(parts[1]) is bytes:
        # a header and a small payload, the usual message: one call when it all goes at once
        head, payload = parts
        sent = sock.sendmsg(parts)
        if sent == len(head) + len(payload):
            return
        parts = [memoryview(head)[sent:], payload] if sent < len(head) else \
            [memoryview(payload)[sent - len(head):]]
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    while views:
        if ancillary:  # (descriptors: with the first bytes, once)
            sent = cast(socket.socket, sock).sendmsg(views[:_IOV_MAX], ancillary)
            ancillary = ()
        else:
            sent = sock.sendmsg(views[:_IOV_MAX])
        while sent:
            if sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0

