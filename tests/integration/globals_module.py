"""Functions of an importable module for tests/integration/test_globals.py: shipped by
reference, they use the worker's own copy of this module's globals."""

from __future__ import annotations

import os

_model = None
_cache: dict = {}


def load() -> None:
    global _model
    _model = {"pid": os.getpid()}


def predict(x):
    return _model["pid"], x * 2


def cached(x) -> bool:
    hit = x in _cache
    _cache[x] = True
    return hit
