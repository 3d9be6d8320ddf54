"""Large NumPy buffers through shared memory between two processes of one host.

Owns the shared memory of a connection over a Unix socket (a local worker's link to its
master): blocks of memory made with ``memfd_create``, which the sender fills and the receiver
maps, their file descriptors passed over that socket itself (``SCM_RIGHTS``), and who may
write to a block when. Imports ``distexec.errors`` and ``distexec.protocol``.

    sender:   Connection.send ──► SharedOut.place: each large NumPy buffer is copied once into
              a free block of the connection's pool (a new block: a memfd, whose descriptor
              goes with this frame), and the stream carries a SHARED_REF record in its place
    receiver: FdSocket.recv_into (recvmsg: descriptors kept in arrival order) ──►
              SharedIn.take: maps a new block once (kept for the frames that reuse it) and
              gives pickle a writable object over the buffer's bytes, no copy ──► the array.
              When the last reference to that object goes, the receiver writes the record's
              sequence number into the block's first page: the sender may fill it again.

Why blocks are kept. Through a socket, 64 MiB are copied twice per direction; through a fresh
shared mapping, once, but every one of its 16,384 pages must then be allocated and faulted
in, which costs more than both copies (and freeing them again as much). A connection
therefore keeps its blocks, as it keeps its receive buffers (``transport.buffers``): in the
steady state the sender copies into memory both processes have mapped already, and the
receiver maps nothing. A block is reused only for a buffer of at least half its size. The
pool is bounded: at most ``MAX_BLOCKS`` blocks, and of the free ones (memory nobody uses)
at most ``MAX_IDLE_BYTES``, none idle for longer than ``IDLE_SECONDS``. A block in use is
the receiver's array itself, so its size is not capped. When no block is free and the pool
is full (the receiver keeps its arrays), a buffer takes the socket.

What makes it safe:

* Only a ``Connection`` reads descriptors, and it exists only after the handshake: whatever
  a peer attaches before it is authenticated is dropped by the kernel (plain ``recv``).
* Only Unix sockets, which never leave the host; TCP, TLS and stream connections (peers,
  SSH and Slurm workers) never carry shared buffers, and a frame that says otherwise is a
  protocol error.
* A memfd has no name in ``/dev/shm`` or anywhere: it lives while a process maps it or
  holds its descriptor, so a SIGKILL of the sender, the receiver or the master leaves
  nothing behind. No other process can open it: its mode is 0600, and its ``/proc/PID/fd``
  entry obeys the owner's ptrace rules. The file is sealed against shrinking: mapped memory
  never turns into a SIGBUS.
* A block serves one transfer at a time: the sender fills it again only after the receiver
  released the value built on it. The receiver's array is writable, as one from the socket
  is, and its writes reach nobody: the sender's own array is elsewhere, and it never reads
  the block. (One difference from private memory: a child the receiver forks while it holds
  the array shares that memory rather than getting a copy of it; such a value is then never
  released, see ``_forks``.)
* Only the buffers of NumPy arrays: NumPy reads its bytes through the buffer protocol from
  whatever object it is given. Other out-of-band buffers (bytearrays) keep the socket.

``DISTEXEC_SHM=0`` (workers inherit it) makes a process send everything through its sockets;
it still accepts shared buffers.
"""

from __future__ import annotations

import array
import collections
import ctypes
import fcntl
import mmap
import os
import socket
import struct
import sys
import threading
import time
import weakref
from typing import Any

from ..errors import ProtocolError
from ..protocol.frames import SHARED_REF

#: Smaller buffers take the socket: a copy there costs less than the bookkeeping.
SHM_MIN = 1 << 20
MAX_BLOCKS = 8                 # blocks one connection's sender keeps at most
MAX_IDLE_BYTES = 512 << 20     # the free ones, in total, at most
IDLE_SECONDS = 2.0             # a free block unused this long is given up
MAX_FDS = 4 * MAX_BLOCKS        # room for the descriptors one read brings (one frame's: <= MAX_BLOCKS)

# A block's first page: the sequence number of its first transfer, the receiver's released
# one, and the flag the sender sets when it gives the block up. The buffer starts at the
# second page.
HEADER = mmap.PAGESIZE
_SEQ, _RELEASED, _RETIRED = 0, 8, 16
_U64 = struct.Struct("<Q")
_SEALS = getattr(fcntl, "F_SEAL_SHRINK", 0) | getattr(fcntl, "F_SEAL_GROW", 0)
_TRIM_EVERY = 1.0


