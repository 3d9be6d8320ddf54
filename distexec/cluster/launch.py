"""Reading a launched worker's address line, and relaying the rest of its output.

Owns the master's view of a worker's stdout: the ``distexec_worker:PORT#ADDR`` line with
Julia's three failure messages, then every further line printed as ``From worker N:``.
Imports ``distexec.errors``.

    worker stdout ──► relay thread ──► lines before the address ──► queue (the launcher reads)
                                   └─► lines after ──► master stdout, "      From worker N:\t..."
"""

from __future__ import annotations

import os
import queue
import re
import sys
import threading
import time

from ..errors import LaunchWorkerError

ADDRESS_LINE = re.compile(r"^distexec_worker:(\d+)#(.*)$")
MAX_STARTUP_LINES = 1000
_RELAY_PREFIX = "      From worker "


def worker_timeout() -> float:
    """Seconds to wait for a worker to start or connect (``DISTEXEC_WORKER_TIMEOUT``, 60)."""
    return float(os.environ.get("DISTEXEC_WORKER_TIMEOUT", "60"))


class OutputRelay:
    """One thread per launched worker reading its output stream line by line."""

    def __init__(self, stream, out=None):
        self.stream = stream
        self.out = out
        self.pid: int | None = None
        self.lines: queue.Queue = queue.Queue()
        self._found = threading.Event()
        self._thread = threading.Thread(target=self._run, name="distexec-relay", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for raw in iter(self.stream.readline, b""):
                self._handle(raw.decode(errors="replace").rstrip("\r\n"))
        except (ValueError, OSError):  # someone closed the stream under us: that is its end
            pass
        finally:
            self.lines.put(None)
            _close_quietly(self.stream)  # the relay is the stream's only reader

    def _handle(self, line: str) -> None:
        if not self._found.is_set():
            self.lines.put(line)
            if ADDRESS_LINE.match(line):
                self._found.set()
        else:
            self._print(line)

    def _print(self, line: str) -> None:
        out = self.out or sys.stdout
        text = line if line.startswith(_RELAY_PREFIX) else f"{_RELAY_PREFIX}{self.pid}:\t{line}"
        try:
            out.write(text + "\n")
            out.flush()
        except (ValueError, OSError):  # our stdout is closed (interpreter exit): drop the line
            pass


def read_worker_host_port(stream, config=None, timeout: float | None = None) -> tuple[str, int]:
    """Read the worker's address line from ``stream``; returns ``(bind_addr, port)``.

    Other lines (banners, ssh warnings) are echoed as "From worker startup". Julia:
    ``read_worker_host_port``.
    """
    relay = OutputRelay(stream)
    if config is not None:
        config.userdata = config.userdata if config.userdata is not None else {}
        if isinstance(config.userdata, dict):
            config.userdata["relay"] = relay
    deadline = time.monotonic() + (worker_timeout() if timeout is None else timeout)
    seen: list[str] = []
    try:
        return _scan_for_address(relay, deadline, seen, config)
    finally:
        for line in seen:
            print(f"\tFrom worker startup:\t{line}", flush=True)


def _scan_for_address(relay: OutputRelay, deadline: float, seen: list[str], config):
    while True:
        left = deadline - time.monotonic()
        try:
            line = relay.lines.get(timeout=max(left, 0)) if left > 0 else relay.lines.get_nowait()
        except queue.Empty:
            raise LaunchWorkerError("Timed out waiting to read host:port string from worker.") from None
        if line is None:
            tail = "".join(f"\n    {text}" for text in seen[-10:])
            raise LaunchWorkerError("Unable to read host:port string from worker. Launch command "
                                    f"exited with error?{_exit_detail(config)}"
                                    + (f"\nLast output:{tail}" if tail else ""))
        match = ADDRESS_LINE.match(line)
        if match:
            return match.group(2), int(match.group(1))
        seen.append(line)
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


def _close_quietly(stream) -> None:
    try:
        stream.close()
    except (ValueError, OSError):
        pass
