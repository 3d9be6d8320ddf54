"""Evidence that the kernel's OOM killer ended a worker, for the words of its death.

A SIGKILL alone proves nothing: ``rmprocs`` and ``interrupt`` escalate to it, and so does a
user's ``kill -9``. Two sources can say more, on Linux, when this process may read them:

* the kernel log (``/dev/kmsg``), whose OOM report names the process it killed;
* the ``oom_kill`` counter of the worker's memory cgroup (v2 ``memory.events``, v1
  ``memory.oom_control``): read when the worker started, it grew if the cgroup had an OOM kill
  since (the kernel log may be closed to us, inside a container for instance).

Imports nothing from distexec.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
KERNEL_LOG = "/dev/kmsg"
MAX_LOG_RECORDS = 100_000
"""A bound on the kernel log records read (the ring buffer holds far fewer)."""

_KILLED = re.compile(r"Killed process (\d+)\b|oom-kill:.*\bpid=(\d+)\b")


class OomKillCounter:
    """The ``oom_kill`` counter of one memory cgroup, and its value when first read."""

    def __init__(self, path: Path, start: int) -> None:
        self.path, self.start = path, start

    @classmethod
    def of_process(cls, os_pid: int, root: Path = CGROUP_ROOT) -> OomKillCounter | None:
        """The counter of ``os_pid``'s memory cgroup; None where there is none to read."""
        for path in _counter_files(os_pid, root):
            count = _read_oom_kills(path)
            if count is not None:
                return cls(path, count)
        return None

    def increased(self) -> bool:
        count = _read_oom_kills(self.path)
        return count is not None and count > self.start


def oom_evidence(os_pid: int, counter: OomKillCounter | None,
                 kernel_log: str = KERNEL_LOG) -> str | None:
    """Why the SIGKILL of ``os_pid`` was the OOM killer's, or None without evidence."""
    if _kernel_log_names(os_pid, kernel_log):
        return "the kernel log says the OOM killer killed it"
    if counter is not None and counter.increased():
        return (f"its memory cgroup counted an OOM kill since it started ({counter.path.name}: "
                "oom_kill)")
    return None


def _counter_files(os_pid: int, root: Path) -> list[Path]:
    """Where the counter of ``os_pid``'s memory cgroup may be, most likely first."""
    try:
        lines = Path(f"/proc/{os_pid}/cgroup").read_text().splitlines()
    except OSError:
        return []
    files = []
    for line in lines:
        if line.count(":") < 2:
            continue
        _, controllers, path = line.split(":", 2)
        relative = path.lstrip("/")
        if controllers == "":  # v2 (or the unified part of a hybrid hierarchy)
            files += [root / relative / "memory.events", root / "unified" / relative /
                      "memory.events"]
        elif "memory" in controllers.split(","):
            # v1; inside a cgroup namespace the mount's root is the process's own cgroup
            files += [root / "memory" / relative / "memory.oom_control",
                      root / "memory" / "memory.oom_control"]
    return files


def _read_oom_kills(path: Path) -> int | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == "oom_kill" and value.strip().isdigit():
            return int(value)
    return None


def _kernel_log_names(os_pid: int, kernel_log: str) -> bool:
    """Whether the kernel log records the OOM killer killing ``os_pid`` (False if unreadable).

    Within a PID namespace the kernel logs another number for the process: no match, and the
    cgroup counter decides.
    """
    try:
        fd = os.open(kernel_log, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        for record in _records(fd):
            match = _KILLED.search(record)
            if match and int(match.group(1) or match.group(2)) == os_pid:
                return True
        return False
    finally:
        os.close(fd)


def _records(fd: int):
    """The kernel log's records, oldest first: one per ``read`` of ``/dev/kmsg``."""
    pending = b""  # a plain file (tests) is read in chunks, not records
    for _ in range(MAX_LOG_RECORDS):
        try:
            data = os.read(fd, 8192)
        except BlockingIOError:  # read them all
            break
        except OSError as exc:
            if exc.errno == errno.EPIPE:  # overwritten while we read: go on with the next
                continue
            break
        if not data:
            break
        *lines, pending = (pending + data).split(b"\n")
        for line in lines:
            yield line.decode("utf-8", "replace")
    if pending:
        yield pending.decode("utf-8", "replace")
