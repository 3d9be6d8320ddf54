"""Functions of an importable module for tests/integration/test_globals.py: shipped by
reference, they use the worker's own copy of this module's globals."""

from __future__ import annotations

import os
import time

_model = None
_cache: dict = {}


def load() -> None:
    global _model
    _model = {"pid": os.getpid()}


def predict(x):
    return _model["pid"], x * 2


def predict_slowly(x):
    """``predict`` taking long enough that every worker of a small executor gets some."""
    time.sleep(0.02)
    return predict(x)


def cached(x) -> bool:
    hit = x in _cache
    _cache[x] = True
    return hit
