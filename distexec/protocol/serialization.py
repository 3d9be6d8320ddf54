"""Turning Python objects into a payload plus out-of-band buffers, and back.

Owns the cluster serializer: cloudpickle with pickle protocol 5, large contiguous buffers
taken out of band (sent straight from their memory, received into preallocated memory), and
the two pieces of context that remote references need while (un)pickling:

* the *destination* pid while pickling (``current_destination()``), so a reference knows
  whom it is being sent to (Julia's cluster serializer knows its stream's peer);
* the *receiving* context while unpickling, so an arriving reference can de-duplicate
  against the references this process already holds.

May import ``distexec.errors`` and ``distexec.protocol.tracebacks`` only.
"""

from __future__ import annotations

import contextlib
import contextvars
import pickle
from typing import Any

import cloudpickle

from . import tracebacks  # noqa: F401  (registers the CapturedException reducer)

#: Buffers smaller than this stay inside the pickle: a separate buffer costs more than a copy.
OUT_OF_BAND_MIN = 64 * 1024

_destination: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "distexec_destination", default=None)
_receiving: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "distexec_receiving", default=None)


def current_destination() -> int | None:
    """The pid a value is being pickled for, or None outside the cluster transport."""
    return _destination.get()


def current_receiving():
    """What ``receiving()`` was given: ``(context, source_pid)``, or None."""
    return _receiving.get()


@contextlib.contextmanager
def receiving(context: Any, source_pid: int):
    token = _receiving.set((context, source_pid))
    try:
        yield
    finally:
        _receiving.reset(token)


def dumps(obj: Any, destination: int | None) -> tuple[bytes, list[memoryview]]:
    """Pickle ``obj`` for process ``destination``; returns (payload, out-of-band buffers).

    Raises whatever pickling raises; nothing has been sent at that point.
    """
    buffers: list[memoryview] = []

    def keep_large_out_of_band(buf: pickle.PickleBuffer):
        view = buf.raw()
        if view.nbytes < OUT_OF_BAND_MIN:
            return True  # serialise in band
        buffers.append(view)
        return False

    token = _destination.set(destination)
    try:
        payload = cloudpickle.dumps(obj, protocol=5, buffer_callback=keep_large_out_of_band)
    finally:
        _destination.reset(token)
    return payload, buffers


def loads(payload, buffers=()) -> Any:
    """Unpickle a payload with its out-of-band buffers (call inside ``receiving()``)."""
    return pickle.loads(payload, buffers=buffers)
