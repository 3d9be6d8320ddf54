"""CPython's own ``multiprocessing.Pool`` tests, run against ``distexec.Pool``.

The tests are ``_TestPool``, ``_TestPoolWorkerErrors`` and ``_TestPoolWorkerLifetime`` of
``test/_test_multiprocessing.py``. That file is not part of every Python install: on Debian it
is the package ``libpython3.11-testsuite`` (``.ci/run`` unpacks it and points
``DISTEXEC_CPYTHON_MP_TESTS`` at it); builds that ship the ``test`` package have it next to
the standard library. As in ``compat/test_cpython_executor.py``, the module is imported under
a name of its own from a staging directory on ``sys.path``, so the workers (which get the
master's ``sys.path``) import its helper functions by reference.

CPython runs these classes through mixins: ``ProcessesMixin`` sets ``Pool =
multiprocessing.Pool``; ``DistexecMixin`` below sets ``Pool = distexec.Pool``. The worker
error and lifetime classes call ``multiprocessing.Pool(...)`` by name, so for them the suite's
``multiprocessing`` is, during each test, the real module with ``Pool`` replaced.

A test is overridden only when it reads ``multiprocessing.Pool``'s private attributes, or
cannot apply; each override says why, and the rest run as CPython wrote them.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import sysconfig
import threading
import types
import unittest
import unittest.mock

import pytest

import distexec
from compat.cpython_staging import import_staged

MODULE_NAME = "_cpython_test_multiprocessing"
CANDIDATES = [
    os.environ.get("DISTEXEC_CPYTHON_MP_TESTS", ""),
    os.path.join(sysconfig.get_paths()["stdlib"], "test", "_test_multiprocessing.py"),
    f"/usr/lib/python{sys.version_info.major}.{sys.version_info.minor}/test/_test_multiprocessing.py",
]


try:
    suite = import_staged(MODULE_NAME, CANDIDATES)
except unittest.SkipTest as exc:  # e.g. no working sem_open on this machine
    pytest.skip(f"CPython's multiprocessing tests skip themselves here: {exc}",
                allow_module_level=True)
if suite is None:
    pytest.skip("CPython's test/_test_multiprocessing.py is not installed "
                "(set DISTEXEC_CPYTHON_MP_TESTS; .ci/run does)", allow_module_level=True)

pytestmark = pytest.mark.timeout(180)


class DistexecMixin(suite.BaseMixin):
    """``ProcessesMixin`` with distexec's Pool: the only part of it the pool tests use."""

    TYPE = "processes"
    Pool = staticmethod(distexec.Pool)


class _NamedPool:
    """For the classes that call ``multiprocessing.Pool(...)`` by name: during each test the
    suite's ``multiprocessing`` is the real module with ``Pool`` set to distexec's."""

    def setUp(self):
        proxy = types.SimpleNamespace(**vars(multiprocessing))
        proxy.Pool = distexec.Pool
        patch = unittest.mock.patch.object(suite, "multiprocessing", proxy)
        patch.start()
        self.addCleanup(patch.stop)
        super().setUp()


class PoolOverrides:
    def test_make_pool(self):
        # reads len(p._pool), multiprocessing's private process list: checked through repr()
        self.assertRaises(ValueError, self.Pool, -1)
        self.assertRaises(ValueError, self.Pool, 0)
        p = self.Pool(3)
        try:
            self.assertIn("pool_size=3", repr(p))
        finally:
            p.close()
            p.join()


class PoolWorkerErrorsOverrides:
    def test_unpickleable_result(self):
        # CPython's unpicklable result is a lambda, which cloudpickle sends: a lock instead
        from multiprocessing.pool import MaybeEncodingError
        p = distexec.Pool(2)
        for _ in range(20):
            scratchpad = [None]

            def errback(exc):
                scratchpad[0] = exc

            res = p.apply_async(threading.Lock, error_callback=errback)
            self.assertRaises(MaybeEncodingError, res.get)
            wrapped = scratchpad[0]
            self.assertIsInstance(wrapped, MaybeEncodingError)
            self.assertIsNotNone(wrapped.exc)
            self.assertIsNotNone(wrapped.value)
        p.close()
        p.join()


class PoolWorkerLifetimeOverrides:
    def test_pool_worker_lifetime(self):
        # reads p._pool's process pids and calls p._repopulate_pool(): pids the tasks report
        p = distexec.Pool(3, maxtasksperchild=10)
        results = [p.apply_async(suite.sqr, (i,)) for i in range(100)]
        for j, res in enumerate(results):
            self.assertEqual(res.get(), suite.sqr(j))
        pids = [res.get() for res in [p.apply_async(os.getpid) for _ in range(40)]]
        self.assertGreaterEqual(len(set(pids)), 4)  # at most 10 tasks per worker
        p.close()
        p.join()

    @unittest.skip("runs `python -c 'from multiprocessing import Pool ...'`: rewritten as "
                   "tests/integration/test_mp_pool.py::test_exiting_with_a_pool_never_closed")
    def test_worker_finalization_via_atexit_handler_of_multiprocessing(self):
        pass


CLASSES = [
    ("DistexecPoolTest", PoolOverrides, suite._TestPool, ()),
    ("DistexecPoolWorkerErrorsTest", PoolWorkerErrorsOverrides, suite._TestPoolWorkerErrors,
     (_NamedPool,)),
    ("DistexecPoolWorkerLifetimeTest", PoolWorkerLifetimeOverrides,
     suite._TestPoolWorkerLifetime, (_NamedPool,)),
]
for _name, _overrides, _base, _extra in CLASSES:
    globals()[_name] = type(_name, (_overrides, *_extra, _base, DistexecMixin,
                                    unittest.TestCase), {})
del _name, _overrides, _base, _extra
