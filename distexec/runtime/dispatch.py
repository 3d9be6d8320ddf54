"""What a process does with each incoming frame: one table, kind -> handler.

Owns the routing of frames read by a connection's reader thread. Imports the sibling
runtime modules, ``distexec.protocol`` and ``distexec.errors``.

    reader thread ──► on_frame ──► CALL, CALL_FETCH, CALL_WAIT, REMOTE_DO ──► CallRunner
                                   (IN_ORDER: the main thread's lane; else a free thread)
                                  RESULT, DONE, GC ─────────────────────────► inline (cheap)
                                  JOIN, IDENTIFY ───────────────────────────► ctx.handlers
                                                                               (cluster layer)

Inline handlers never run user code beyond unpickling a result value; everything that runs a
user function goes to a call thread, so a slow call never stops a connection being served.
"""

from __future__ import annotations

import logging

from ..errors import ProtocolError, RemoteException
from ..protocol import serialization
from ..protocol.frames import Flag, Kind
from ..protocol.tracebacks import capture
from . import calls, gc
from .context import ClusterContext

log = logging.getLogger("distexec")

_CALL_KINDS = (Kind.CALL, Kind.CALL_FETCH, Kind.CALL_WAIT, Kind.REMOTE_DO)
# Flags tested on every message, as plain ints: an IntFlag operator runs Python code.
_ERROR, _BACKGROUND, _IN_ORDER = Flag.ERROR.value, Flag.BACKGROUND.value, Flag.IN_ORDER.value


def on_frame(ctx: ClusterContext, conn, frame) -> None:
    kind = frame.header.kind
    source = conn.peer_pid
    if source is None:  # only the cluster layer's join/identify may come before an identity
        if kind == Kind.PING:
            return  # harmless from an authenticated peer that is still joining
        handler = ctx.handlers.get(kind)
        if handler is None:
            raise ProtocolError(f"{kind.name} message before the peer identified itself")
        handler(ctx, conn, frame)
        return
    handler = _HANDLERS.get(kind) or ctx.handlers.get(kind)
    if handler is None:
        raise ProtocolError(f"unexpected {kind.name} message")
    handler(ctx, conn, frame)


def _on_call(ctx: ClusterContext, conn, frame) -> None:
    if frame.header.kind in (Kind.CALL, Kind.CALL_WAIT):  # both keep their result here
        from .owned import _Cell, lookup
        lookup(ctx, frame.header.response, _Cell)  # exists before any later release arrives
    source = conn.peer_pid
    flags = int(frame.header.flags)
    if flags & _IN_ORDER:  # an executor task: ProcessPoolExecutor's model (runtime.runner)
        ctx.runner.submit_in_order(lambda: calls.run_incoming_call(ctx, source, frame))
        return
    ctx.runner.submit(lambda: calls.run_incoming_call(ctx, source, frame),
                      main=not flags & _BACKGROUND)


def _decode_value(ctx: ClusterContext, conn, frame):
    """Unpickle a RESULT/DONE payload; a payload that fails becomes that waiter's error."""
    try:
        with serialization.receiving(ctx, conn.peer_pid):
            value = serialization.loads(frame.payload, frame.buffers)
    except Exception as exc:
        return True, RemoteException(ctx.myid, capture(exc))
    return bool(int(frame.header.flags) & _ERROR), value


def _on_result(ctx: ClusterContext, conn, frame) -> None:
    waiter = ctx.pop_waiter(frame.header.response)
    if waiter is None:
        return  # the caller gave up (interrupted); nobody wants this value
    if conn.before_results is not None:
        conn.before_results()  # what the call printed is shown before its result
    is_error, value = _decode_value(ctx, conn, frame)
    waiter.deliver(value, is_error)


def _on_done(ctx: ClusterContext, conn, frame) -> None:
    future = ctx.client_refs.get(frame.header.response)
    if future is None:
        return
    if conn.before_results is not None:
        conn.before_results()
    if frame.header.flags & Flag.NO_VALUE:
        future._mark_done(None)
        return
    _is_error, exc = _decode_value(ctx, conn, frame)
    future._mark_done(exc)


def _on_gc(ctx: ClusterContext, conn, frame) -> None:
    try:
        entries = gc.decode(frame.payload)
    except ValueError as exc:
        raise ProtocolError(str(exc)) from None
    gc.apply_entries(ctx, entries)


_HANDLERS = {
    Kind.CALL: _on_call,
    Kind.CALL_FETCH: _on_call,
    Kind.CALL_WAIT: _on_call,
    Kind.REMOTE_DO: _on_call,
    Kind.RESULT: _on_result,
    Kind.DONE: _on_done,
    Kind.GC: _on_gc,
    Kind.PING: lambda ctx, conn, frame: None,  # receiving it was the point (heartbeat)
}
