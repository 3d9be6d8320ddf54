"""``initializer``/``initargs`` of DistributedExecutor (spec §2.1).

The initializer runs once on every worker before any task; one that raises breaks the
executor: the futures get ``BrokenExecutor``, ``_broken`` turns true, later submits raise
``BrokenExecutor``, and the error is logged CRITICAL to ``concurrent.futures``.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import BrokenExecutor

import pytest

import distexec
from distexec import DistributedExecutor
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(60)


def remember(*args):
    import builtins
    builtins._executor_test_init = (os.getpid(), args)


def remembered():
    import builtins
    return getattr(builtins, "_executor_test_init", None)


def fail_to_initialize():
    raise ValueError("error in initializer")


def test_the_initializer_runs_on_every_worker_with_its_args():
    with DistributedExecutor(2, initializer=remember, initargs=("a", 1)) as ex:
        # the first task waits for the initializer, and already sees its effect
        assert ex.submit(remembered).result(timeout=10)[1] == ("a", 1)
        for pid in ex.workers():
            os_pid, args = distexec.remotecall_fetch(remembered, pid)
            assert os_pid == distexec.remotecall_fetch(os.getpid, pid)
            assert args == ("a", 1)


def test_a_failing_initializer_breaks_the_executor(caplog):
    caplog.set_level(logging.CRITICAL, logger="concurrent.futures")
    with DistributedExecutor(2, initializer=fail_to_initialize) as ex:
        futures = [ex.submit(abs, -i) for i in range(5)]
        for future in futures:
            with pytest.raises(BrokenExecutor):
                future.result(timeout=10)
        wait_until(lambda: ex._broken, 5, message="the executor to be marked broken")
        with pytest.raises(BrokenExecutor):
            ex.submit(abs, 1)
    records = [r for r in caplog.records
               if r.name == "concurrent.futures" and r.levelno == logging.CRITICAL]
    assert any("ValueError: error in initializer" in r.getMessage() for r in records), records


def test_a_non_callable_initializer_is_refused():
    before = distexec.procs()
    with pytest.raises(TypeError):
        DistributedExecutor(1, initializer="not callable")
    assert distexec.procs() == before
