"""Remote calls: the caller's side (send, wait for the reply) and the callee's side (run it).

Owns the four call forms and what happens to a call's result and errors. Imports
``distexec.errors``, ``distexec.protocol`` and the sibling runtime modules.

    caller                                      callee
    remotecall_fetch ── CALL_FETCH(notify) ──►  call thread: unpickle, run, pickle the result
        ReplySlot.wait ◄──── RESULT(notify) ──  (a result that cannot be pickled becomes an error)
    remotecall ──────── CALL(response) ──────►  call thread: keep the result under `response`
        Future done ◄────── DONE(response) ───
    remotecall_wait ─── CALL_WAIT(both) ─────►  keep the result, then RESULT(ok or error)
    remote_do ───────── REMOTE_DO ───────────►  run; errors are printed on the callee

Calls to this process itself run here without pickling (``remotecall_fetch`` in the calling
thread), and still report errors as ``RemoteException`` so callers see one type.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any, Callable

from ..errors import MessageTooLarge, RemoteException, ResultPicklingError
from ..protocol import serialization
from ..protocol.frames import RRID, Flag, Kind
from ..protocol.tracebacks import capture
from . import owned, refs
from .context import ClusterContext

log = logging.getLogger("distexec")


class ReplySlot:
    """Where a caller waits for one RESULT. Julia: the temporary ``RemoteValue`` of a call."""

    __slots__ = ("waitingfor", "_event", "value", "is_error")

    def __init__(self, waitingfor: int):
        self.waitingfor = waitingfor
        self._event = threading.Event()
        self.value: Any = None
        self.is_error = False

    def deliver(self, value: Any, is_error: bool) -> None:
        self.value, self.is_error = value, is_error
        self._event.set()

    def fail(self, exc: BaseException) -> None:
        self.deliver(exc, True)

    def done(self) -> bool:
        return self._event.is_set()

    def arrived(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds for the reply; whether it came."""
        return self._event.wait(timeout)

    def wait(self) -> Any:
        self._event.wait()
        if self.is_error:
            raise self.value
        return self.value


# --------------------------------------------------------------------------------------------
# Caller side
# --------------------------------------------------------------------------------------------
def remotecall_fetch(ctx: ClusterContext, fn: Callable, pid: int, args: tuple, kwargs: dict) -> Any:
    """Run ``fn`` on ``pid`` and return its value; one round trip. Julia: ``remotecall_fetch``."""
    if pid == ctx.myid:
        is_error, value = invoke(ctx, fn, args, kwargs)
        if is_error:
            raise value
        return value
    slot = ReplySlot(pid)
    rrid = ctx.next_rrid()
    _send_with_waiter(ctx, pid, Kind.CALL_FETCH, (fn, args, kwargs), rrid, slot, notify=rrid)
    return _wait(ctx, rrid, slot)


def remotecall(ctx: ClusterContext, fn: Callable, pid: int, args: tuple, kwargs: dict, *,
               background: bool = False):
    """Start ``fn`` on ``pid``; return a Future for its result. Julia: ``remotecall``."""
    rrid = ctx.next_rrid()
    if pid == ctx.myid:
        owned.lookup(ctx, rrid, owned._Cell)
        future = refs.Future._existing(ctx, pid, rrid)
        ctx.runner.submit(lambda: _run_local_call(ctx, rrid, fn, args, kwargs))
        return future
    ctx.connection_for(pid)  # fail fast (unknown or dead pid) before making the Future
    future = refs.Future._existing(ctx, pid, rrid)
    ctx.send(pid, Kind.CALL, (fn, args, kwargs), response=rrid, flags=_flags(background))
    return future


def _run_local_call(ctx: ClusterContext, rrid: RRID, fn: Callable, args: tuple, kwargs: dict):
    is_error, value = invoke(ctx, fn, args, kwargs)
    owned.store_result(ctx, rrid, value, is_error)


def remotecall_wait(ctx: ClusterContext, fn: Callable, pid: int, args: tuple, kwargs: dict):
    """Run ``fn`` on ``pid``, wait until it finished, return the Future. Julia: ``remotecall_wait``."""
    if pid == ctx.myid:
        return remotecall(ctx, fn, pid, args, kwargs).wait()
    ctx.connection_for(pid)
    rrid, notify = ctx.next_rrid(), ctx.next_rrid()
    future = refs.Future._existing(ctx, pid, rrid)
    slot = ReplySlot(pid)
    _send_with_waiter(ctx, pid, Kind.CALL_WAIT, (fn, args, kwargs), notify, slot,
                      response=rrid, notify=notify)
    try:
        _wait(ctx, notify, slot)
    except RemoteException as exc:
        future._mark_done(exc)
        raise
    future._mark_done(None)  # no DONE message follows a CALL_WAIT: the reply says it is done
    return future


