"""The exception hierarchy of distexec.

Owns every exception type that distexec raises on purpose. Imports nothing from distexec, so
every other layer may import it. Each docstring says who raises the exception and when.

Two families, in the h11 spirit: errors the *caller* caused (bad arguments get the standard
``ValueError``/``TypeError``), and errors the *cluster* or a *peer* caused (everything below).
"""

from __future__ import annotations

import pickle as _pickle
import signal as _signal
import sys
import traceback as _traceback
from collections.abc import Iterable, Sequence
from typing import Any

import concurrent.futures as _cf
from concurrent.futures.process import BrokenProcessPool as _BrokenProcessPool

# ``sys.version_info`` by that exact name: mypy decides which branch exists only from it.
if sys.version_info < (3, 11):  # pragma: no cover - the backport provides it on 3.10
    from exceptiongroup import ExceptionGroup

    class WaitTimeout(_cf.TimeoutError, TimeoutError):
        """A wait ran out of time (both ``TimeoutError`` types of Python 3.10)."""
else:
    #: A wait ran out of time. Python 3.11 made ``concurrent.futures.TimeoutError`` the builtin.
    WaitTimeout = TimeoutError

__all__ = [
    "DistexecError",
    "DistributedError",
    "RemoteException",
    "CapturedException",
    "RemoteTraceback",
    "RemoteDeserializationError",
    "ProcessExitedException",
    "AllWorkersExited",
    "BrokenDistributedExecutor",
    "ResultPicklingError",
    "CompositeException",
    "LaunchWorkerError",
    "AuthenticationError",
    "ProtocolError",
    "MessageTooLarge",
    "ChannelClosedError",
    "InvalidStateError",
    "WaitTimeout",
    "SecurityWarning",
]


class DistexecError(Exception):
    """Base class of every exception distexec raises about the cluster itself."""


class SecurityWarning(UserWarning):
    """A configuration weaker than distexec's defaults, e.g. workers listening beyond loopback
    without encryption (connections are authenticated, but not encrypted)."""


class DistributedError(DistexecError, RuntimeError):
    """A cluster operation that cannot be done, e.g. a worker adding processes.

    Julia: ``ErrorException``. Raised with the same message texts as DistributedNext.
    """


class InvalidStateError(DistexecError):
    """An operation on an object in a state that does not allow it. Julia: ``InvalidStateException``."""

    def __init__(self, message: str, state: str) -> None:
        super().__init__(message)
        self.state = state

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.state))


class ChannelClosedError(InvalidStateError):
    """``put``/``take``/``fetch``/``wait`` on a closed channel (local or remote).

    Raised by :class:`~distexec.Channel` and, wrapped in a :class:`RemoteException` when the
    owner is another process, by :class:`~distexec.RemoteChannel`.
    """

    def __init__(self, message: str = "Channel is closed.", state: str = "closed") -> None:
        super().__init__(message, state)


class CapturedException:
    """An exception caught on some process, with its traceback as frames and as text.

    Attributes:
        ex: the original exception, or a :class:`RemoteDeserializationError` standing in for an
            exception that could not be rebuilt on this process. Received from another
            process, it has no ``__traceback__``: the remote frames are ``stack``.
        traceback_text: the remote traceback as Python prints one, always available. Source
            lines are this process's where it has the file, else those of the process that
            raised; distexec's own frames that called the function are left out.
        type_name: qualified name of the original exception's type.
        stack: the remote frames (a ``traceback.StackSummary``), innermost last.

    Julia: ``CapturedException``.
    """

    def __init__(self, ex: BaseException, traceback_text: str = "",
                 type_name: str | None = None) -> None:
        self.ex = ex
        self.traceback_text = traceback_text
        self.type_name = type_name or _qualname(type(ex))
        self.stack = _traceback.StackSummary()
        self._traceback_data: Any = None  # protocol.tracebacks': what it sends on

    def __repr__(self) -> str:
        return f"CapturedException({self.type_name}: {_safe_str(self.ex)})"

    def __str__(self) -> str:
        return self.traceback_text or f"{self.type_name}: {_safe_str(self.ex)}"


class RemoteTraceback(Exception):
    """The traceback of a call that failed on another process, as text.

    Not raised: it is the ``__cause__`` of what the caller gets (a :class:`RemoteException`,
    or the executor's original exception), so Python prints the remote frames above the
    caller's own, as ``ProcessPoolExecutor`` prints its ``_RemoteTraceback``. ``tb`` is the
    text, between triple quotes; ``stack`` the remote frames (a ``traceback.StackSummary``).
    """

    def __init__(self, tb: str, stack: _traceback.StackSummary | None = None) -> None:
        super().__init__(tb)
        self.tb = tb
        self.stack = _traceback.StackSummary() if stack is None else stack

    def __str__(self) -> str:
        return self.tb

    @classmethod
    def of(cls, captured: CapturedException) -> RemoteTraceback:
        return cls(f'\n"""\n{captured.traceback_text.rstrip()}\n"""', captured.stack)


