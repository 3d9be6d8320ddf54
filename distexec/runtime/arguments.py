"""Checks of the worker ids and functions users pass, shared by every public entry point.

Owns the rules, so that each API rejects bad input with the same error and words:

* a worker id (pid) is an integer (numpy's too), never a bool, a float or a string. A string
  is iterable: without this check ``rmprocs("3")`` removed worker 3 and ``WorkerPool("23")``
  held workers 2 and 3;
* several pids come as arguments, as iterables of pids, or both (Julia's ``rmprocs(2, [3, 4])``);
* a pid the master never had is a ``DistributedError``, with the words of ``remotecall``;
* what a call runs must be callable, checked in the caller before anything is sent.

Imports ``distexec.errors`` and ``runtime.context``.
"""

from __future__ import annotations

import numbers
import reprlib
from collections.abc import Iterable
from typing import Any

from ..errors import DistributedError
from .context import ClusterContext


def is_pid(x: object) -> bool:
    """Whether ``x`` is one worker id: any integer (numpy's too), but not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_pid(x: object, what: str) -> int:
    """``x`` as an int; ``TypeError`` naming ``what`` (the API) when it is not a worker id."""
    if not is_pid(x):
        raise TypeError(f"{what} takes a worker id (int), not {_shown(x)}")
    return int(x)  # type: ignore[call-overload]  # an Integral


def check_pid_list(pids: object, what: str) -> list[int]:
    """The pids of one iterable of worker ids; a string or a single number is refused."""
    if isinstance(pids, (str, bytes)) or not isinstance(pids, Iterable):
        raise TypeError(f"{what} takes an iterable of worker ids (int), not {_shown(pids)}")
    return [_pid_in(pid, what) for pid in pids]


def check_pid_args(pids: Iterable[object], what: str) -> list[int]:
    """The pids of ``f(*pids)`` where each argument is a pid or an iterable of pids."""
    out: list[int] = []
    for item in pids:
        if is_pid(item):
            out.append(int(item))  # type: ignore[call-overload]  # an Integral
        elif isinstance(item, (str, bytes)) or not isinstance(item, Iterable):
            raise TypeError(f"{what} takes worker ids (int) or iterables of them, "
                            f"not {_shown(item)}")
        else:
            out.extend(_pid_in(pid, what) for pid in item)
    return out


def _pid_in(pid: object, what: str) -> int:
    if not is_pid(pid):
        raise TypeError(f"{what} takes worker ids (int), not {_shown(pid)}")
    return int(pid)  # type: ignore[call-overload]  # an Integral


def check_exists(ctx: ClusterContext, pid: int) -> None:
    """On the master: ``DistributedError`` for a pid it never had (as ``remotecall`` says).

    A pid that existed and is gone passes: what that means depends on the caller.
    """
    if ctx.role == "master" and pid != ctx.myid and ctx.record(pid) is None \
            and pid not in ctx.deleted:
        raise DistributedError(f"no process with id {pid} exists")


def check_callable(fn: object, what: str) -> None:
    """``TypeError`` in the caller, before anything is sent, when ``fn`` cannot be called."""
    if not callable(fn):
        raise TypeError(f"{what} needs a callable as the function to run, not {_shown(fn)}")


def _shown(x: Any) -> str:
    """``str '23'``: the type, then a short repr (a user's object may be huge)."""
    return f"{type(x).__name__} {reprlib.repr(x)}"
