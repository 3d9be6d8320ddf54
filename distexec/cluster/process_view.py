"""What a worker program takes over from its master, so that task code sees the process it
would see in a ``ProcessPoolExecutor`` child.

Owns the master's side (``master_view``: its ``sys.argv``, the path of its ``__main__``, its
``multiprocessing`` authkey, sent in the JOIN over the authenticated link) and the worker's
(``adopt``: those, a ``multiprocessing`` name and identity numbered from 1 as a pool's children
are, and a resource tracker that leaves shared memory a task only attached to alone). Only a
``distexec worker`` process adopts it: a process that serves a custom transport
(``init_worker``) is the user's own program. Imports the standard library only.

    master ──JOIN(pid, peers, ..., view)──► worker: sys.argv, __main__.__file__ (if the path
                                            exists there), current_process(): name, _identity,
                                            authkey; SharedMemory(name=...) untracked
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from typing import Any


def master_view() -> dict[str, Any]:
    """This process's view, for the workers it adds."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    return {
        "argv": list(sys.argv),
        "main_file": os.path.abspath(path) if isinstance(path, str) else None,
        "authkey": bytes(multiprocessing.current_process().authkey),
    }


def adopt(view: dict[str, Any], myid: int) -> None:
    """Take the master's ``view`` over in this worker program (worker ``myid``)."""
    sys.argv = list(view.get("argv") or [""])
    main = sys.modules.get("__main__")
    path = view.get("main_file")
    if main is not None and isinstance(path, str) and os.path.exists(path):
        main.__file__ = path
    process = multiprocessing.current_process()
    # ProcessPoolExecutor's children are numbered from 1 (SpawnProcess-1, _identity (1,)):
    # worker 2 is the first.
    number = max(1, myid - 1)
    process._identity = (number,)
    process.name = f"DistexecProcess-{number}"
    authkey = view.get("authkey")
    if isinstance(authkey, bytes) and authkey:
        process.authkey = authkey  # Manager proxies passed to tasks authenticate with it
    _leave_attached_shared_memory_alone()


def _leave_attached_shared_memory_alone() -> None:
    """``SharedMemory(name=...)`` registers the block with this process's resource tracker
    (Python < 3.13 does so even when it only attaches), which unlinks it when this worker
    exits: the master's block would be gone. Blocks a task attaches to are unregistered at
    once; blocks a task creates stay tracked, as before."""
    from multiprocessing import resource_tracker, shared_memory

    cls = shared_memory.SharedMemory
    if getattr(cls.__init__, "_distexec_untracked", False):
        return
    original = cls.__init__

    def __init__(self, name=None, create=False, size=0, **kwargs):
        original(self, name, create, size, **kwargs)
        if not create and kwargs.get("track", True):
            try:
                resource_tracker.unregister(self._name, "shared_memory")
            except Exception:  # no tracker running: nothing registered it
                pass

    __init__._distexec_untracked = True  # type: ignore[attr-defined]
    cls.__init__ = __init__  # type: ignore[method-assign]
