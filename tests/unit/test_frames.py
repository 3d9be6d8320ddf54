"""Unit tests of the frame layout in ``distexec.protocol.frames`` (no sockets, no processes).

A header is built with ``encode_header`` and read back with the decoders the reader thread
uses; the receive path itself (``Connection._read_frame``) is driven with an in-memory reader
so that "refused before allocation" is observable without a socket.
"""

from __future__ import annotations

import struct
from types import SimpleNamespace

import pytest

from distexec.errors import MessageTooLarge, ProtocolError
from distexec.protocol import frames
from distexec.protocol.frames import (
    HEADER,
    MAX_BUFFERS,
    NULL_RRID,
    RRID,
    Flag,
    Header,
    Kind,
    check_size,
    decode_buffer_lens,
    decode_fixed_header,
    encode_header,
)
from distexec.transport.buffers import ReceiveBuffers
from distexec.transport.connection import Connection

pytestmark = pytest.mark.timeout(30)


def _decode(data: bytes) -> Header:
    """Decode a whole header (fixed part plus buffer table) as the reader thread does."""
    kind, flags, nbufs, response, notify, payload_len = decode_fixed_header(data[:HEADER.size])
    lens = decode_buffer_lens(data[HEADER.size:], nbufs)
    return Header(kind, flags, response, notify, payload_len, lens)


class _MemoryReader:
    """The reader interface of ``Connection._read_frame`` over bytes; records body reads."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0
        self.body_reads: list[int] = []

    def read(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise EOFError("connection closed by peer")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def read_large(self, n: int) -> bytes:
        self.body_reads.append(n)
        return self.read(n)

    def readinto(self, target: memoryview) -> None:
        self.body_reads.append(len(target))
        target[:] = self.read(len(target))


def _read_frame(data: bytes, max_message_size: int = frames.DEFAULT_MAX_MESSAGE_SIZE):
    reader = _MemoryReader(data)
    conn = SimpleNamespace(max_message_size=max_message_size, _buffers=ReceiveBuffers(),
                           _shm_in=None, _shm_out=None)
    return Connection._read_frame(conn, reader), reader


# --------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(Kind))
def test_every_kind_round_trips(kind):
    data = encode_header(kind, 5)
    header = _decode(data)
    assert header == Header(kind, Flag.NONE, NULL_RRID, NULL_RRID, 5, ())
    assert len(data) == HEADER.size


def test_ids_flags_and_buffer_table_round_trip():
    response, notify = RRID(3, 2**40 + 7), RRID(1, 12)
    data = encode_header(Kind.CALL_WAIT, 1234, [70_000, 1, 2**33], flags=Flag.ERROR | Flag.NO_VALUE,
                         response=response, notify=notify)
    header = _decode(data)
    assert header.kind is Kind.CALL_WAIT
    assert header.flags == Flag.ERROR | Flag.NO_VALUE
    assert header.response == response and header.notify == notify
    assert header.payload_len == 1234
    assert header.buffer_lens == (70_000, 1, 2**33)
    assert header.body_len == 1234 + 70_000 + 1 + 2**33
    assert len(data) == HEADER.size + 3 * 8


def test_a_whole_frame_is_read_back_with_its_payload_and_buffers():
    payload, buffers = b"pickled payload", [b"a" * 10, b"", bytes(range(256))]
    data = encode_header(Kind.RESULT, len(payload), [len(b) for b in buffers],
                         response=RRID(1, 9)) + payload + b"".join(buffers)
    frame, reader = _read_frame(data)
    assert frame.header.kind is Kind.RESULT and frame.header.response == RRID(1, 9)
    assert bytes(frame.payload) == payload
    assert [bytes(b) for b in frame.buffers] == buffers
    assert reader.pos == len(data)  # the stream stays in step: nothing left over, nothing missing


# --------------------------------------------------------------------------------------------
# What a peer can get wrong
# --------------------------------------------------------------------------------------------
def test_unknown_kind_is_a_protocol_error():
    data = bytearray(encode_header(Kind.CALL, 0))
    data[0] = 200
    with pytest.raises(ProtocolError, match="unknown message kind 200"):
        decode_fixed_header(bytes(data))


def test_header_of_the_wrong_size_is_a_protocol_error():
    data = encode_header(Kind.CALL, 0)
    with pytest.raises(ProtocolError, match="header must be"):
        decode_fixed_header(data[:-1])


def test_too_many_buffers_announced_is_a_protocol_error():
    data = HEADER.pack(Kind.CALL, 0, MAX_BUFFERS + 1, 0, 0, 0, 0, 0, 0)
    with pytest.raises(ProtocolError, match="buffers"):
        decode_fixed_header(data)


def test_truncated_buffer_table_is_a_protocol_error():
    table = struct.pack("<3Q", 1, 2, 3)
    with pytest.raises(ProtocolError, match="truncated buffer table"):
        decode_buffer_lens(table[:-1], 3)
    with pytest.raises(ProtocolError, match="truncated buffer table"):
        decode_buffer_lens(table[:16], 3)


def test_oversize_message_is_refused_before_any_body_is_allocated():
    # A peer announces a 2**50-byte buffer. Allocating it would raise MemoryError; the reader
    # must refuse it from the header alone and never start reading the body.
    data = encode_header(Kind.CALL, 10, [2**50], max_message_size=2**60)
    reader = _MemoryReader(data + b"x" * 10)
    with pytest.raises(MessageTooLarge, match="max_message_size"):
        Connection._read_frame(SimpleNamespace(max_message_size=2**20), reader)
    assert reader.body_reads == []


def test_oversize_payload_is_refused_before_the_payload_is_read():
    data = encode_header(Kind.CALL, 2**20 + 1, max_message_size=2**60) + b"x" * 16
    reader = _MemoryReader(data)
    with pytest.raises(MessageTooLarge):
        Connection._read_frame(SimpleNamespace(max_message_size=2**20), reader)
    assert reader.body_reads == []


def test_check_size_counts_payload_and_buffers():
    header = Header(Kind.CALL, Flag.NONE, NULL_RRID, NULL_RRID, 60, (40,))
    check_size(header, 100)  # exactly at the limit is allowed
    with pytest.raises(MessageTooLarge):
        check_size(header._replace(payload_len=61), 100)


def test_sender_refuses_an_oversize_message():
    with pytest.raises(MessageTooLarge, match="exceeds max_message_size"):
        encode_header(Kind.RESULT, 10, [95], max_message_size=100)
    assert _decode(encode_header(Kind.RESULT, 10, [90], max_message_size=100)).body_len == 100


def test_sender_refuses_too_many_buffers():
    with pytest.raises(MessageTooLarge, match="out-of-band buffers"):
        encode_header(Kind.RESULT, 0, [1] * (MAX_BUFFERS + 1))


def test_message_too_large_is_a_protocol_error():
    # Callers that handle "the peer broke the protocol" also catch an oversize message.
    assert issubclass(MessageTooLarge, ProtocolError)
