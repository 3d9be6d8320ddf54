"""The local, thread-safe channel with Julia's ``Channel`` semantics.

Owns :class:`Channel`: the in-process channel that a ``RemoteChannel`` owner keeps in its
store and that user code may create directly. Imports only ``distexec.errors`` and the
standard library.

Theory of operation::

    buffered (0 < size <= inf)            unbuffered (size == 0)
    +-------------------------------+     +------------------------------------------+
    | _buffer: deque of values      |     | _buffer: deque of _Ticket (one per       |
    | put waits on _not_full        |     |   waiting putter, FIFO)                  |
    | take/fetch/wait wait on       |     | put appends its ticket and waits on the  |
    |   _not_empty                  |     |   ticket's own condition until a taker   |
    +-------------------------------+     |   marks it taken (or close/timeout)      |
                                          | take pops the first ticket, marks it     |
                                          |   taken and wakes only that putter       |
                                          +------------------------------------------+

One lock guards everything; every condition shares it. Waiters always re-check their
predicate before looking at the clock, so a wake-up that races a timeout is never lost for a
waiter that consumes. Waiters that do not consume (``fetch``, ``wait``) pass their wake-up on,
so a taker sleeping behind them is not starved. ``close`` wakes every waiter.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import ChannelClosedError, WaitTimeout

__all__ = ["Channel"]


class _Ticket:
    """One value offered by one putter of an unbuffered channel.

    Lets the putter know when *its* value, not just any value, was taken.
    """

    __slots__ = ("value", "taken", "cond")

    def __init__(self, value: Any, lock: threading.Lock):
        self.value = value
        self.taken = False
        self.cond = threading.Condition(lock)


class Channel:
    """A FIFO channel between threads, buffered, unbuffered (rendezvous) or unbounded.

    Args:
        size: capacity. ``0`` makes an unbuffered channel: ``put`` returns only once a taker
            has taken that value. A positive integer bounds the buffer; ``math.inf`` makes it
            unbounded.

    Attributes:
        size: the capacity given at construction (``int`` or ``math.inf``).

    Raises:
        TypeError: ``size`` is not a number, or is a ``bool``.
        ValueError: ``size`` is negative, NaN, or a non-integer finite number.

    Julia: ``Channel{Any}(n)``.
    """

    def __init__(self, size: int | float = 0):
        self.size = _check_size(size)
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        # Values when buffered, _Tickets when unbuffered.
        self._buffer: collections.deque = collections.deque()
        self._closed = False
        self._exc: BaseException | None = None

    # ------------------------------------------------------------------ put / take

    def put(self, value: Any, timeout: float | None = None) -> Any:
        """Append ``value``, blocking while the channel is full.

        On an unbuffered channel, blocks until a taker has taken this very value.

        Args:
            value: the value to put.
            timeout: seconds to wait at most; ``None`` waits forever.

        Returns:
            ``value``.

        Raises:
            ChannelClosedError: the channel is closed, or was closed while waiting (the
                exception given to :meth:`close` instead, if any).
            TimeoutError: ``timeout`` expired; the value is not left in the channel.

        Julia: ``put!(c, v)``.
        """
        deadline = _deadline(timeout)
        with self._lock:
            self._check_open()
            if self.size == 0:
                return self._put_unbuffered(value, deadline)
            ready = lambda: self._closed or len(self._buffer) < self.size  # noqa: E731
            if not _wait_for(self._not_full, ready, deadline):
                raise WaitTimeout("Channel.put timed out")
            self._check_open()
            self._buffer.append(value)
            self._not_empty.notify()
            return value

    def _put_unbuffered(self, value: Any, deadline: float | None) -> Any:
        """Offer ``value`` as a ticket and wait until a taker takes it; lock held."""
        ticket = _Ticket(value, self._lock)
        self._buffer.append(ticket)
        self._not_empty.notify()
        try:
            ready = lambda: ticket.taken or self._closed  # noqa: E731
            _wait_for(ticket.cond, ready, deadline)
            if ticket.taken:
                return value
            self._check_open()
            raise WaitTimeout("Channel.put timed out")
        finally:
            # Timeout, close or an interrupt: a value nobody took must not stay offered.
            if not ticket.taken and ticket in self._buffer:  # tickets compare by identity
                self._buffer.remove(ticket)

    def take(self, timeout: float | None = None) -> Any:
        """Remove and return the first value, blocking while the channel is empty.

        Values put before :meth:`close` can still be taken after it.

        Args:
            timeout: seconds to wait at most; ``None`` waits forever.

        Raises:
            ChannelClosedError: the channel is closed and empty (the exception given to
                :meth:`close` instead, if any).
            TimeoutError: ``timeout`` expired; the channel is unchanged.

        Julia: ``take!(c)``.
        """
        deadline = _deadline(timeout)
        with self._lock:
            self._wait_available(deadline, "take")
            item = self._buffer.popleft()
            if self.size == 0:
                item.taken = True
                item.cond.notify()
                return item.value
            self._not_full.notify()
            return item

    def fetch(self, timeout: float | None = None) -> Any:
        """Return the first value without removing it, blocking while the channel is empty.

        On an unbuffered channel, returns the value offered by the first waiting putter
        without completing its rendezvous (Julia refuses ``fetch`` there; distexec allows it).

        Args:
            timeout: seconds to wait at most; ``None`` waits forever.

        Raises:
            ChannelClosedError: the channel is closed and empty (or the exception given to
                :meth:`close`).
            TimeoutError: ``timeout`` expired.

        Julia: ``fetch(c)``.
        """
        deadline = _deadline(timeout)
        with self._lock:
            self._wait_available(deadline, "fetch")
            # Not consuming: pass the wake-up on so a taker waiting behind us is not starved.
            self._not_empty.notify()
            item = self._buffer[0]
            return item.value if self.size == 0 else item

    def wait(self, timeout: float | None = None) -> Channel:
        """Block until a value is available.

        Args:
            timeout: seconds to wait at most; ``None`` waits forever.

        Returns:
            this channel.

        Raises:
            ChannelClosedError: the channel is closed and empty (or the exception given to
                :meth:`close`).
            TimeoutError: ``timeout`` expired.

        Julia: ``wait(c)``.
        """
        deadline = _deadline(timeout)
        with self._lock:
            self._wait_available(deadline, "wait")
            self._not_empty.notify()  # not consuming: pass the wake-up on, as in fetch
            return self

    def _wait_available(self, deadline: float | None, op: str) -> None:
        """Wait until a value is available; raise if closed and empty or timed out. Lock held."""
        ready = lambda: bool(self._buffer) or self._closed  # noqa: E731
        if not _wait_for(self._not_empty, ready, deadline):
            raise WaitTimeout(f"Channel.{op} timed out")
        if not self._buffer:
            self._raise_closed()

    # ------------------------------------------------------------------ state

    def close(self, exc: BaseException | None = None) -> None:
        """Close the channel and wake every waiter. Idempotent.

        Blocked and later putters raise; takers drain the values already buffered, then
        raise. Waiting putters of an unbuffered channel withdraw their values.

        Args:
            exc: raised by later operations instead of :class:`ChannelClosedError`. Only the
                first ``close`` sets it.

        Raises:
            TypeError: ``exc`` is not an exception instance.

        Julia: ``close(c[, excp])``.
        """
        if exc is not None and not isinstance(exc, BaseException):
            raise TypeError(f"exc must be an exception instance or None, not {type(exc).__name__}")
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._exc = exc
            if self.size == 0:
                tickets, self._buffer = self._buffer, collections.deque()
                for ticket in tickets:
                    ticket.cond.notify()
            self._not_empty.notify_all()
            self._not_full.notify_all()

    def isopen(self) -> bool:
        """Whether the channel is still open. Julia: ``isopen(c)``."""
        return not self._closed

    def isready(self) -> bool:
        """Whether a value is available now (unbuffered: a putter is waiting). Racy by nature.

        Julia: ``isready(c)``.
        """
        return bool(self._buffer)

    def n_avail(self) -> int:
        """Number of values buffered now (unbuffered: waiting putters). Julia: ``n_avail(c)``."""
        return len(self._buffer)

    def __len__(self) -> int:
        return len(self._buffer)

    def __bool__(self) -> bool:
        # A channel object is always truthy; without this, __len__ would make an empty
        # channel falsy and `chan or default` silently replace it.
        return True

    def __iter__(self) -> Iterator[Any]:
        """Take values until the channel is closed and empty, then stop cleanly.

        An exception given to :meth:`close` is raised if it interrupts a blocked take;
        a channel already closed and empty just ends the iteration.

        Julia: ``for x in c``.
        """
        while self.isopen() or self.isready():
            try:
                yield self.take()
            except ChannelClosedError:
                return

    def __repr__(self) -> str:
        return f"Channel(size={self.size}, n_avail={len(self._buffer)}, open={not self._closed})"

    def _check_open(self) -> None:
        if self._closed:
            self._raise_closed()

    def _raise_closed(self) -> None:
        raise self._exc if self._exc is not None else ChannelClosedError()


def _check_size(size: Any) -> int | float:
    """Validate a capacity: a non-negative integer or ``math.inf``."""
    if isinstance(size, bool) or not isinstance(size, (int, float)):
        raise TypeError(f"Channel size must be an int or math.inf, not {type(size).__name__}")
    if size == math.inf:
        return math.inf
    if math.isnan(size) or size < 0 or size != int(size):
        raise ValueError(f"Channel size must be a non-negative integer or math.inf, got {size!r}")
    return int(size)


def _deadline(timeout: float | None) -> float | None:
    """Turn a relative timeout into a ``time.monotonic()`` deadline."""
    if timeout is None:
        return None
    if timeout < 0:
        raise ValueError("'timeout' must be a non-negative number")
    return time.monotonic() + timeout


def _wait_for(cond: threading.Condition, ready: Callable[[], bool], deadline: float | None) -> bool:
    """Wait on ``cond`` until ``ready()`` or the deadline; return ``ready()``.

    The predicate is checked before the clock, so a notification that arrives together
    with the timeout is still honoured.
    """
    while not ready():
        if deadline is None:
            cond.wait()
            continue
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        cond.wait(remaining)
    return True

