"""Which part of a call could not be pickled: the note on a pickling error that names it.

pickle's own message names only a type (``cannot pickle '_thread.lock' object``); in a call
with several arguments the user must guess which one. Owns finding the first part of a call
(the function, a positional or a keyword argument) that does not pickle on its own, only on
the error path, by pickling each part again. Imports ``distexec.errors`` and
``.serialization``.
"""

from __future__ import annotations

import sys
from typing import Any

from ..errors import DistexecError
from . import serialization


def note_what_failed_to_pickle(exc: BaseException, fn: Any, args: tuple, kwargs: dict) -> None:
    """Add a note to ``exc`` naming the function or argument of the call that cannot be
    pickled (pickle's message names only its type).

    Errors of the cluster (``DistexecError``) and interruptions (not an ``Exception``) are left
    alone, as is any error when every part of the call pickles on its own: then the error was
    not about pickling it.
    """
    if isinstance(exc, DistexecError) or not isinstance(exc, Exception):
        return
    culprit = unpicklable_part(fn, args, kwargs)
    if culprit is not None:
        _add_note(exc, f"distexec could not send this call: {culprit} cannot be pickled.")


def _add_note(exc: BaseException, note: str) -> None:
    if sys.version_info >= (3, 11):
        exc.add_note(note)
    else:  # Python 3.10: the exceptiongroup backport displays __notes__
        exc.__notes__ = [*getattr(exc, "__notes__", ()), note]  # type: ignore[attr-defined]


def unpicklable_part(fn: Any, args: tuple, kwargs: dict) -> str | None:
    """``"argument args[1] (a _thread.lock)"``: the first part of a call that does not pickle
    on its own, or None."""
    name = getattr(fn, "__qualname__", None)
    parts = [(f"the function {name}" if isinstance(name, str) else "the function", fn)]
    parts += [(f"argument args[{i}]", arg) for i, arg in enumerate(args)]
    parts += [(f"keyword argument {name!r}", value) for name, value in kwargs.items()]
    for label, part in parts:
        if not serialization.is_plain(part) and not _pickles_alone(part):
            return f"{label} ({_a_type(part)})"
    return None


class _Discard:
    """A file that forgets what is written: the probe only needs to know that pickling works
    (and a large argument must not be copied to find that out)."""

    def write(self, data) -> int:
        return len(data)


class _ProbePickler(serialization._ClusterPickler):
    """Pickles as a message is pickled, but leaves distexec's references and pools out:
    pickling one tells its owner that a destination will hold it, and a probe has none."""

    def persistent_id(self, obj: Any) -> Any:
        module = getattr(type(obj), "__module__", None) or ""
        ours = module.split(".", 1)[0] == "distexec" and module != serialization.__name__
        return 0 if ours else None


def _pickles_alone(part: Any) -> bool:
    probe = _ProbePickler(_Discard(), protocol=5, buffer_callback=lambda buffer: False)
    serialization._share_main_globals(probe)
    try:
        probe.dump(part)
    except (Exception, SystemExit):  # SystemExit: a __reduce__ that calls sys.exit
        return False
    return True


def _a_type(obj: Any) -> str:
    tp = type(obj)
    module = getattr(tp, "__module__", None)
    name = tp.__qualname__ if module in (None, "builtins") else f"{module}.{tp.__qualname__}"
    return f"a {name}"
