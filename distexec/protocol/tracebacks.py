"""Capturing an exception with its traceback, and showing that traceback on another process.

Owns how a :class:`~distexec.errors.CapturedException` crosses the wire and how its traceback
reads where it arrives. The exception is pickled *separately* from the rest of the message,
beside its type name, message and its traceback *as data* (a :class:`TracebackData`: each
frame's file, line, function, column span and source line; the chain of causes), so that

* an exception that cannot be pickled on the sender (unpicklable attributes) still arrives
  as its type name, message and traceback;
* an exception that cannot be unpickled on the receiver (its class exists only remotely)
  arrives as a :class:`~distexec.errors.RemoteDeserializationError` with the same facts;
* the traceback text is written where it is read, with the source lines of *that* process:
  the master has the user's script, and its notebook cells, even where a worker has neither.
  The sender's own line is the fallback (a module only the worker has).

The text leaves out distexec's own frames that ran the user's function (``invoke``, a batch,
a pool's cache), as ``ProcessPoolExecutor`` would show its ``_process_worker``: the user's
frames are the traceback. The frames come back as text, never spliced into the caller's
traceback: Python would print them with column markers of code that is not theirs.

May import ``distexec.errors`` only (and cloudpickle).
"""

from __future__ import annotations

import copyreg
import itertools
import linecache
import os
import pickle
import sys
import traceback
from types import TracebackType
from typing import NamedTuple

import cloudpickle

from ..errors import CapturedException, RemoteDeserializationError, _qualname, _safe_str

if sys.version_info < (3, 11):  # pragma: no cover - the backport provides it on 3.10
    from exceptiongroup import BaseExceptionGroup

#: Frames in files under this directory are distexec's own.
_DISTEXEC_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep

# What Python prints between two exceptions of a chain (traceback.TracebackException.format).
_CAUSE = "\nThe above exception was the direct cause of the following exception:\n\n"
_CONTEXT = "\nDuring handling of the above exception, another exception occurred:\n\n"


class Frame(NamedTuple):
    """One frame of a traceback, as the process that raised saw it."""

    filename: str
    lineno: int | None
    name: str
    line: str | None  # the sender's source line, as read (indented, with its newline)
    end_lineno: int | None
    colno: int | None
    end_colno: int | None


class Link(NamedTuple):
    """One exception of a chain: printed after ``joined_by`` (a ``_CAUSE``/``_CONTEXT``
    sentence, or "" for the first), its ``frames``, then ``text`` (its type and message).
    ``frames`` None: ``text`` is the sender's whole rendering (an exception group)."""

    joined_by: str
    frames: list[Frame] | None
    text: str


class TracebackData:
    """An exception's traceback and chain as data: pickles small, renders on any process."""

    __slots__ = ("links",)

    def __init__(self, links: list[Link]):
        self.links = links  # in printing order: the first cause first, the exception last

    def __reduce__(self):
        return (TracebackData, (self.links,))

    def render(self) -> str:
        """The text Python would print for the exception, with this process's source lines."""
        parts: list[str] = []
        for link in self.links:
            parts.append(link.joined_by)
            if link.frames:
                parts.append("Traceback (most recent call last):\n")
                parts.extend(_stack(link.frames).format())
            parts.append(link.text)
        return "".join(parts)

    def stack(self) -> traceback.StackSummary:
        """The frames of the exception itself (not of its causes), innermost last."""
        return _stack(self.links[-1].frames or []) if self.links else traceback.StackSummary()


# --------------------------------------------------------------------------------------------
# On the process that raised: the exception as data
# --------------------------------------------------------------------------------------------
def capture(ex: BaseException) -> CapturedException:
    """Wrap ``ex`` (with its current traceback) for sending to another process."""
    return _captured(ex, _qualname(type(ex)), describe(ex))


def describe(ex: BaseException) -> TracebackData:
    """``ex`` with its chain of causes and contexts, as Python would print them."""
    links: list[Link] = []
    seen: set[int] = set()
    current: BaseException | None = ex
    while current is not None:
        seen.add(id(current))
        earlier, joined_by = _earlier(current)
        if earlier is not None and id(earlier) in seen:  # a cycle: Python stops there too
            earlier, joined_by = None, ""
        links.append(_link(current, joined_by))
        current = earlier
    links.reverse()
    return TracebackData(links)


def _earlier(ex: BaseException) -> tuple[BaseException | None, str]:
    """The exception Python prints before ``ex``, and the sentence between them."""
    if ex.__cause__ is not None:
        return ex.__cause__, _CAUSE
    if ex.__context__ is not None and not ex.__suppress_context__:
        return ex.__context__, _CONTEXT
    return None, ""


