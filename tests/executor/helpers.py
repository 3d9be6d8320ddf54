"""Helpers for the executor tests: functions that run on the workers.

Import them as ``from tests.executor.helpers import ...``. The functions are module-level so
the workers import them by reference (the workers get the master's ``sys.path``), the way a
user's module-level functions travel. The module-scoped ``executor`` fixture and the process
helpers (``is_gone``, ``wait_gone``) are shared with other areas: ``tests/conftest.py`` and
``tests/helpers.py``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.helpers import os_pid


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


def sleep_and_getpid(seconds):
    """Sleep, then the OS pid of the process that ran this (which worker ran the task)."""
    time.sleep(seconds)
    return os.getpid()


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
    return {os_pid(pid): pid for pid in pids}


# -- the execution model (tests/executor/test_execution_model.py) ------------------------------
def interval(seconds):
    """Sleep; returns (OS pid, start, end, on the main thread?, thread name)."""
    import threading
    start = time.monotonic()
    time.sleep(seconds)
    return (os.getpid(), start, time.monotonic(),
            threading.current_thread() is threading.main_thread(),
            threading.current_thread().name)


_DB = None


def open_db():
    """An initializer that opens a per-process sqlite3 connection (thread-affine)."""
    import sqlite3
    global _DB
    _DB = sqlite3.connect(":memory:")
    _DB.execute("CREATE TABLE items (x INTEGER)")


def insert_slowly(x):
    time.sleep(0.02)
    _DB.execute("INSERT INTO items VALUES (?)", (x,))
    return _DB.execute("SELECT COUNT(*) FROM items").fetchone()[0]


def with_alarm(limit, work):
    """The signal.setitimer timeout recipe: TimeoutError when ``work`` outlasts ``limit``."""
    import signal

    def on_alarm(signum, frame):
        raise TimeoutError(f"took longer than {limit} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        time.sleep(work)
        return "finished"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


_INITIALIZED_IN = None


def mark_initialized(tag="init"):
    global _INITIALIZED_IN
    _INITIALIZED_IN = (tag, os.getpid())


def initialized_in(seconds=0.0):
    """(this OS pid, what the initializer left here: (tag, OS pid) or None)."""
    time.sleep(seconds)
    return os.getpid(), _INITIALIZED_IN


def exit_now(code):
    os._exit(code)


def fail_initializer():
    raise ValueError("no database here")


_RAN: list = []


def record_order(index, data=b""):
    """Note that the task ``index`` ran here (``data``: its argument's bulk, unused)."""
    _RAN.append(index)
    return len(data)


def recorded_order():
    return list(_RAN)