def enabled() -> bool:
    """Whether this process sends large NumPy buffers through shared memory
    (``DISTEXEC_SHM``: default on; ``0``, ``false``, ``no`` or ``off`` turn it off)."""
    return os.environ.get("DISTEXEC_SHM", "1").strip().lower() not in ("0", "false", "no", "off")


def usable(sock: Any) -> bool:
    """Whether ``sock`` can carry shared buffers: a plain Unix stream socket on Linux."""
    return (type(sock) is socket.socket and sock.family == socket.AF_UNIX
            and hasattr(os, "memfd_create") and hasattr(socket, "SCM_RIGHTS")
            and hasattr(fcntl, "F_ADD_SEALS"))


def _is_numpy_buffer(view: memoryview) -> bool:
    owner = type(view.obj)
    return owner.__name__ == "ndarray" and owner.__module__ == "numpy"


# -- the sender -------------------------------------------------------------------------------
class _Block:
    """One memfd of the sender's pool, mapped here, its first page the shared header."""

    __slots__ = ("id", "capacity", "map", "seq", "known", "last_used")

    def __init__(self, block_id: int, capacity: int):
        self.id = block_id
        self.capacity = capacity
        self.map: mmap.mmap | None = None
        self.seq = 0
        self.known = False  # its descriptor reached the receiver
        self.last_used = time.monotonic()

    def is_free(self) -> bool:
        return (self.map is not None and self.known
                and _U64.unpack_from(self.map, _RELEASED)[0] == self.seq)

    def retire(self) -> None:
        """Give the block up: the receiver drops it once it sees the flag."""
        m, self.map = self.map, None
        if m is None:
            return
        try:
            _U64.pack_into(m, _RETIRED, 1)
            m.close()
        except (ValueError, BufferError):  # closed, or a copy into it is running: GC unmaps
            pass


class Placed:
    """A message's buffers as sent: shared ones replaced by their records."""

    __slots__ = ("lens", "parts", "shared", "fds", "_blocks", "_owner")

    def __init__(self, owner: "SharedOut", lens: list[int], parts: list, shared: int,
                 fds: list[int], blocks: list[tuple[_Block, bool]]):
        self._owner, self.lens, self.parts, self.shared = owner, lens, parts, shared
        self.fds, self._blocks = fds, blocks

    @property
    def ancillary(self) -> list:
        if not self.fds:
            return []
        return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", self.fds).tobytes())]

    def finish(self, sent: bool) -> None:
        """After the send (or its failure): close the descriptors that went with it; a block
        whose frame never left is free again (or, if new, given up)."""
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        self._owner._settle(self._blocks, sent)