def _link(ex: BaseException, joined_by: str) -> Link:
    if isinstance(ex, BaseExceptionGroup):  # Python draws its members in boxes: keep its text
        text = traceback.TracebackException(type(ex), ex, ex.__traceback__).format(chain=False)
        return Link(joined_by, None, "".join(text))
    frames = _without_call_machinery([_frame(tb) for tb in _walk(ex.__traceback__)])
    return Link(joined_by, frames, "".join(traceback.format_exception_only(type(ex), ex)))


def _walk(tb: TracebackType | None):
    while tb is not None:
        yield tb
        tb = tb.tb_next


def _frame(tb: TracebackType) -> Frame:
    code = tb.tb_frame.f_code
    lineno = tb.tb_lineno
    end_lineno, colno, end_colno = _span(tb)
    line = None
    if lineno is not None:
        linecache.checkcache(code.co_filename)  # a file edited since it was read: read it again
        line = linecache.getline(code.co_filename, lineno) or None
    return Frame(code.co_filename, lineno, code.co_name, line, end_lineno, colno, end_colno)


def _span(tb: TracebackType) -> tuple[int | None, int | None, int | None]:
    """Where in its lines the frame's failing expression is (Python 3.11+; what the ``^^^``
    markers underline): the end line and the start and end columns."""
    if sys.version_info < (3, 11) or tb.tb_lasti < 0:
        return None, None, None
    positions = tb.tb_frame.f_code.co_positions()  # one entry per 2-byte instruction
    _, end_lineno, colno, end_colno = next(
        itertools.islice(positions, tb.tb_lasti // 2, None), (None, None, None, None))
    return end_lineno, colno, end_colno


def _without_call_machinery(frames: list[Frame]) -> list[Frame]:
    """``frames`` from the first that is not distexec's: distexec called the user's function.

    A traceback that is distexec's only (an error of distexec itself) is kept whole.
    """
    for i, frame in enumerate(frames):
        if not frame.filename.startswith(_DISTEXEC_DIR):
            return frames[i:]
    return frames


# --------------------------------------------------------------------------------------------
# Where it is read: the frames with this process's source lines
# --------------------------------------------------------------------------------------------
def _stack(frames: list[Frame]) -> traceback.StackSummary:
    return traceback.StackSummary.from_list([_summary(frame) for frame in frames])


def _summary(frame: Frame) -> traceback.FrameSummary:
    """The frame for printing: the source line from this process's ``linecache`` if it has
    the file (looked up when printed), else the line the sender read."""
    here = frame.lineno is not None and bool(linecache.getline(frame.filename, frame.lineno))
    line = None if here else frame.line
    if sys.version_info < (3, 11):
        return traceback.FrameSummary(frame.filename, frame.lineno, frame.name,
                                      lookup_line=False, line=line)
    end_lineno, colno, end_colno = frame.end_lineno, frame.colno, frame.end_colno
    if not here and end_lineno != frame.lineno:  # the sender sent one line of several
        end_lineno, colno, end_colno = frame.lineno, None, None
    return traceback.FrameSummary(frame.filename, frame.lineno, frame.name, lookup_line=False,
                                  line=line, end_lineno=end_lineno, colno=colno,
                                  end_colno=end_colno)


# --------------------------------------------------------------------------------------------
# On the wire
# --------------------------------------------------------------------------------------------
def _captured(ex: BaseException, type_name: str, data: TracebackData,
              text: str | None = None) -> CapturedException:
    captured = CapturedException(ex, data.render() if text is None else text, type_name)
    captured.stack = data.stack()
    captured._traceback_data = data  # to send it on again (a nested call's error)
    return captured


def _reduce_captured(captured: CapturedException):
    ex = captured.ex
    try:
        ex_bytes = cloudpickle.dumps(ex, protocol=5)
        pickle.loads(ex_bytes)  # catches reducers that pickle but cannot be rebuilt (S7/S8)
    except Exception:
        ex_bytes = None
    return (_rebuild_captured, (captured.type_name, _safe_str(ex), _data_of(captured), ex_bytes))


def _data_of(captured: CapturedException) -> TracebackData:
    if captured._traceback_data is not None:
        return captured._traceback_data
    # made directly, not by capture(): its text, or what its exception still holds
    if captured.ex.__traceback__ is None and captured.traceback_text:
        return TracebackData([Link("", None, captured.traceback_text)])
    return describe(captured.ex)


def _rebuild_captured(type_name: str, message: str, data: TracebackData, ex_bytes):
    text = data.render()
    ex = _rebuild_exception(type_name, message, text, ex_bytes)
    return _captured(ex, type_name, data, text)


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
    _drop_tracebacks(ex)
    return ex


def _drop_tracebacks(ex: BaseException) -> None:
    """The remote frames travel as data (``TracebackData``). An exception that brought its
    traceback too (tblib's pickling support, installed by another library) would splice them
    into the caller's traceback when raised: drop them, down the chain."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [ex]
    while pending:
        item = pending.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        item.__traceback__ = None
        pending += [item.__cause__, item.__context__]


copyreg.pickle(CapturedException, _reduce_captured)
