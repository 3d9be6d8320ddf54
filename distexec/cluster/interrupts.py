"""``interrupt`` and its escalation: a worker that does not stop an interrupted call is killed.

Owns delivering an interrupt through each worker's manager and the watch that follows it.
Imports ``distexec.errors``, ``distexec.protocol`` and ``distexec.runtime``. Julia:
``interrupt``; the escalation ladder is the one of Julia's ``rmprocs``/``kill(::LocalManager)``.

    interrupt(pids, grace) ──► manager.manage(pid, config, "interrupt")   (LocalManager: SIGINT)
        └─► a watch per worker: wait ``grace`` (or until the worker leaves)
              └─► ask the worker when each of its running calls began
                    ├─ none began before the interrupt ──► nothing (idle, or on to new calls)
                    └─ one did, or no answer within QUERY_TIMEOUT (C code holding the GIL)
                          ├─ local worker ──► SIGTERM ──(TERM_WAIT)──► SIGKILL, a log line each
                          └─ other managers ──► manager.kill(pid, config)

Only a call that was already running when the interrupt was sent counts: a worker that
stopped it and went on to a new call is left alone. The caller of a killed worker's calls
gets ``ProcessExitedException``, whose reason names the interrupt.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import threading
import time

from ..errors import DistexecError
from ..protocol import serialization
from ..protocol.frames import Flag, Kind
from ..runtime.calls import ReplySlot
from ..runtime.context import ClusterContext, WorkerRecord, WorkerState
from ..runtime.runner import running_calls
from .manager import terminate_then_kill

log = logging.getLogger("distexec")

GRACE_ENV = "DISTEXEC_INTERRUPT_GRACE"
DEFAULT_GRACE = 10.0
"""Seconds an interrupted call gets to stop before its worker is terminated."""

QUERY_TIMEOUT = 1.0
"""Seconds a worker gets to say which calls it runs; silence means it is stuck (GIL held)."""

TERM_WAIT = 1.0
"""Seconds between SIGTERM and SIGKILL for a local worker."""


def interrupt_grace(grace: float | None = None) -> float:
    """``grace`` checked, or ``DISTEXEC_INTERRUPT_GRACE`` (default 10 s); ``inf``: never kill."""
    source = "grace"
    if grace is None:
        source = GRACE_ENV
        text = os.environ.get(GRACE_ENV, "").strip()
        try:
            grace = float(text) if text else DEFAULT_GRACE
        except ValueError:
            raise ValueError(f"{GRACE_ENV} must be a number of seconds, got {text!r}") from None
    if isinstance(grace, bool) or not isinstance(grace, (int, float)) or math.isnan(grace) \
            or grace < 0:
        raise ValueError(f"{source} must be a number of seconds >= 0 (math.inf: never "
                         f"escalate), got {grace!r}")
    return float(grace)


def watch(ctx: ClusterContext, record: WorkerRecord, grace: float, signalled_at: float) -> None:
    """Terminate ``record``'s worker if a call it ran at ``signalled_at`` outlives ``grace``."""
    if math.isinf(grace):
        return
    threading.Thread(target=_watch, args=(ctx, record, grace, signalled_at), daemon=True,
                     name=f"distexec-interrupt-{record.pid}").start()


def _watch(ctx: ClusterContext, record: WorkerRecord, grace: float, signalled_at: float) -> None:
    if not _wait_while_member(ctx, record, signalled_at + grace):
        return
    verdict = _old_calls_running(ctx, record, signalled_at)
    if verdict is None or not _is_member(ctx, record):
        return
    if not verdict:
        log.debug("Worker %d stopped its interrupted calls within %g s", record.pid, grace)
        return
    record.lost_reason = (f"it still ran an interrupted call {grace:g} s after interrupt() "
                          f"(the grace; see {GRACE_ENV}), so it was terminated")
    try:
        _escalate(ctx, record, grace)
    except Exception:
        log.exception("could not terminate worker %d after an ignored interrupt", record.pid)


def _is_member(ctx: ClusterContext, record: WorkerRecord) -> bool:
    """Still this worker's record, and not being removed (rmprocs has its own ladder)."""
    return ctx.peers.get(record.pid) is record and record.state == WorkerState.CONNECTED


def _wait_while_member(ctx: ClusterContext, record: WorkerRecord, until: float) -> bool:
    """Sleep until ``until``; False as soon as the worker leaves (or is being removed)."""
    with ctx.lock:
        while _is_member(ctx, record) and not ctx.closed:
            left = until - time.monotonic()
            if left <= 0:
                return True
            ctx.changed.wait(left)
    return False


def _old_calls_running(ctx: ClusterContext, record: WorkerRecord,
                       signalled_at: float) -> bool | None:
    """Whether a call begun before ``signalled_at`` still runs on the worker; None: it left.

    No answer within :data:`QUERY_TIMEOUT` counts as yes: only a worker whose Python threads
    cannot run (C code holding the GIL) fails to answer so small a question.
    """
    pid = record.pid
    slot, notify = ReplySlot(pid), ctx.next_rrid()
    try:
        payload, buffers = serialization.dumps((running_calls, (), {}), pid)
        ctx.add_waiter(notify, slot)
        asked_at = time.monotonic()
        # BACKGROUND: answered on a spare thread, even while user code holds the main one
        ctx.send(pid, Kind.CALL_FETCH, payload=payload, buffers=buffers, notify=notify,
                 flags=Flag.BACKGROUND)
    except (DistexecError, OSError):
        ctx.pop_waiter(notify)
        return None
    if not slot.arrived(QUERY_TIMEOUT):
        ctx.pop_waiter(notify)
        log.debug("Worker %d did not answer within %g s", pid, QUERY_TIMEOUT)
        return True
    answered_at = time.monotonic()
    if slot.is_error:
        return None  # it died meanwhile (or cannot answer at all): nothing left to stop
    worker_now, starts = slot.value
    return any(began < signalled_at for began in
               _on_our_clock(worker_now, starts, asked_at, answered_at))


def _on_our_clock(worker_now: float, starts: list[float], asked_at: float,
                  answered_at: float) -> list[float]:
    """The worker's call start times on this process's monotonic clock.

    A worker on this host shares the clock (Linux's CLOCK_MONOTONIC is system-wide): its "now"
    then falls between our question and its answer, and its times are ours. Another host's
    clock is unrelated: its times are shifted so that its "now" is the middle of the exchange.
    """
    if asked_at <= worker_now <= answered_at:
        return starts
    shift = (asked_at + answered_at) / 2 - worker_now
    return [began + shift for began in starts]


def _escalate(ctx: ClusterContext, record: WorkerRecord, grace: float) -> None:
    pid = record.pid
    process = getattr(record.config, "process", None)
    if pid not in ctx.local_launched or not isinstance(process, subprocess.Popen):
        log.warning("Worker %d still runs an interrupted call %g s after interrupt(); "
                    "asking its manager to kill it", pid, grace)
        record.manager.kill(pid, record.config)
        return
    log.warning("Worker %d still runs an interrupted call %g s after interrupt(); "
                "sending SIGTERM", pid, grace)
    terminate_then_kill(pid, process, TERM_WAIT)
