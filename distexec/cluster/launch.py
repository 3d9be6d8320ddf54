"""Reading a launched worker's address line, and relaying the rest of its output.

Owns the master's view of a worker's output streams: the ``distexec_worker:PORT#ADDR`` line
with Julia's three failure messages, then everything else the worker prints, relayed by
``console`` (stdout to stdout, stderr to stderr, labelled ``From worker N:``).
Imports ``distexec.errors`` and ``.console``.

    worker stdout ──► StreamRelay ──► lines before the address ──► queue (the launcher reads)
                                  └─► lines after ──► master stdout, "      From worker N:\t..."
    worker stderr ──► StreamRelay ──► lines before the address ──► queue (startup chatter)
      (when the launcher kept it apart)                └─► after ──► master stderr, labelled
"""

from __future__ import annotations

import os
import queue
import re
import select
import sys
import threading
import time

from ..errors import LaunchWorkerError
from . import console

ADDRESS_LINE = re.compile(r"^distexec_worker:(\d+)#(.*)$")
MAX_STARTUP_LINES = 1000
STDERR_GRACE = 2.0
"""Seconds a failed worker's stderr gets to end after its stdout did (its last words)."""
STDERR_KEY = "stderr"
"""``WorkerConfig.environ`` key of a worker's stderr stream, when its launcher kept it apart
from stdout (``distexec worker --separate-stderr``): the relay then sends it to stderr."""
LANE_KEY = "task_lane"
"""``WorkerConfig.environ`` key of the master's end of a worker's task lane (a socket the
launcher made, ``transport.lane``; ``distexec worker --lane-fd`` holds the other end)."""


def worker_timeout() -> float:
    """Seconds to wait for a worker to start or connect (``DISTEXEC_WORKER_TIMEOUT``, 60)."""
    return float(os.environ.get("DISTEXEC_WORKER_TIMEOUT", "60"))


class OutputRelay:
    """A launched worker's output: its stdout (and stderr, if apart), each read by a thread.

    Lines before the address line wait in ``lines`` as ``(text, is_stderr)`` for the
    launcher; ``None`` there means stdout ended. ``pid`` and ``prefix`` label the rest.
    """

    def __init__(self, stream, err=None, prefix: str | None = None):
        self.pid: int | None = None
        self.prefix = console.resolve_prefix(prefix)
        self.lines: queue.Queue = queue.Queue()
        self._found = threading.Event()
        self._relays = [console.StreamRelay(stream, console.stdout, self, self._startup_out,
                                            on_end=lambda: self.lines.put(None))]
        if err is not None:
            self._relays.append(console.StreamRelay(err, console.stderr, self,
                                                    self._startup_err, name="distexec-relay-err"))
        self._pending = select.poll()  # used by one thread at a time: the worker's reader
        for relay in self._relays:
            if relay.fd is not None:
                self._pending.register(relay.fd, select.POLLIN)

    def _startup_out(self, line: str) -> bool:
        if self._found.is_set():
            return False
        self.lines.put((line, False))
        if ADDRESS_LINE.match(line):
            self._found.set()
        return True

    def settle(self) -> None:
        """Write out what the worker has already written (before the result it just sent).

        One ``poll`` over both pipes when nothing is pending: this runs for every result.
        """
        if self._pending.poll(0) or any(relay.busy() for relay in self._relays):
            for relay in self._relays:
                relay.settle()

    def rest_of_startup(self, timeout: float) -> list[tuple[str, bool]]:
        """Once stdout has ended: what else was printed (on stderr) before it all ended."""
        for relay in self._relays[1:]:
            relay.join(timeout)
        rest: list[tuple[str, bool]] = []
        while True:
            try:
                item = self.lines.get_nowait()
            except queue.Empty:
                return rest
            if item is not None:
                rest.append(item)

    def _startup_err(self, line: str) -> bool:
        if self._found.is_set():
            return False
        self.lines.put((line, True))
        return True


def read_worker_host_port(stream, config=None, timeout: float | None = None) -> tuple[str, int]:
    """Read the worker's address line from ``stream``; returns ``(bind_addr, port)``.

    Other lines (banners, ssh warnings) are echoed as "From worker startup". Julia:
    ``read_worker_host_port``.
    """
    environ = getattr(config, "environ", None)
    err = environ.pop(STDERR_KEY, None) if isinstance(environ, dict) else None
    relay = OutputRelay(stream, err)
    if config is not None:
        config.userdata = config.userdata if config.userdata is not None else {}
        if isinstance(config.userdata, dict):
            config.userdata["relay"] = relay
    deadline = time.monotonic() + (worker_timeout() if timeout is None else timeout)
    seen: list[tuple[str, bool]] = []
    try:
        return _scan_for_address(relay, deadline, seen, config)
    finally:
        for line, is_stderr in seen:  # one write a line: two hosts' lines never interleave
            stream = sys.stderr if is_stderr else sys.stdout
            stream.write(f"\tFrom worker startup:\t{line}\n")
            stream.flush()


def _scan_for_address(relay: OutputRelay, deadline: float, seen: list[tuple[str, bool]],
                      config):
    while True:
        left = deadline - time.monotonic()
        try:
            item = relay.lines.get(timeout=max(left, 0)) if left > 0 else relay.lines.get_nowait()
        except queue.Empty:
            raise LaunchWorkerError("Timed out waiting to read host:port string from worker.") from None
        if item is None:
            seen.extend(relay.rest_of_startup(STDERR_GRACE))  # the error it died with
            tail = "".join(f"\n    {text}" for text, _ in seen[-10:])
            raise LaunchWorkerError("Unable to read host:port string from worker. Launch command "
                                    f"exited with error?{_exit_detail(config)}"
                                    + (f"\nLast output:{tail}" if tail else ""))
        line, is_stderr = item
        match = None if is_stderr else ADDRESS_LINE.match(line)
        if match:
            return match.group(2), int(match.group(1))
        seen.append(item)
        if len(seen) >= MAX_STARTUP_LINES:
            raise LaunchWorkerError(
                "Unexpected output from worker launch command. Host:port string not found.")


def _exit_detail(config) -> str:
    process = getattr(config, "process", None)
    if process is None:
        return ""
    try:
        code = process.wait(timeout=2)
    except Exception:
        return ""
    return f" (exit status {code})"