class SharedOut:
    """The sender's side of one connection: its pool of blocks."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._blocks: list[_Block] = []
        self._next_id = 1
        self._trimmed = time.monotonic()
        self._closed = False

    def place(self, buffers) -> Placed | None:
        """Copy the large NumPy buffers of a message into blocks; None if none qualifies."""
        views = [memoryview(b) for b in buffers]
        wanted = [i for i, v in enumerate(views) if v.nbytes >= SHM_MIN and _is_numpy_buffer(v)]
        if not wanted:
            return None
        lens = [v.nbytes for v in views]
        parts: list = list(buffers)
        shared, fds, used = 0, [], []
        for i in wanted:
            got = self._acquire(lens[i])
            if got is None:
                break  # the pool is full: this and the rest take the socket
            block, new = got
            try:
                fd = self._fill(block, new, views[i])
            except OSError:  # no memory for a new block (a cgroup, a full tmpfs): the socket
                self._settle([(block, new)], False)
                continue
            if fd is not None:
                fds.append(fd)
            used.append((block, new))
            shared |= 1 << i
            parts[i] = SHARED_REF.pack(block.id, int(new), block.seq)
        if not shared:
            return None
        return Placed(self, lens, parts, shared, fds, used)

    def _acquire(self, n: int) -> tuple[_Block, bool] | None:
        """A free block for ``n`` bytes (reserved: its sequence number moves on), or a new
        one if the pool has room; None when neither."""
        with self._lock:
            if self._closed:
                return None
            fits = [b for b in self._blocks if n <= b.capacity <= 2 * n and b.is_free()]
            if fits:
                block = min(fits, key=lambda b: b.capacity)
                block.seq += 1
                block.last_used = time.monotonic()
                return block, False
            capacity = -(-n // mmap.PAGESIZE) * mmap.PAGESIZE
            while len(self._blocks) >= MAX_BLOCKS:
                idle = [b for b in self._blocks if b.is_free()]
                if not idle:
                    return None
                oldest = min(idle, key=lambda b: b.last_used)
                self._blocks.remove(oldest)
                oldest.retire()
            block = _Block(self._next_id, capacity)
            self._next_id += 1
            block.seq = 1
            self._blocks.append(block)
            return block, True

    @staticmethod
    def _fill(block: _Block, new: bool, view: memoryview) -> int | None:
        """Copy ``view`` into the block; for a new block, make it first and return its
        descriptor (to go with the frame)."""
        if not new:
            m = block.map
            if m is None:  # given up meanwhile (the connection closed)
                raise ConnectionResetError("the connection closed")
            _copy(m, HEADER, view)
            return None
        fd = os.memfd_create("distexec", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.fchmod(fd, 0o600)  # (no name to open it by; and not by others through /proc)
            os.ftruncate(fd, HEADER + block.capacity)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            _write_all(fd, view, HEADER)  # the kernel allocates the pages as it copies
            block.map = mmap.mmap(fd, HEADER + block.capacity,
                                  flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
            _U64.pack_into(block.map, _SEQ, block.seq)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _settle(self, blocks: list[tuple[_Block, bool]], sent: bool) -> None:
        with self._lock:
            for block, new in blocks:
                if sent:
                    block.known = True
                elif new or block.map is None:
                    if block in self._blocks:
                        self._blocks.remove(block)
                    block.retire()
                else:  # never left: free again, as if the receiver had released it
                    _U64.pack_into(block.map, _RELEASED, block.seq)

    def trim(self) -> None:
        """Give up the free blocks idle for ``IDLE_SECONDS``, and the oldest free ones beyond
        ``MAX_IDLE_BYTES`` (looks at most once a second; the connection calls it for every
        frame it reads, heartbeats included)."""
        if not self._blocks:
            return
        now = time.monotonic()
        if now - self._trimmed < _TRIM_EVERY:
            return
        with self._lock:
            self._trimmed = now
            free = sorted((b for b in self._blocks if b.is_free()), key=lambda b: b.last_used)
            kept = sum(b.capacity for b in free)
            for block in free:
                if now - block.last_used <= IDLE_SECONDS and kept <= MAX_IDLE_BYTES:
                    continue
                kept -= block.capacity
                self._blocks.remove(block)
                block.retire()

    def close(self) -> None:
        """The connection is gone: give every block up (a receiver's arrays keep theirs)."""
        with self._lock:
            self._closed = True
            blocks, self._blocks = self._blocks, []
        for block in blocks:
            block.retire()

    def __len__(self) -> int:
        return len(self._blocks)


def _copy(target: mmap.mmap, offset: int, view: memoryview) -> None:
    """One copy, through NumPy when it is loaded (it lets other threads run meanwhile)."""
    n = view.nbytes
    np = sys.modules.get("numpy")
    if np is not None:
        np.copyto(np.frombuffer(target, np.uint8, n, offset), np.frombuffer(view, np.uint8))
    else:
        memoryview(target)[offset:offset + n] = view.cast("B")


def _write_all(fd: int, view: memoryview, offset: int) -> None:
    data = view.cast("B") if view.format != "B" or view.ndim != 1 else view
    done = 0
    while done < len(data):
        done += os.pwritev(fd, [data[done:]], offset + done)


# -- the receiver -----------------------------------------------------------------------------
# plain ints: the socket module's flags are enums, and every read of a local worker's link
# (a waiting thread polls with them) would build one
_CMSG_CLOEXEC, _CTRUNC = int(socket.MSG_CMSG_CLOEXEC), int(socket.MSG_CTRUNC)


class FdSocket:
    """The reader's view of a Unix socket: ``recv_into`` that keeps the descriptors that
    come with the bytes (in arrival order, close-on-exec) for ``SharedIn``."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self.family = sock.family
        self.fds: collections.deque[int] = collections.deque()
        self._ancsize = socket.CMSG_SPACE(MAX_FDS * 4)

    def fileno(self) -> int:
        return self._sock.fileno()

    def recv_into(self, buffer, nbytes: int = 0, flags: int = 0) -> int:
        n, ancdata, msg_flags, _ = self._sock.recvmsg_into(
            [buffer], self._ancsize, flags | _CMSG_CLOEXEC)
        if ancdata or msg_flags & _CTRUNC:
            self._keep(ancdata, msg_flags)
        return n

    def _keep(self, ancdata, msg_flags: int) -> None:
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
                self.fds.extend(fds)
        if msg_flags & _CTRUNC:  # descriptors were lost: the frames cannot be read
            raise ProtocolError("the peer sent more file descriptors than a frame may carry")

    def close_fds(self) -> None:
        while self.fds:
            try:
                os.close(self.fds.popleft())
            except OSError:
                pass


class SharedIn:
    """The receiver's side of one connection: the sender's blocks, mapped here."""

    def __init__(self, fdsock: FdSocket):
        self._fdsock = fdsock
        self._maps: dict[int, mmap.mmap] = {}
        self._checked = time.monotonic()

    def take(self, record: bytes, n: int) -> memoryview:
        """A writable memoryview of the shared buffer of ``n`` bytes that ``record`` names;
        the record's sequence number is written back when the last view of it goes."""
        block_id, new, seq = SHARED_REF.unpack(record)
        if new:
            if not self._fdsock.fds:
                raise ProtocolError("a shared buffer's descriptor did not come with its frame")
            fd = self._fdsock.fds.popleft()
            try:
                self._maps[block_id] = _map(fd)
            finally:
                os.close(fd)
        m = self._maps.get(block_id)
        if m is None:
            raise ProtocolError(f"shared buffer in unknown block {block_id}")
        if HEADER + n > len(m):
            raise ProtocolError(f"shared buffer of {n} bytes overruns its block")
        region = _region_type(n).from_buffer(m, HEADER)
        release = weakref.finalize(region, _release, m, seq, _forks)
        release.atexit = False
        return memoryview(region).cast("B")  # (a plain bytes view, as a receiver expects)

    def trim(self, force: bool = False) -> None:
        """Forget the blocks the sender gave up (their arrays keep their own mapping)."""
        now = time.monotonic()
        if not self._maps or (not force and now - self._checked < _TRIM_EVERY):
            return
        self._checked = now
        for block_id in [k for k, m in self._maps.items() if _U64.unpack_from(m, _RETIRED)[0]]:
            del self._maps[block_id]

    def close(self) -> None:
        self._maps.clear()
        self._fdsock.close_fds()

    def __len__(self) -> int:
        return len(self._maps)


def _map(fd: int) -> mmap.mmap:
    try:
        size = os.fstat(fd).st_size
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)  # (EINVAL: not a memfd)
        if size <= HEADER:
            raise ProtocolError("a shared block is smaller than its header")
        if seals & _SEALS != _SEALS:
            raise ProtocolError("a shared block is not sealed against shrinking")
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    except OSError as exc:
        raise ProtocolError(f"the peer's shared block cannot be mapped: {exc}") from None


