"""The functions the benchmarks ship to workers.

Module-level (importable by every backend's workers, also those that pickle functions by
reference) and cheap to import: no numpy at import time.
"""

from __future__ import annotations

import os
import time


def noop():
    return None


def inc(x):
    return x + 1


def inc_chunk(chunk):
    """What a dask user writes to batch a map: one task per list of items."""
    return [x + 1 for x in chunk]


def echo(value):
    return value


def sleep(seconds):
    time.sleep(seconds)
    return seconds


def sleep_pid(seconds):
    """Which process ran it (``cpu_use.worker_pids``)."""
    time.sleep(seconds)
    return os.getpid()


def nbytes_plus(data, x=0):
    """The body of the closure case: touch the captured array, return something small."""
    return data.nbytes + x


def spin(seconds):
    """Busy for ``seconds`` of this thread's CPU time (two on one worker share its GIL)."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass
    return seconds
