"""Helpers shared by the test suite.

Import them as ``from tests.helpers import wait_until`` (the repository root is on
``sys.path`` through ``pythonpath`` in ``pyproject.toml``).

Tests never ``sleep`` to let something happen: they wait for the event itself, or poll its
observable effect with :func:`wait_until`, which has a deadline and fails loudly.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.02,
    *,
    message: str | None = None,
) -> T:
    """Return as soon as ``predicate()`` is true; raise ``AssertionError`` after ``timeout`` s.

    Args:
        predicate: called repeatedly, without arguments, until it returns a true value.
        timeout: seconds before giving up.
        interval: seconds between two calls of ``predicate``.
        message: what was being waited for, for the failure message.

    Returns:
        The first true value ``predicate()`` returned.

    Raises:
        AssertionError: ``predicate()`` was still false when the deadline passed.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            what = message or getattr(predicate, "__name__", repr(predicate))
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(min(interval, remaining))