class RemoteException(DistexecError):
    """A call failed on process ``pid``; ``captured`` holds the original exception.

    Raised by the Julia-style layer (``fetch``, ``remotecall_fetch``, ``remotecall_wait``,
    channel operations on a remote owner) when user code raised on the process that ran it. The
    original exception is ``.captured.ex`` (also ``.ex``); the remote traceback is the
    ``__cause__`` (a :class:`RemoteTraceback`), so a printed traceback shows the remote frames
    once, above the caller's. Julia: ``RemoteException``.
    """

    def __init__(self, pid: int, captured: CapturedException) -> None:
        super().__init__(pid, captured)
        self.pid = pid
        self.captured = captured
        self.__cause__ = RemoteTraceback.of(captured)

    @property
    def ex(self) -> BaseException:
        return self.captured.ex

    def __str__(self) -> str:
        ex = self.captured.ex
        message = ex.message if isinstance(ex, RemoteDeserializationError) else _safe_str(ex)
        what = f"{self.captured.type_name}: {message}" if message else self.captured.type_name
        return f"On worker {self.pid}: {what}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.pid, self.captured))


class RemoteDeserializationError(DistexecError):
    """Stands in for a remote exception that could not be rebuilt on this process.

    Its type may not exist here, or its pickled form may be broken. Carries the original type's
    qualified name and message, the remote traceback text, and the local unpickling error as
    ``__cause__``.
    """

    def __init__(self, type_name: str, message: str, traceback_text: str = "",
                 pid: int | None = None) -> None:
        where = f" from worker {pid}" if pid is not None else ""
        super().__init__(
            f"Error deserializing a remote exception{where}: remote exception of type "
            f"{type_name}: {message}"
        )
        self.type_name = type_name
        self.message = message
        self.traceback_text = traceback_text
        self.pid = pid

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.type_name, self.message, self.traceback_text, self.pid))


class ProcessExitedException(DistexecError, _BrokenProcessPool):
    """The worker a call needed has exited (crashed, was killed, or was removed).

    Raised, unwrapped, by every call to a worker that is gone and to every caller that was
    waiting on a worker when it died. ``exitcode`` and ``signal`` are filled in when the master
    launched the process itself and could observe its exit; ``oom_evidence`` says why distexec
    believes the kernel's OOM killer sent a SIGKILL (the kernel log, or the memory cgroup's
    ``oom_kill`` counter), and is None without such evidence. It is also a
    ``concurrent.futures.process.BrokenProcessPool``, so code written for
    ``ProcessPoolExecutor`` that catches that catches a task lost with its worker.
    Julia: ``ProcessExitedException``.
    """

    def __init__(self, worker_id: int = -1, exitcode: int | None = None, signal: int | None = None,
                 reason: str | None = None, oom_evidence: str | None = None) -> None:
        super().__init__(worker_id, exitcode, signal)
        self.worker_id = worker_id
        self.exitcode = exitcode
        self.signal = signal
        self.reason = reason  # why distexec gave up on it, when it did (e.g. heartbeats)
        self.oom_evidence = oom_evidence

    def __str__(self) -> str:
        text = f"Worker {self.worker_id} has exited"
        if self.reason is not None:
            text = f"Worker {self.worker_id} was lost: {self.reason}"
        elif self.signal is not None:
            # Not a hint of memory by itself: rmprocs, interrupt and users send SIGKILL too.
            verb = "killed" if self.signal == _signal.SIGKILL else "terminated"
            text += f" ({verb} by {_signal_name(self.signal)}(-{self.signal}))"
            if self.oom_evidence is not None:
                text += f"; it ran out of memory: {self.oom_evidence}"
        elif self.exitcode is not None:
            text += f" (exit code {self.exitcode})"
        return text + "."

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.worker_id, self.exitcode, self.signal, self.reason,
                             self.oom_evidence))


class ResultPicklingError(_pickle.PicklingError, TypeError):
    """A call's result could not be pickled (or was too large) to be sent back.

    Raised, in place of the result, by ``remotecall_fetch``, ``fetch`` and an executor
    future's ``result()``; the worker is fine. ``type_name`` names the result's type (or its
    size, when only that is known); ``__cause__`` is the error pickling raised. It is a
    ``pickle.PicklingError`` and a ``TypeError``: ``ProcessPoolExecutor`` raises pickle's own
    ``TypeError`` ("cannot pickle '_thread.lock' object"), and ``except TypeError`` written for
    it still catches this. ``distexec.Pool`` reports it as multiprocessing's
    ``MaybeEncodingError``.
    """

    def __init__(self, type_name: str, reason: str) -> None:
        super().__init__(f"the result of the call ({type_name}) could not be sent: {reason}")
        self.type_name, self.reason = type_name, reason

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.type_name, self.reason))


