"""Receive buffers for large out-of-band payloads, reused once nobody holds them any more.

Owns the memory a connection receives large buffers into. Imports nothing from distexec.

A fresh 64 MiB ``bytearray`` costs more than receiving into it: zeroing it faults in 16,384
pages, and the kernel's copy then runs at a third of its speed on warm memory. A connection
therefore keeps the last few large buffers it handed out, and receives into one of them again
once its reference count shows that the value built on it (a NumPy array, a bytearray) is
gone. A buffer somebody still holds is never reused. Idle buffers are released after
``IDLE_SECONDS`` (every frame, heartbeats included, gives a chance to trim), so the memory
kept is bounded in size and in time.
"""

from __future__ import annotations

import sys
import time

MIN_POOLED = 1 << 20          # smaller buffers are cheap to make
MAX_POOLED_BYTES = 512 << 20  # kept by one connection at most
MAX_POOLED = 4                # buffers kept by one connection at most
IDLE_SECONDS = 2.0

# References to a pooled buffer that nobody else holds: the pool's entry, the local variable
# and getrefcount's own argument.
_UNUSED_REFS = 3


class ReceiveBuffers:
    """Large receive buffers of one connection (used by its reader thread only)."""

    __slots__ = ("_pooled", "_last_used")

    def __init__(self) -> None:
        self._pooled: list[bytearray] = []
        self._last_used: list[float] = []

    def take(self, n: int) -> bytearray:
        """A bytearray of exactly ``n`` bytes to receive into (its contents are overwritten)."""
        if n < MIN_POOLED:
            return bytearray(n)
        now = time.monotonic()
        for i in range(len(self._pooled)):
            buf = self._pooled[i]
            if len(buf) == n and sys.getrefcount(buf) == _UNUSED_REFS:
                self._last_used[i] = now
                return buf
        buf = bytearray(n)
        if n <= MAX_POOLED_BYTES:
            self._pooled.append(buf)
            self._last_used.append(now)
            while (len(self._pooled) > MAX_POOLED
                   or sum(map(len, self._pooled)) > MAX_POOLED_BYTES):
                del self._pooled[0], self._last_used[0]  # the oldest
        return buf

    def trim(self) -> None:
        """Release the buffers not taken for ``IDLE_SECONDS``."""
        if self._pooled and time.monotonic() - min(self._last_used) > IDLE_SECONDS:
            now = time.monotonic()
            keep = [i for i, used in enumerate(self._last_used) if now - used <= IDLE_SECONDS]
            self._pooled = [self._pooled[i] for i in keep]
            self._last_used = [self._last_used[i] for i in keep]

    def __len__(self) -> int:
        return len(self._pooled)
