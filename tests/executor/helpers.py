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
