"""Capturing an exception with its traceback, and rebuilding it on another process.

Owns how a :class:`~distexec.errors.CapturedException` crosses the wire: the exception is
pickled *separately* from the rest of the message, with its type name, message and formatted
traceback beside it, so that

* an exception that cannot be pickled on the sender (unpicklable attributes) still arrives
  as its type name, message and traceback text;
* an exception that cannot be unpickled on the receiver (its class exists only remotely)
  arrives as a :class:`~distexec.errors.RemoteDeserializationError` with the same facts;
* the remote frames are restored as a real traceback (tblib), so standard printing shows them.

May import ``distexec.errors`` only (and cloudpickle, tblib).
"""

from __future__ import annotations

import copyreg
import pickle
import traceback

import cloudpickle
from tblib import Traceback

from ..errors import CapturedException, RemoteDeserializationError, _qualname, _safe_str


def capture(ex: BaseException) -> CapturedException:
    """Wrap ``ex`` (with its current traceback) for sending to another process."""
    text = "".join(traceback.format_exception(type(ex), ex, ex.__traceback__))
    return CapturedException(ex, text, _qualname(type(ex)))


def _reduce_captured(captured: CapturedException):
    ex = captured.ex
    try:
        ex_bytes = cloudpickle.dumps(ex, protocol=5)
        pickle.loads(ex_bytes)  # catches reducers that pickle but cannot be rebuilt (S7/S8)
    except Exception:
        ex_bytes = None
    tb_dict = None
    if ex.__traceback__ is not None:
        try:
            tb_dict = Traceback(ex.__traceback__).to_dict()
        except Exception:  # frames we cannot describe: the text still carries them
            tb_dict = None
    return (_rebuild_captured,
            (captured.type_name, _safe_str(ex), captured.traceback_text, ex_bytes, tb_dict))


def _rebuild_captured(type_name, message, traceback_text, ex_bytes, tb_dict):
    ex = _rebuild_exception(type_name, message, traceback_text, ex_bytes)
    if tb_dict is not None:
        try:
            ex = ex.with_traceback(Traceback.from_dict(tb_dict).as_traceback())
        except Exception:  # a traceback we cannot rebuild is only a loss of detail
            pass
    return CapturedException(ex, traceback_text, type_name)


def _rebuild_exception(type_name, message, traceback_text, ex_bytes) -> BaseException:
    if ex_bytes is None:
        return RemoteDeserializationError(type_name, message, traceback_text)
    try:
        ex = pickle.loads(ex_bytes)
    except Exception as error:
        stand_in = RemoteDeserializationError(type_name, message, traceback_text)
        stand_in.__cause__ = error
        return stand_in
    if not isinstance(ex, BaseException):
        return RemoteDeserializationError(type_name, message, traceback_text)
    return ex


copyreg.pickle(CapturedException, _reduce_captured)
