"""``with sync():`` — wait for everything spawned inside the block. Julia: ``@sync``.

Owns the collection of handles (Futures, ``concurrent.futures`` futures) started in the
dynamic scope of a ``sync`` block. Imports ``distexec.errors`` only.

Julia's ``@sync`` collects tasks started *lexically* inside it; Python has no macros, so
distexec collects what ``spawnat``, ``spawn`` and ``distributed_for`` start while the block is
active in the current thread (a ``contextvars`` scope).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from ..errors import CompositeException

_active: contextvars.ContextVar[list | None] = contextvars.ContextVar("distexec_sync", default=None)

_H = TypeVar("_H")


def register(handle: _H) -> _H:
    """Add ``handle`` to the innermost active ``sync`` block, if any; returns ``handle``."""
    pending = _active.get()
    if pending is not None:
        pending.append(handle)
    return handle


@contextlib.contextmanager
def sync() -> Iterator[list[Any]]:
    """Wait, on exit, for every handle spawned inside; failures raise a CompositeException."""
    pending: list = []
    token = _active.set(pending)
    try:
        yield pending
    finally:
        _active.reset(token)
    wait_all(pending)


def wait_all(handles: Iterable[Any], errors: list[Exception] | None = None) -> None:
    """Wait for every handle; raise a CompositeException of all failures (and ``errors``)."""
    errors = list(errors or ())
    for handle in handles:
        try:
            _wait(handle)
        except CompositeException as group:  # a distributed_for's: one flat list, never nested
            errors.extend(group.exceptions)
        except Exception as exc:
            errors.append(exc)
    if errors:
        raise CompositeException(errors)


def _wait(handle: Any) -> None:
    if hasattr(handle, "fetch") and hasattr(handle, "where"):
        handle.wait()  # a remote Future: wait for the value, don't fetch it
    else:
        handle.result()
