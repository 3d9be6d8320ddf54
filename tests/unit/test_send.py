"""A message goes out whole, in order, however few bytes the socket takes per call.

A blocking socket can still take part of a message (a signal in the middle of a send), and
a TLS channel or a full buffer splits writes anywhere: the header, the payload or the
out-of-band buffers may each be cut.
"""

from __future__ import annotations

import pytest

from distexec.transport.connection import _sendmsg_all

pytestmark = pytest.mark.timeout(10)


class _Stingy:
    """A socket that takes at most ``step`` bytes per ``sendmsg``."""

    def __init__(self, step: int):
        self.step, self.out, self.calls = step, bytearray(), 0

    def sendmsg(self, buffers, ancillary=()):
        self.calls += 1
        room = self.step
        for buffer in buffers:
            chunk = bytes(memoryview(buffer).cast("B"))[:room]
            self.out += chunk
            room -= len(chunk)
            if not room:
                break
        return self.step - room


@pytest.mark.parametrize("step", [1, 7, 40, 41, 100, 10_000])
@pytest.mark.parametrize("parts", [
    [b"H" * 40, b"payload bytes"],                               # header and payload
    [b"H" * 40],                                                 # a header alone
    [b"H" * 40, b"p" * 30, bytearray(b"b" * 50), memoryview(b"m" * 20)],  # with buffers
], ids=["header+payload", "header", "with-buffers"])
def test_every_byte_goes_once_and_in_order(parts, step):
    sock = _Stingy(step)
    _sendmsg_all(sock, parts)
    assert bytes(sock.out) == b"".join(bytes(p) for p in parts)


def test_a_small_message_taken_whole_is_one_call():
    sock = _Stingy(10_000)
    _sendmsg_all(sock, [b"H" * 40, b"payload"])
    assert sock.calls == 1