# Forks of this process so far. A value that existed when the process forked is never
# released: the child has it too (its mapping is shared, not copied), and the sender must not
# fill the block again while either might still read it. The child releases nothing it
# inherited either. (Its block is given up with the connection.)
_forks = 0


def _count_fork() -> None:
    global _forks
    _forks += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_count_fork)


def _release(m: mmap.mmap, seq: int, forks: int) -> None:
    if forks != _forks:
        return
    try:
        _U64.pack_into(m, _RELEASED, seq)
    except (ValueError, TypeError):  # (unmapped: nothing to tell)
        pass


_REGION_TYPES: dict[int, Any] = {}


def _region_type(n: int) -> Any:
    """A ctypes array type of ``n`` bytes that can carry a finalizer (one per size, cached).

    A ctypes array made ``from_buffer`` keeps its mapping alive, and every memoryview or
    NumPy array made from it keeps *it* alive (it is their buffer's exporter), so its
    finalizer runs exactly when the last reader of the bytes is gone.
    """
    tp = _REGION_TYPES.get(n)
    if tp is None:
        tp = type("SharedBuffer", (ctypes.c_ubyte * n,), {})
        if len(_REGION_TYPES) >= 256:
            _REGION_TYPES.clear()
        _REGION_TYPES[n] = tp
    return tp
