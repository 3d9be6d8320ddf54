"""Progress bars for long maps and launches: tqdm when it is installed, silence when not.

Owns the one decision every bar makes -- whether to draw at all -- so ``pmap``,
``DistributedExecutor.map`` and ``distexec run`` agree on it. Imports nothing from distexec.

    progress=True  ──► a bar (if tqdm imports)
    progress=False ──► none
    progress=None  ──► a bar when DISTEXEC_PROGRESS is set to 1/true/yes/on
                       (``distexec run --progress`` sets it for the script it runs)
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

PROGRESS_ENV = "DISTEXEC_PROGRESS"
_TRUE = frozenset({"1", "true", "yes", "on"})


def wanted(progress: bool | None) -> bool:
    """Whether to draw: ``progress`` itself, or ``DISTEXEC_PROGRESS`` when it is None."""
    if progress is None:
        return os.environ.get(PROGRESS_ENV, "").strip().lower() in _TRUE
    return bool(progress)


def bar(progress: bool | None, *, total: int | None = None, iterables: Iterable = (),
        desc: str | None = None, unit: str = "it") -> Any | None:
    """A tqdm bar, or None when none is wanted or tqdm is not installed.

    ``total`` defaults to the length of the shortest of ``iterables`` when they all have one
    (an iterator without a length gives a bar that counts without an ETA).
    """
    if not wanted(progress):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    if total is None:
        try:
            total = min(len(it) for it in iterables)
        except (TypeError, ValueError):  # no length, or no iterables
            total = None
    return tqdm(total=total, desc=desc, unit=unit)
