"""Worker lifecycle callbacks and worker statuses (master only).

Owns the four callback registries' rules (validation, concurrent runs, what happens to their
errors) and the status store. Imports ``distexec.runtime`` and below. Julia:
``add_worker_*_callback``, ``setstatus!``/``getstatus``.
"""

from __future__ import annotations

import concurrent.futures as cf
import inspect
import logging
import time
import uuid
from collections.abc import Hashable
from typing import Callable

from ..runtime.context import ClusterContext
from ..runtime.runner import in_thread

log = logging.getLogger("distexec")

KINDS = {  # kind -> (example arguments for the signature check, their description)
    "starting": ((object(), {}), "f(manager, params: dict)"),
    "started": ((2,), "f(pid: int)"),
    "exiting": ((2,), "f(pid: int)"),
    "exited": ((2, "terminated"), "f(pid: int, state)"),
}


def add_callback(ctx: ClusterContext, kind: str, fn: Callable,
                 key: Hashable | None = None) -> Hashable:
    args, described = KINDS[kind]
    try:
        inspect.signature(fn).bind(*args)
    except TypeError:
        raise TypeError("Callback function is invalid, it must be able to be called with these "
                        f"argument types: {described}") from None
    except ValueError:
        pass  # builtins without a signature: trust the caller
    if key is None:  # unique per registration, like Julia's gensym: fn may be added twice
        key = f"{getattr(fn, '__qualname__', 'callback')}-{uuid.uuid4().hex[:12]}"
    with ctx.lock:
        registry = ctx.callbacks[kind]
        if key in registry:
            raise ValueError(f"A callback function with key '{key}' already exists")
        registry[key] = fn
    return key


def remove_callback(ctx: ClusterContext, kind: str, key: Hashable) -> None:
    with ctx.lock:
        ctx.callbacks[kind].pop(key, None)


def run_callbacks(ctx: ClusterContext, kind: str, argsets, *, timeout: float | None = None,
                  warning_interval: float = 10.0) -> list[tuple[Hashable, BaseException]]:
    """Run every ``kind`` callback once per argument tuple, concurrently.

    Returns the errors as ``(key, exception)`` pairs.

    With ``timeout``, stops waiting after that many seconds (logging which are still running).
    """
    with ctx.lock:
        registry = dict(ctx.callbacks[kind])
    if not registry:
        return []
    running: dict[cf.Future, Hashable] = {}
    for key, fn in registry.items():
        for args in argsets:
            running[in_thread(fn, *args, name="distexec-callback")] = key
    return _collect(kind, running, timeout, warning_interval)


def _collect(kind, running, timeout, warning_interval) -> list[tuple[Hashable, BaseException]]:
    deadline = None if timeout is None else time.monotonic() + timeout
    pending = set(running)
    while pending:
        wait_for = warning_interval
        if deadline is not None:
            wait_for = min(wait_for, max(deadline - time.monotonic(), 0))
        _done, pending = cf.wait(pending, timeout=wait_for)
        keys = ", ".join(sorted({f"'{running[f]}'" for f in pending}))
        if pending and deadline is not None and time.monotonic() >= deadline:
            log.warning("Some worker-%s callbacks have not yet finished, continuing anyway. "
                        "These are the callbacks still running: %s", kind, keys)
            break
        if pending:
            log.warning("Waiting for these worker-%s callbacks to finish: %s", kind, keys)
    return [(key, f.exception()) for f, key in running.items()
            if f.done() and f.exception() is not None]


def run_exited_callbacks(ctx: ClusterContext, record) -> None:
    """Run the exited callbacks of a deregistered worker, then forget its statuses.

    ``getstatus(pid)`` keeps working for the dead pid while they run (Julia: the scoped
    "currently exiting pid"); the mark is on the record, so workers exiting at the same
    time do not hide each other's statuses. Errors are logged with the callback's key.
    """
    record.userdata["exiting"] = True
    try:
        for key, error in run_callbacks(ctx, "exited", [(record.pid, record.state)]):
            log.error("Error when running worker-exited callback '%s'", key,
                      exc_info=(type(error), error, error.__traceback__))
    finally:
        with ctx.lock:
            record.userdata.pop("exiting", None)
            ctx.statuses.pop(record.pid, None)


def set_status(ctx: ClusterContext, pid: int, value) -> None:
    with ctx.lock:
        _check_exists(ctx, pid, "set")
        ctx.statuses[pid] = value


def get_status(ctx: ClusterContext, pid: int):
    with ctx.lock:
        dead = ctx.deleted.get(pid)
        if dead is None or not dead.userdata.get("exiting"):
            _check_exists(ctx, pid, "get")
        return ctx.statuses.get(pid)


def _check_exists(ctx: ClusterContext, pid: int, verb: str) -> None:
    if pid not in ctx.live_pids():
        raise ValueError(f"Worker {pid} does not exist, cannot {verb} its status")
