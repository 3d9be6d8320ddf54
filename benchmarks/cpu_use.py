"""CPU time a case costs, on the master and on the workers, per task (Linux).

A task's latency says how long the caller waits; its CPU says what the machine pays, and on
a machine with as many busy workers as cores, the master's CPU comes out of the workers'
time. Every backend is measured the same way: the CPU time of every thread of the benchmark
process (the master: with dask, the scheduler runs there too) and of every process that ran
a task, read from ``/proc`` before and after the timed loop.

Each thread's ``schedstat`` counts nanoseconds on a CPU; threads that end during the loop
are missed, which none of the measured backends does on its hot path. Without ``schedstat``
(another kernel), ``/proc/PID/stat`` gives the whole process in clock ticks (10 ms).
"""

from __future__ import annotations

import os
import time
from typing import Callable, Iterable

from . import tasks


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds the threads of ``pid`` have used so far."""
    total_ns = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total_ns += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):  # the thread ended meanwhile
                continue
    except OSError:
        return _ticks_cpu_seconds(pid)
    return total_ns / 1e9 if total_ns else _ticks_cpu_seconds(pid)


def _ticks_cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker_pids(submit: Callable, n_workers: int, deadline_s: float = 10.0) -> list[int]:
    """The processes that run this backend's tasks: short sleeps until ``n_workers`` have
    answered (each worker busy with one, the next goes to another)."""
    seen: set[int] = set()
    deadline = time.monotonic() + deadline_s
    while len(seen) < n_workers and time.monotonic() < deadline:
        futures = [submit(tasks.sleep_pid, 0.02) for _ in range(2 * n_workers)]
        seen.update(f.result() for f in futures)
    return sorted(seen)


class CpuMeter:
    """CPU the master and the workers use between ``start()`` and ``stop(n)``, per item."""

    def __init__(self, workers: Iterable[int]):
        self.workers = list(workers)
        self._master0 = self._workers0 = 0.0

    def _read(self) -> tuple[float, float]:
        return (process_cpu_seconds(os.getpid()),
                sum(process_cpu_seconds(pid) for pid in self.workers))

    def start(self) -> None:
        self._master0, self._workers0 = self._read()

    def stop(self, items: int, work_s: float = 0.0) -> dict:
        """``{"master": µs, "worker": µs}`` per item; ``work_s``: each item's own CPU work,
        left out of the workers' figure so that it shows what the backend adds."""
        master, workers = self._read()
        return {"master": (master - self._master0) / items * 1e6,
                "worker": ((workers - self._workers0) / items - work_s) * 1e6}
