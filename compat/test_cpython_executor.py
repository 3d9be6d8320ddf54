"""CPython's own generic executor tests, run against DistributedExecutor.

The test file is not part of every Python install: on Debian it is the package
``libpython3.11-testsuite`` (``.ci/run`` unpacks it and points ``DISTEXEC_CPYTHON_FUTURES_TESTS``
at ``test_concurrent_futures.py``); on Python 3.12+ builds that ship ``test``, the package layout
is used instead. The module is imported under a name of its own from a directory on
``sys.path``, so the workers (which get the master's ``sys.path``) import the same helper
functions by reference.

Skipped here, and rewritten in ``tests/executor/test_interpreter_exit.py`` with
``from distexec import DistributedExecutor``: the three tests that start a subprocess importing
the executor by name from ``concurrent.futures``.
"""

from __future__ import annotations

import os
import sys
import unittest

import pytest

import distexec
from compat.cpython_staging import import_staged

MODULE_NAME = "_cpython_test_concurrent_futures"
SUBPROCESS_TESTS = ("test_interpreter_shutdown", "test_submit_after_interpreter_shutdown",
                    "test_hang_gh83386")
CANDIDATES = [
    os.environ.get("DISTEXEC_CPYTHON_FUTURES_TESTS", ""),
    f"/usr/lib/python{sys.version_info.major}.{sys.version_info.minor}/test/test_concurrent_futures.py",
]


suite = import_staged(MODULE_NAME, CANDIDATES)
if suite is None:
    pytest.skip("CPython's test_concurrent_futures.py is not installed "
                "(set DISTEXEC_CPYTHON_FUTURES_TESTS; .ci/run does)", allow_module_level=True)

pytestmark = pytest.mark.timeout(120)


class DistexecMixin(suite.ExecutorMixin):
    executor_type = distexec.DistributedExecutor


def _without_subprocess_tests(mixin):
    """The subprocess tests import the executor from concurrent.futures by name."""
    skip = unittest.skip("imports the executor by name from concurrent.futures; "
                         "see tests/executor/test_interpreter_exit.py")
    overrides = {name: skip(lambda self: None) for name in SUBPROCESS_TESTS if hasattr(mixin, name)}
    return type(mixin.__name__, (mixin,), overrides)


for _mixin in (suite.ExecutorTest, suite.WaitTests, suite.AsCompletedTests,
               suite.ExecutorShutdownTest, suite.InitializerMixin, suite.FailingInitializerMixin):
    _name = f"Distexec{_mixin.__name__.removesuffix('Mixin').removesuffix('Tests')}Test"
    globals()[_name] = type(_name, (_without_subprocess_tests(_mixin), DistexecMixin,
                                    suite.BaseTestCase), {})
del _mixin, _name


def setUpModule():
    suite.setUpModule()