def remote_do(ctx: ClusterContext, fn: Callable, pid: int, args: tuple, kwargs: dict, *,
              background: bool = False) -> None:
    """Run ``fn`` on ``pid`` without waiting; errors are printed there. Julia: ``remote_do``."""
    if pid == ctx.myid:
        ctx.runner.submit(lambda: _report_remote_do(ctx, *invoke(ctx, fn, args, kwargs)))
        return
    ctx.send(pid, Kind.REMOTE_DO, (fn, args, kwargs), flags=_flags(background))


def _flags(background: bool) -> Flag:
    """``background``: the library's own bookkeeping, which must not occupy the callee's main
    thread, where user calls run so that ``interrupt`` can stop them even in ``time.sleep``."""
    return Flag.BACKGROUND if background else Flag.NONE


def _send_with_waiter(ctx, pid, kind, obj, rrid, slot, **ids) -> None:
    payload, buffers = serialization.dumps(obj, pid)  # pickling errors: raised, nothing sent
    ctx.add_waiter(rrid, slot)
    try:
        ctx.send(pid, kind, payload=payload, buffers=buffers, **ids)
    except BaseException:
        ctx.pop_waiter(rrid)
        raise


def _wait(ctx: ClusterContext, rrid: RRID, slot: ReplySlot) -> Any:
    try:
        ctx.read_while_waiting(slot.waitingfor, slot.done)
        return slot.wait()
    finally:
        ctx.pop_waiter(rrid)  # gone already unless the wait was interrupted


# --------------------------------------------------------------------------------------------
# Callee side
# --------------------------------------------------------------------------------------------
def invoke(ctx: ClusterContext, fn: Callable, args: tuple, kwargs: dict) -> tuple[bool, Any]:
    """Run user code; returns (is_error, value or RemoteException)."""
    try:
        with ctx.runner.user_code():
            return False, fn(*args, **kwargs)
    except BaseException as exc:  # SystemExit and KeyboardInterrupt fail the call, not the worker
        if exc.__traceback__ is not None:
            exc.__traceback__ = exc.__traceback__.tb_next  # drop this frame
        return True, RemoteException(ctx.myid, capture(exc))


def run_incoming_call(ctx: ClusterContext, source: int, frame) -> None:
    """Execute one CALL/CALL_FETCH/CALL_WAIT/REMOTE_DO frame (on a call thread)."""
    header = frame.header
    try:
        with serialization.receiving(ctx, source):
            fn, args, kwargs = serialization.loads(frame.payload, frame.buffers)
        is_error, value = invoke(ctx, fn, args, kwargs)
    except BaseException as exc:  # the call could not even be unpickled
        is_error, value = True, RemoteException(ctx.myid, capture(exc))
    kind = header.kind
    if kind == Kind.CALL_FETCH:
        reply(ctx, source, header.notify, value, is_error)
    elif kind == Kind.CALL:
        owned.store_result(ctx, header.response, value, is_error)
    elif kind == Kind.CALL_WAIT:
        owned.store_result(ctx, header.response, value, is_error, notify=False)
        reply(ctx, source, header.notify, value if is_error else None, is_error)
    else:
        _report_remote_do(ctx, is_error, value)


#: Types of values that send themselves as one or more RESULT messages: type -> function(ctx,
#: dest, notify, value). ``runtime.batches`` registers the outcomes of an executor batch.
SELF_SENDING: dict[type, Callable] = {}


def reply(ctx: ClusterContext, dest: int, notify: RRID, value: Any, is_error: bool) -> None:
    """Send a RESULT; a value that cannot be pickled or sent fails only this call."""
    send_itself = SELF_SENDING.get(type(value))
    try:
        if send_itself is not None:
            send_itself(ctx, dest, notify, value)
            return
        payload, buffers = serialization.dumps(value, dest)
        ctx.connection_for(dest).send(Kind.RESULT, payload, buffers, response=notify,
                                      flags=Flag.ERROR if is_error else Flag.NONE)
        return
    except OSError:
        return  # the caller is gone; nobody is waiting
    except Exception as exc:  # pickling failed (any error a __reduce__ may raise) or too large
        error = unsendable(ctx, value, exc)
    try:
        payload, buffers = serialization.dumps(error, dest)
        ctx.connection_for(dest).send(Kind.RESULT, payload, buffers, response=notify,
                                      flags=Flag.ERROR)
    except Exception:
        log.exception("could not report an unsendable result to process %d", dest)


def unsendable(ctx: ClusterContext, value: Any, exc: BaseException, *,
               what: str | None = None) -> RemoteException:
    """The error a call fails with when its result ``value`` could not be pickled or sent."""
    what = what or type(value).__qualname__
    error = ResultPicklingError(what, f"{type(exc).__name__}: {exc}")
    # A pickling error's traceback leads to the __reduce__ that failed; a size's only through
    # distexec's own sending code, and its message is in this one's already.
    error.__cause__ = None if isinstance(exc, MessageTooLarge) else exc
    return RemoteException(ctx.myid, capture(error))


def _report_remote_do(ctx: ClusterContext, is_error: bool, value: Any) -> None:
    if is_error:
        print(f"Error in remote_do on process {ctx.myid}:\n{value.captured.traceback_text}",
              file=sys.stderr, flush=True)
