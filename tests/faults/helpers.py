"""Helpers for the fault-injection tests (spec/faults.md §2).

Import them as ``from tests.faults.helpers import ...``. They find a worker's listening
address, kill a process, mark and watch a call that is to be interrupted, stand in for the
kernel's OOM killer (``MemoryWatchdog``), build in-process listeners whose sockets count what
the server reads before authentication, and count unpickling (``UnpicklingCounter``, also on a
worker). Finding a worker's OS process, watching it exit and running a blocking call on a
thread are shared with other areas: ``os_pid``, ``is_gone`` and ``in_thread`` in
``tests/helpers.py``.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time

import psutil

import distexec
from distexec.cluster.local import LocalManager
from distexec.cluster.manager import ClusterManager
from distexec.protocol import handshake
from distexec.runtime.context import default_context
from tests.faults.catalogue import T_DET
from tests.helpers import wait_until

DEATH_BUDGET = T_DET
"""``T_det``: seconds from a worker's death to its callers' exceptions (spec/faults.md)."""


def connect_at(pid: int) -> tuple[str, int]:
    """The address worker ``pid`` listens on (the master's record of it)."""
    record = default_context().record(pid)
    assert record is not None and record.connect_at is not None
    return tuple(record.connect_at)


class TcpLinkedLocalManager(LocalManager):
    """Local workers whose link to the master is TCP, as remote workers' is, rather than the
    Unix socket pair ``LocalManager`` makes: for tests that watch a transfer in the kernel's
    TCP counters (``bytes_received_from``)."""

    def connect(self, pid, config):
        link = (config.environ or {}).pop("link", None)
        if link is not None:
            link.close()
        return ClusterManager.connect(self, pid, config)


def bytes_received_from(pid: int) -> int:
    """Bytes the master's TCP connection to worker ``pid`` has received so far (TCP_INFO).

    ``tcpi_bytes_received`` (Linux 4.1+) sits at offset 128 of ``struct tcp_info``. Socket
    traffic does not show in ``/proc/PID/io``, so this is how a test sees a transfer's progress
    (start the worker with ``TcpLinkedLocalManager``).
    """
    import struct
    sock = default_context().record(pid).conn.sock
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return struct.unpack_from("Q", info, 128)[0]


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
# A stand-in for the kernel's OOM killer
# --------------------------------------------------------------------------------------------
class MemoryWatchdog:
    """SIGKILLs a process once its resident memory exceeds ``limit`` bytes, as the OOM killer
    (or a cgroup limit, or dask's nanny at ``terminate: 0.95``) would.

    Polls on a daemon thread; ``killed`` is set, and ``killed_at`` (``time.monotonic()``)
    recorded, the moment the signal is sent. Use as a context manager so the thread stops with
    the test.
    """

    def __init__(self, os_pid_: int, limit: int, interval: float = 0.005):
        self.process = psutil.Process(os_pid_)
        self.limit = limit
        self.killed = threading.Event()
        self.killed_at: float | None = None
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="memory-watchdog")
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                rss = self.process.memory_info().rss
            except psutil.NoSuchProcess:
                return
            if rss > self.limit:
                os.kill(self.process.pid, signal.SIGKILL)
                self.killed_at = time.monotonic()
                self.killed.set()
                return
            self._stop.wait(self._interval)

    def __enter__(self) -> MemoryWatchdog:
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(5)


def grow_memory(step: int, limit: int, hold: float = 30.0) -> int:
    """Runs on a worker: allocate and write ``step`` bytes at a time, up to ``limit`` bytes,
    then hold them for ``hold`` seconds.

    One step per 20 ms, so a :class:`MemoryWatchdog` polling every few ms catches the growth
    early (and a late one still finds the memory held); returns the bytes held if nothing
    stopped it.
    """
    import time as time_
    held = []
    while len(held) * step < limit:
        held.append(b"\x01" * step)  # written, so resident (untouched zero pages would not be)
        time_.sleep(0.02)
    time_.sleep(hold)
    return len(held) * step


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


# --------------------------------------------------------------------------------------------
# Counting unpickling (spec/faults.md P3, G6)
# --------------------------------------------------------------------------------------------
class UnpicklingCounter:
    """Counts unpickling in this process while it is on (``with counter: ...``).

    Two witnesses: calls to ``loads`` (pickle's, which the serializer's goes through, and the
    serializer's and cloudpickle's own names for it, patched while on), and ``pickle.find_class``
    audit events, which every unpickler raises when it resolves a global, however it was
    reached. Audit hooks cannot be removed, so one hook per process is installed on first use and
    counts into whichever counters are on. With ``thread_prefixes``, only what happens on threads
    whose name starts with one of them is counted (on a worker that keeps serving its master).
    """

    def __init__(self, thread_prefixes: tuple[str, ...] | None = None):
        self.thread_prefixes = thread_prefixes
        self.loads_calls = 0
        self.find_class_events = 0
        self._saved: list = []

    @property
    def total(self) -> int:
        return self.loads_calls + self.find_class_events

    def __enter__(self) -> UnpicklingCounter:
        import pickle

        import cloudpickle

        from distexec.protocol import serialization
        _install_audit_hook()
        for module in (pickle, serialization, cloudpickle):
            original = module.loads
            self._saved.append((module, original))
            module.loads = self._counting(original)
        _ACTIVE_COUNTERS.append(self)
        return self

    def __exit__(self, *exc_info) -> None:
        _ACTIVE_COUNTERS.remove(self)
        while self._saved:
            module, original = self._saved.pop()
            module.loads = original

    def _counts_here(self) -> bool:
        if self.thread_prefixes is None:
            return True
        return threading.current_thread().name.startswith(self.thread_prefixes)

    def _counting(self, loads):
        def counted(*args, **kwargs):
            if self._counts_here():
                self.loads_calls += 1
            return loads(*args, **kwargs)
        return counted


_ACTIVE_COUNTERS: list[UnpicklingCounter] = []
_HOOK_INSTALLED: list[bool] = []


def _install_audit_hook() -> None:
    if not _HOOK_INSTALLED:
        _HOOK_INSTALLED.append(True)
        sys.addaudithook(_on_audit_event)


def _on_audit_event(event: str, _args) -> None:
    if event == "pickle.find_class" and _ACTIVE_COUNTERS:
        for counter in list(_ACTIVE_COUNTERS):
            if counter._counts_here():
                counter.find_class_events += 1


PREAUTH_THREADS = ("distexec-accept", "distexec-handshake")
"""Names of the threads a worker's listener runs before a peer has authenticated."""

_worker_counter: list[UnpicklingCounter] = []


def count_preauth_unpickling() -> None:
    """Runs on a worker: start counting unpickling on its listener's pre-auth threads."""
    counter = UnpicklingCounter(PREAUTH_THREADS)
    counter.__enter__()
    _worker_counter.append(counter)


def preauth_unpickling_seen() -> tuple[int, int]:
    """Runs on a worker: (loads calls, find_class events) since ``count_preauth_unpickling``."""
    (counter,) = _worker_counter
    return counter.loads_calls, counter.find_class_events


def stall_handshake(address) -> socket.socket:
    """Connect, read the HELLO, send the magic and half the version, then nothing (N4)."""
    sock = socket.create_connection(address, timeout=5)
    sock.recv(handshake.HELLO_SIZE)
    sock.sendall(handshake.MAGIC + b"\x00")
    return sock
