"""Helpers for the executor tests: functions that run on the workers, and a launch fixture.

Import them as ``from tests.executor.helpers import ...``. The functions are module-level so
the workers import them by reference (the workers get the master's ``sys.path``), the way a
user's module-level functions travel.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil

import distexec
from tests.helpers import wait_until


class Boom(Exception):
    """A user exception type the workers can import."""


def capture(*args, **kwargs):
    return args, kwargs


def square(x):
    return x * x


def add(x, y):
    return x + y


def sleep_and_return(seconds, value):
    time.sleep(seconds)
    return value


def raise_boom(message):
    raise Boom(message)


def touch_and_sleep(directory, name, seconds=0.0):
    """Create ``directory/name`` (the task started), then sleep; returns ``name``."""
    Path(directory, str(name)).write_text(str(os.getpid()))
    time.sleep(seconds)
    return name


def started(directory) -> set[str]:
    """Names of the tasks that created their file with :func:`touch_and_sleep`."""
    return {p.name for p in Path(directory).iterdir()}


def os_pids(pids) -> dict[int, int]:
    """{OS pid: worker pid} for the given workers, as the workers report it."""
    return {distexec.remotecall_fetch(os.getpid, pid): pid for pid in pids}


def is_gone(os_pid: int) -> bool:
    """True once the process has exited (a zombie nobody reaped yet counts as gone)."""
    try:
        return psutil.Process(os_pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(os_pids, timeout: float = 10.0) -> None:
    wait_until(lambda: all(is_gone(p) for p in os_pids), timeout,
               message=f"worker processes {sorted(os_pids)} to exit")
