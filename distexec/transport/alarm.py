"""A kernel alarm on a file descriptor: wakes a thread blocked in ``poll`` at a set time.

Owns one Linux ``timerfd``. Imports nothing from distexec.

Why. A connection's reader thread stands aside while another thread reads (see
``connection.Connection.read_until``), and must take the reading back if that thread stays
away. Waking it each time the other thread leaves, only to find it back a moment later,
costs two thread wake-ups per message. With an alarm, the leaving thread sets it and the
returning thread clears it: the reader thread wakes only when the alarm goes off, and a
caller that waits for one reply after another wakes nobody.

Python 3.13 has ``os.timerfd_create``; 3.11 and 3.12 reach the same system calls through
``ctypes``. ``Alarm.create()`` returns None where neither works (not Linux): the caller then
keeps to waking the thread itself.
"""

from __future__ import annotations

import ctypes
import os

_CLOCK_MONOTONIC = 1
_TFD_NONBLOCK = os.O_NONBLOCK
_TFD_CLOEXEC = os.O_CLOEXEC


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _libc_timerfd() -> tuple | None:
    """``(timerfd_create, timerfd_settime)`` from the C library, or None."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        create, settime = libc.timerfd_create, libc.timerfd_settime
    except (OSError, AttributeError):
        return None
    create.argtypes, create.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settime.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Itimerspec),
                        ctypes.c_void_p]
    settime.restype = ctypes.c_int
    return create, settime


_LIBC = None if hasattr(os, "timerfd_create") else _libc_timerfd()


class Alarm:
    """One-shot alarm: ``fd`` becomes readable ``set(seconds)`` from now, unless ``clear()``
    came first. Not thread-safe by itself: the caller serialises ``set`` and ``clear``."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._spec = _Itimerspec()  # reused: set() and clear() allocate nothing
        self._spec_ref = ctypes.byref(self._spec)

    @classmethod
    def create(cls) -> "Alarm | None":
        try:
            if hasattr(os, "timerfd_create"):
                fd = os.timerfd_create(os.CLOCK_MONOTONIC,  # type: ignore[attr-defined]
                                       flags=os.TFD_NONBLOCK | os.TFD_CLOEXEC)  # type: ignore
            elif _LIBC is not None:
                fd = _LIBC[0](_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
                if fd < 0:
                    return None
            else:
                return None
        except OSError:
            return None
        return cls(fd)

    def set(self, seconds: float) -> None:
        """Go off ``seconds`` from now (replacing any earlier setting)."""
        ns = max(1, int(seconds * 1e9))  # 0 would disarm
        self._settime(ns)

    def clear(self) -> None:
        """Do not go off; forget a going-off nobody has read yet (disarming resets it)."""
        self._settime(0)

    def drain(self) -> bool:
        """Whether it went off; if so, ``poll`` sees it no more."""
        try:
            os.read(self.fd, 8)
        except (BlockingIOError, OSError):
            return False
        return True

    def close(self) -> None:
        os.close(self.fd)

    def _settime(self, ns: int) -> None:
        if _LIBC is None:
            os.timerfd_settime_ns(self.fd, initial=ns)  # type: ignore[attr-defined]
            return
        self._spec.it_value.tv_sec, self._spec.it_value.tv_nsec = divmod(ns, 1_000_000_000)
        _LIBC[1](self.fd, 0, self._spec_ref, None)
