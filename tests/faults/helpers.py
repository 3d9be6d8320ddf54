"""Helpers for the fault-injection tests (spec/faults.md §2).

Import them as ``from tests.faults.helpers import ...``. They find a worker's listening
address, kill a process, mark and watch a call that is to be interrupted, and build in-process
listeners whose sockets count what the server reads before authentication. Finding a worker's
OS process, watching it exit and running a blocking call on a thread are shared with other
areas: ``os_pid``, ``is_gone`` and ``in_thread`` in ``tests/helpers.py``.
"""

from __future__ import annotations

import os
import signal
import socket

import distexec
from distexec.runtime.context import default_context
from tests.helpers import wait_until

DEATH_BUDGET = 2.0
"""``T_det``: seconds from a worker's death to its callers' exceptions (spec/faults.md)."""


def connect_at(pid: int) -> tuple[str, int]:
    """The address worker ``pid`` listens on (the master's record of it)."""
    record = default_context().record(pid)
    assert record is not None and record.connect_at is not None
    return tuple(record.connect_at)


def kill(os_pid_: int, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to an OS process (a worker's, looked up before it was to die)."""
    os.kill(os_pid_, sig)


def wait_until_running(pid: int, marker: str, timeout: float = 10.0) -> None:
    """Block until worker ``pid`` has started a call that set ``builtins.<marker>``."""
    wait_until(lambda: distexec.remotecall_fetch(_has_marker, pid, marker), timeout,
               message=f"worker {pid} to start the call marked {marker!r}")


def _has_marker(marker: str) -> bool:
    import builtins
    return getattr(builtins, marker, False)


def sleep_marked(marker: str, seconds: float) -> None:
    """Runs on a worker: note that the call started, then sleep (to be killed meanwhile)."""
    import builtins
    import time
    setattr(builtins, marker, True)
    time.sleep(seconds)


# --------------------------------------------------------------------------------------------
# In-process listeners whose accepted sockets count the bytes the server reads
# --------------------------------------------------------------------------------------------
class CountingSocket(socket.socket):
    """An accepted socket that records how many bytes the server read from it."""

    bytes_read = 0

    def recv(self, bufsize, *args):
        data = super().recv(bufsize, *args)
        self.bytes_read += len(data)
        return data

    def recv_into(self, buffer, nbytes=0, *args):
        n = super().recv_into(buffer, nbytes, *args)
        self.bytes_read += n
        return n


class CountingListenSocket(socket.socket):
    """A listening socket whose ``accept`` hands out :class:`CountingSocket` objects."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.accepted: list[CountingSocket] = []

    def accept(self):
        fd, addr = self._accept()
        sock = CountingSocket(self.family, self.type, self.proto, fileno=fd)
        if socket.getdefaulttimeout() is None and self.gettimeout():
            sock.setblocking(True)
        self.accepted.append(sock)
        return sock, addr


def counting_listen_socket() -> CountingListenSocket:
    sock = CountingListenSocket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(256)
    return sock
