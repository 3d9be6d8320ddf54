"""Frame layout of an authenticated connection: a fixed binary header, then the payload.

Owns the byte layout of every message after the handshake. Imports only ``distexec.errors``
and the standard library; no sockets, threads or clocks.

Theory of operation::

    +-------------------------- HEADER (48 bytes, little-endian) ---------------------------+
    | kind u8 | flags u8 | nbufs u16 | reserved u32 | response (whence i64, id i64) |          |
    | notify (whence i64, id i64) | payload_len u64                                          |
    +---------------------------------------------------------------------------------------+
    | nbufs x u64 buffer lengths | payload (pickle) | buffer 0 | buffer 1 | ...              |
    +---------------------------------------------------------------------------------------+

The header decodes without unpickling anything, so a receiver always knows where a message
ends and whom it answers, even when the payload cannot be unpickled: the failure is routed to
the waiter named in the header and the stream stays in step. Out-of-band buffers (pickle
protocol 5) follow the payload so that large arrays are written from, and read into, their
final memory without copies.

Shared buffers. Between two processes of one host (``transport.shm``), a large buffer may
travel in shared memory instead: its length in the table then has the ``SHARED`` bit set,
and the stream carries a ``SHARED_REF`` record in place of its bytes (which block of the
sender's shared memory holds it, whether that block's file descriptor comes with this
frame, and the sequence number the receiver writes back when it lets the memory go).
"""

from __future__ import annotations

import enum
import os
import struct
from typing import NamedTuple

from ..errors import MessageTooLarge, ProtocolError

HEADER = struct.Struct("<BBHIqqqqQ")
BUFFER_LEN = struct.Struct("<Q")
MAX_BUFFERS = 16384  # buffers of >= 64 KiB each: a 1 GiB message of separate arrays
DEFAULT_MAX_MESSAGE_SIZE = 1 << 40
#: A buffer length with this bit set: the buffer is in shared memory (see the docstring).
SHARED = 1 << 63
#: In the stream in place of a shared buffer: block id, 1 if the block's descriptor comes
#: with this frame (else 0), sequence number.
SHARED_REF = struct.Struct("<IIQ")


class Kind(enum.IntEnum):
    """Message kinds. The handler of each lives in ``runtime.dispatch``."""

    CALL = 1        # run fn; keep the result on this process under `response`; notify the creator
    CALL_FETCH = 2  # run fn; send the result back as RESULT to `notify`
    CALL_WAIT = 3   # run fn; keep the result under `response`; send OK (or the error) to `notify`
    REMOTE_DO = 4   # run fn; nobody waits; errors are logged on this process
    RESULT = 5      # a value (or error) for the waiter `response` on the receiver
    JOIN = 6        # master -> new worker: your pid, the cluster's topology and peers
    IDENTIFY = 7    # worker -> worker: the first message on a peer connection
    DONE = 8        # owner -> creator: the value of Future `response` now exists
    GC = 9          # holder -> owner: add/remove clients of owned values (packed, no pickle)
    PING = 10       # either way, every heartbeat interval: "still here" (no payload)


class Flag(enum.IntFlag):
    NONE = 0
    ERROR = 1       # the payload is a RemoteException rather than a value
    NO_VALUE = 2    # a completion notice: no payload worth unpickling
    BACKGROUND = 4  # cluster bookkeeping: keep it off the callee's main thread
    IN_ORDER = 8    # an executor task: on the callee's main thread, one at a time, in order


class RRID(NamedTuple):
    """Identity of a remote reference: the creating process and a per-process counter.

    Julia: ``RRID``. ``RRID(0, 0)`` is the null id.
    """

    whence: int
    id: int


NULL_RRID = RRID(0, 0)


class Header(NamedTuple):
    kind: Kind
    flags: Flag
    response: RRID
    notify: RRID
    payload_len: int
    buffer_lens: tuple[int, ...]
    shared: int = 0  # bit i set: buffer i is in shared memory (a SHARED_REF in the stream)

    @property
    def body_len(self) -> int:
        return self.payload_len + sum(self.buffer_lens)


def configured_max_message_size() -> int:
    """``DISTEXEC_MAX_MESSAGE_SIZE`` (bytes; workers inherit it), else the default (1 TiB)."""
    value = os.environ.get("DISTEXEC_MAX_MESSAGE_SIZE")
    return int(value) if value else DEFAULT_MAX_MESSAGE_SIZE


def encode_header(kind: Kind, payload_len: int, buffer_lens=(), *, flags: Flag = Flag.NONE,
                  response: RRID = NULL_RRID, notify: RRID = NULL_RRID,
                  max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE, shared: int = 0) -> bytes:
    """Pack a header and its buffer-length table; refuse messages over the size limit.

    ``shared``: bit i set marks buffer i as travelling in shared memory (``SHARED``).
    """
    nbufs = len(buffer_lens)
    if nbufs > MAX_BUFFERS:
        raise MessageTooLarge(f"message has {nbufs} out-of-band buffers (limit {MAX_BUFFERS})")
    total = payload_len + sum(buffer_lens)
    if total > max_message_size:
        raise MessageTooLarge(f"message of {total} bytes exceeds max_message_size={max_message_size}")
    head = HEADER.pack(kind, flags, nbufs, 0, response[0], response[1], notify[0], notify[1],
                       payload_len)
    if not nbufs:
        return head
    if shared:
        buffer_lens = [n | SHARED if shared >> i & 1 else n for i, n in enumerate(buffer_lens)]
    return head + struct.pack(f"<{nbufs}Q", *buffer_lens)


def decode_fixed_header(data) -> tuple[Kind, Flag, int, RRID, RRID, int]:
    """Unpack the fixed part; returns (kind, flags, nbufs, response, notify, payload_len)."""
    if len(data) != HEADER.size:
        raise ProtocolError(f"frame header must be {HEADER.size} bytes, got {len(data)}")
    kind, flags, nbufs, _reserved, rw, ri, nw, ni, payload_len = HEADER.unpack(data)
    kind_member = _KINDS.get(kind)
    if kind_member is None:
        raise ProtocolError(f"unknown message kind {kind}")
    if nbufs > MAX_BUFFERS:
        raise ProtocolError(f"frame announces {nbufs} buffers (limit {MAX_BUFFERS})")
    flags_member = _FLAGS.get(flags)
    if flags_member is None:
        flags_member = _FLAGS[flags] = Flag(flags)
    return kind_member, flags_member, nbufs, RRID(rw, ri), RRID(nw, ni), payload_len


# Every frame is decoded through these: a table lookup costs a fraction of an Enum call.
_KINDS = {kind.value: kind for kind in Kind}
_FLAGS: dict[int, Flag] = {}


def decode_buffer_lens(data, nbufs: int) -> tuple[int, ...]:
    if len(data) != nbufs * BUFFER_LEN.size:
        raise ProtocolError("truncated buffer table")
    return struct.unpack(f"<{nbufs}Q", data) if nbufs else ()


def split_shared(lens: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    """A decoded buffer table -> (the buffers' lengths, the mask of the shared ones)."""
    shared = 0
    for i, n in enumerate(lens):
        if n & SHARED:
            shared |= 1 << i
    if not shared:
        return lens, 0
    return tuple(n & ~SHARED for n in lens), shared


def check_size(header: Header, max_message_size: int) -> None:
    """Raise before any allocation when a peer announces more than we accept."""
    if header.body_len > max_message_size:
        raise MessageTooLarge(
            f"peer announced a {header.body_len}-byte message; max_message_size={max_message_size}")
