"""Importing one of CPython's own test files, for the compat suites that run it.

CPython's test files are not part of every Python install (Debian ships them in
``libpython3.11-testsuite``; ``.ci/run`` unpacks it). The file is copied under a module name of
its own into a staging directory put first on ``sys.path`` before any worker starts: the
workers get the master's ``sys.path`` and import the same helper functions by reference.
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType


def import_staged(module_name: str, candidates: list[str]) -> ModuleType | None:
    """The first existing file of ``candidates`` imported as ``module_name``, or None.

    On a worker the module is found where the master staged it.
    """
    if importlib.util.find_spec(module_name) is not None:
        return importlib.import_module(module_name)
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            staging = Path(tempfile.mkdtemp(prefix="distexec-cpython-tests-"))
            shutil.copy(candidate, staging / f"{module_name}.py")
            sys.path.insert(0, str(staging))  # before any worker starts: they inherit it
            return importlib.import_module(module_name)
    return None