class BrokenDistributedExecutor(DistexecError, _BrokenProcessPool):
    """A ``DistributedExecutor`` (or ``Pool``) can run no more tasks.

    Raised by ``submit`` and set on every queued future once the executor broke: a worker's
    initializer failed, or the workers it launched kept dying (see the message). It is a
    ``concurrent.futures.process.BrokenProcessPool`` (and so a ``BrokenExecutor``), as
    ``ProcessPoolExecutor`` raises in the same cases.
    """


class AllWorkersExited(ProcessExitedException, BrokenDistributedExecutor):
    """Every worker of a ``DistributedExecutor`` has exited, so a queued task had nowhere to run.

    The executor's queued futures fail with it. It is both the ``ProcessExitedException`` of
    the last worker lost (its id, and exit code or signal) and a
    ``concurrent.futures.BrokenExecutor``, so code that catches either sees it; a ``submit``
    afterwards raises a plain ``BrokenExecutor``.
    """

    def __str__(self) -> str:
        return f"All workers of this executor have exited; the last: {super().__str__()}"


class CompositeException(DistexecError, ExceptionGroup):
    """Several failures from one aggregate operation (``everywhere``, ``sync``, batched ``pmap``).

    An :class:`ExceptionGroup`, so ``except*`` works; ``.exceptions`` lists the failures.
    Julia: ``CompositeException``.
    """

    def __new__(cls, exceptions: Iterable[Exception],
                message: str = "multiple errors") -> CompositeException:
        return super().__new__(cls, message, list(exceptions))

    def __init__(self, exceptions: Iterable[Exception], message: str = "multiple errors") -> None:
        super().__init__(message, list(exceptions))

    # The builtin also derives groups of BaseExceptions; a CompositeException holds only
    # Exceptions, so its parts do too (on 3.10 the backport has no types: unused there).
    def derive(self, excs: Sequence[Exception]) -> CompositeException:  # type: ignore[override,unused-ignore]
        return CompositeException(excs, self.message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (list(self.exceptions), self.message))

    def __str__(self) -> str:
        """The first failure, where it happened, and how many others: ``NameError on worker
        2: name 'x' is not defined (and 2 more errors)``. The builtin's "multiple errors (3
        sub-exceptions)" names none of them, and a traceback prints only this line last."""
        text = _one_line(self.exceptions[0])
        if self.message != "multiple errors":
            text = f"{self.message}: {text}"
        more = len(self.exceptions) - 1
        if more:
            text += f" (and {more} more error{'s' if more > 1 else ''})"
        return text


def _one_line(exc: BaseException) -> str:
    """``Type on worker N: message`` for a remote failure, else ``Type: message``."""
    if isinstance(exc, RemoteException):
        return _remote_one_line(exc)
    return f"{type(exc).__name__}: {_safe_str(exc)}"


def _remote_one_line(exc: RemoteException) -> str:
    """The original error of a remote failure; a nested one (worker 2 called worker 3, which
    failed) names where it happened first and the way it came."""
    original = exc.captured.ex
    if isinstance(original, RemoteException):
        return f"{_remote_one_line(original)} (through {_process(exc.pid)})"
    if isinstance(original, RemoteDeserializationError):
        message = original.message  # its own text is about the failed rebuild
    else:
        message = _safe_str(original)
    return f"{exc.captured.type_name} on {_process(exc.pid)}: {message}"


def _process(pid: int) -> str:
    return "the master (process 1)" if pid == 1 else f"worker {pid}"


class LaunchWorkerError(DistexecError, RuntimeError):
    """A worker process could not be started or did not report its address.

    Raised by ``addprocs`` (through the cluster manager) with one of Julia's three messages.
    """


class AuthenticationError(DistexecError):
    """A peer failed the cookie challenge, or rejected ours.

    Raised on the initiating side of a connection whose handshake failed; the accepting side
    logs it and closes the connection.
    """


class ProtocolError(DistexecError):
    """A peer sent bytes that break the wire protocol (bad magic, version, length or type)."""


class MessageTooLarge(ProtocolError):
    """A message is larger than the configured ``max_message_size``; nothing was sent."""


def _qualname(tp: type) -> str:
    module = getattr(tp, "__module__", None)
    name = getattr(tp, "__qualname__", getattr(tp, "__name__", repr(tp)))
    return name if module in (None, "builtins") else f"{module}.{name}"


def _safe_str(ex: object) -> str:
    try:
        return str(ex)
    except Exception:  # a broken __str__ must not hide the failure being reported
        return f"<unprintable {type(ex).__name__}>"


def _signal_name(signum: int) -> str:
    try:
        return _signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
