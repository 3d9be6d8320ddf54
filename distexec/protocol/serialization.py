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
import io
import pickle
import sys
import threading
from typing import Any

import cloudpickle

from . import tracebacks  # noqa: F401  (registers the CapturedException reducer)

#: Buffers smaller than this stay inside the pickle: a separate buffer costs more than a copy.
OUT_OF_BAND_MIN = 64 * 1024
#: Containers near a message's root longer than this are not searched for large bytearrays.
_WALK_MAX_ITEMS = 64

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


class _OutOfBand:
    """Pickles a large ``bytearray`` as an out-of-band buffer.

    Pickle writes a bytearray in band (copied into the payload) and its C implementation never
    consults a reducer for one, so the bytearrays a message carries directly are wrapped in this
    before pickling. Objects whose own reducer hands out a ``PickleBuffer`` (NumPy arrays, ...)
    need no help.
    """

    __slots__ = ("data",)

    def __init__(self, data: bytearray):
        self.data = data

    def __reduce_ex__(self, protocol):
        return _bytearray_from_buffer, (pickle.PickleBuffer(self.data),)


def _bytearray_from_buffer(buffer) -> bytearray:
    # The receiver reads each out-of-band buffer into a fresh bytearray: use it as is.
    return buffer if type(buffer) is bytearray else bytearray(buffer)


def _wrap_large(obj: Any, memo: dict, depth: int) -> Any:
    """``obj`` with the large bytearrays near its root wrapped in :class:`_OutOfBand`.

    Looks at the root, the items of a small root tuple and their small tuple/dict items (so a
    call's ``(fn, args, kwargs)`` and a result tuple are covered) and copies a container only
    when something in it changed. ``memo`` keeps shared objects shared; a bytearray that is also
    referenced deeper in the message is sent twice (once out of band, once in band).
    """
    tp = type(obj)
    if tp is bytearray:
        if len(obj) < OUT_OF_BAND_MIN:
            return obj
        if id(obj) not in memo:
            memo[id(obj)] = _OutOfBand(obj)
        return memo[id(obj)]
    walk = (tp is tuple and depth > 0) or (tp is dict and depth == 1)
    if not walk or len(obj) > _WALK_MAX_ITEMS:
        return obj  # a long container costs more to walk than its bytearrays would save
    if id(obj) in memo:
        return memo[id(obj)]
    items = obj.items() if tp is dict else enumerate(obj)
    changed = None
    for key, item in items:
        if type(item) in _WALKED:  # the hot path (a small call) skips most items here
            new = _wrap_large(item, memo, depth - 1)
            if new is not item:
                if changed is None:
                    changed = dict(obj) if tp is dict else list(obj)
                changed[key] = new
    if changed is None:
        return obj
    memo[id(obj)] = changed if tp is dict else tuple(changed)
    return memo[id(obj)]


_WALKED = frozenset({bytearray, tuple, dict})


class _MainGlobals(dict):
    """Stands for the sender's ``__main__`` namespace; unpickles as the receiver's.

    cloudpickle gives every function it ships by value a fresh globals dict, so a global one
    task assigns is gone for the next, and ``everywhere("x = 1")`` is invisible to shipped
    functions. Functions from ``__main__`` get the receiver's ``__main__`` namespace instead:
    the globals they reference are defined there (Julia ships globals of ``Main`` into the
    worker's ``Main``), and state kept in module globals lasts between calls, as it does with
    ``ProcessPoolExecutor``'s workers.
    """

    def __reduce__(self):
        return (_receiver_main_globals, ())


def _receiver_main_globals() -> dict:
    main = sys.modules.get("__main__")
    return main.__dict__ if main is not None else {}


def _share_main_globals(pickler) -> None:
    main = sys.modules.get("__main__")
    if main is not None:
        # cloudpickle looks each function's globals up here before making a fresh dict.
        pickler.globals_ref[id(main.__dict__)] = _MainGlobals()


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
        with io.BytesIO() as file:
            pickler = cloudpickle.Pickler(file, protocol=5, buffer_callback=keep_large_out_of_band)
            _share_main_globals(pickler)
            pickler.dump(_wrap_large(obj, {}, 2))
            payload = file.getvalue()
    finally:
        _destination.reset(token)
    return payload, buffers


#: Unpickling imports modules. Two calls unpickled at once on two threads can import a
#: package and one of its submodules that import each other; Python's per-module import locks
#: then report a deadlock and both calls fail with "partially initialized module". A process
#: unpickles one message at a time, as a ProcessPoolExecutor worker does.
_UNPICKLING = threading.RLock()


def loads(payload, buffers=()) -> Any:
    """Unpickle a payload with its out-of-band buffers (call inside ``receiving()``)."""
    with _UNPICKLING:
        return pickle.loads(payload, buffers=buffers)
