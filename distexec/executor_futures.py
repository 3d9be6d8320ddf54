"""The futures of a DistributedExecutor, and how a task's outcome completes one.

Owns the executor's ``Future`` subclass (falsey exceptions raised, the reply read by the
waiting thread, done-callbacks one at a time), a queued task, and turning a remote error back
into the user's own exception. Imports ``distexec.runtime`` and ``distexec.errors``.
"""

from __future__ import annotations

import concurrent.futures as cf
import sys
import threading
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, RUNNING
from typing import Any

from .errors import RemoteDeserializationError, RemoteException, WaitTimeout
from .errors import RemoteTraceback as RemoteTraceback  # where distexec.Pool looks for it
from .runtime.refs import invoke_callbacks_guarded

_FINISHED = frozenset((CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED))
_calling_back = threading.local()  # .lock: the callback lock of the callbacks this thread runs


def in_callbacks_of(callback_lock) -> bool:
    """Whether this thread is running done-callbacks of the futures ``callback_lock`` guards,
    as their completion runs them (where results arrive: nothing arrives while they run)."""
    return getattr(_calling_back, "lock", None) is callback_lock


def original_exception(remote: RemoteException) -> BaseException:
    """The user's exception from a RemoteException, as ``ProcessPoolExecutor`` raises one.

    The remote traceback is its ``__cause__`` (a ``RemoteTraceback``: it also survives
    libraries that drop ``__traceback__``), printed above the caller's frames, and a note
    names the worker.
    """
    ex = remote.captured.ex
    if isinstance(ex, (RemoteDeserializationError, RemoteException)) or ex is None:
        return remote
    ex.__cause__ = remote.__cause__
    note = f"(raised on worker {remote.pid})"
    notes = getattr(ex, "__notes__", None)
    if notes is None or note not in notes:
        if sys.version_info >= (3, 11):
            ex.add_note(note)
        else:  # Python 3.10: the exceptiongroup backport displays __notes__
            ex.__notes__ = [*(notes or ()), note]  # type: ignore[attr-defined]  # 3.11+ in stubs
    return ex


class ExecutorFuture(cf.Future):
    """The executor's future: a stdlib Future that raises falsey exceptions too.

    Python < 3.14 tests the exception's truth in ``result()`` (gh-132063), so an exception
    whose ``__bool__`` or ``__len__`` says False made ``result()`` return None.

    Done-callbacks of one executor's futures run one at a time (``callback_lock``), as they
    do on ProcessPoolExecutor's one management thread, although results arrive on one reader
    thread per worker. As there, a callback must not wait for another future of its executor.
    """

    def __init__(self, callback_lock=None) -> None:
        super().__init__()
        self._callback_lock = callback_lock

    def _invoke_callbacks(self) -> None:  # on a reader thread: sys.exit in one must not end it
        lock = self._callback_lock
        if lock is None or not self._done_callbacks:  # type: ignore[attr-defined]
            invoke_callbacks_guarded(self)
            return
        with lock:
            outer, _calling_back.lock = getattr(_calling_back, "lock", None), lock
            try:
                invoke_callbacks_guarded(self)
            finally:
                _calling_back.lock = outer

    def add_done_callback(self, fn) -> None:
        lock = self._callback_lock
        if lock is None:
            super().add_done_callback(fn)
            return
        with lock:  # a future done already runs ``fn`` here and now: still one at a time
            super().add_done_callback(fn)

    def _Future__get_result(self):  # the name-mangled private method result() calls
        if self._exception is not None:
            try:
                raise self._exception
            finally:
                # break the cycle through the exception's traceback (the stdlib's idiom)
                self = None  # type: ignore[assignment]
        return self._result

    # Where the task went, once sent: (context, pid). A caller that waits without a timeout
    # reads that connection itself rather than being woken by its reader thread, unless the
    # task is known to run long: taking the read role over wakes the reader thread, which
    # costs more CPU than it saves when the reply is far off (executor: BatchSizer.is_short).
    _sent_to: tuple[Any, int] | None = None
    _reading: Any = None  # the connection a waiting thread reads for this future, meanwhile

    def _read_while_waiting(self) -> None:
        sent_to = self._sent_to
        if sent_to is not None and self._state == RUNNING:
            ctx, pid = sent_to
            ctx.read_while_waiting(pid, self._finished, self)

    def _finished(self) -> bool:
        """``done()`` without its lock: asked after every frame and poll of a waiting read, and
        the state is one attribute, read whole."""
        return self._state in _FINISHED

    def set_result(self, result) -> None:
        super().set_result(result)
        self._wake_reading()

    def set_exception(self, exception) -> None:
        super().set_exception(exception)
        self._wake_reading()

    def _wake_reading(self) -> None:
        """Completed by another thread (a retry elsewhere, a broken executor) while a waiting
        thread reads the connection the task first went to: it must look up."""
        reading = self._reading
        if reading is not None:
            reading.poke()

    def result(self, timeout=None):
        return self._after_reading(super().result, timeout)

    def exception(self, timeout=None):
        return self._after_reading(super().exception, timeout)

    def _after_reading(self, get, timeout):
        if timeout is None:
            self._read_while_waiting()
        try:
            return get(timeout)
        except cf.TimeoutError as exc:
            if sys.version_info >= (3, 11) or self.done():
                raise  # 3.11: the builtin TimeoutError already; or the task itself raised it
            raise WaitTimeout(*exc.args) from None  # 3.10: a timeout that is also the builtin


class Task:
    __slots__ = ("future", "fn", "args", "kwargs", "started", "shipped")

    def __init__(self, future, fn, args, kwargs):
        self.future, self.fn, self.args, self.kwargs = future, fn, args, kwargs
        self.started = False
        # the __main__ globals its pickle carries (serialization.dumps_tracked)
        self.shipped: dict[str, int] = {}

    def start(self) -> bool:
        """Mark the future running unless it was cancelled; False: drop the task.

        A started task that could not be sent is queued again, and starts only once.
        """
        if not self.started:
            self.started = self.future.set_running_or_notify_cancel()
        return self.started


def complete(future: cf.Future, is_error: bool, value: Any) -> None:
    if is_error:
        future.set_exception(original_exception(value) if isinstance(value, RemoteException)
                             else value)
    else:
        future.set_result(value)
