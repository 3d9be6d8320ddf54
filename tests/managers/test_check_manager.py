"""distexec.testing.check_cluster_manager: passes good managers, fails broken ones clearly.

The good managers are distexec's own ``LocalManager`` and the user-written pipe transport of
``test_custom_manager.py``; the broken ones each get one thing wrong that a manager author
could, and the check must name the step and the likely culprit.
"""

from __future__ import annotations

import re
import threading
import time

import pytest

import distexec
from distexec import ClusterManager, LocalManager
from distexec.testing import ManagerCheckFailed, check_cluster_manager
from tests.managers.test_custom_manager import PipeManager, ShellManager

pytestmark = pytest.mark.timeout(120)


def test_local_manager_passes(no_workers):
    check_cluster_manager(LocalManager, n=2, timeout=30)
    assert distexec.procs() == [1]


def test_a_shell_launched_tcp_manager_passes(no_workers):
    check_cluster_manager(ShellManager, n=3, timeout=30)
    assert distexec.procs() == [1]


def test_a_pipe_transport_passes_with_master_worker_topology(no_workers):
    check_cluster_manager(PipeManager, n=2, timeout=30, topology="master_worker")
    assert distexec.procs() == [1]


def test_a_single_worker_is_enough(no_workers):
    check_cluster_manager(LocalManager, n=1, timeout=30)
    assert distexec.procs() == [1]


class LaunchesNothing(LocalManager):
    """A ``launch`` that returns without appending a WorkerConfig to ``launched``."""

    def launch(self, params, launched, launch_ntfy):
        pass


class SwappedStreams(PipeManager):
    """Hands the master the worker's stdin to read from and its stdout to write to."""

    def connect(self, pid, config):
        return config.process.stdin, config.process.stdout


class ReportsTheWrongCount(LocalManager):
    """Launches one worker fewer than asked."""

    def __init__(self, n):
        super().__init__(n - 1)


def _not_a_manager(n):
    return object()


@pytest.mark.parametrize(("factory", "params", "expected"), [
    pytest.param(LaunchesNothing, {}, "step 'add workers': addprocs(LaunchesNothing(...)) "
                 "returned [], but 2 worker(s) were asked for; launch() must start the workers and "
                 "append one WorkerConfig per worker to `launched`", id="launch-fills-nothing"),
    pytest.param(ReportsTheWrongCount, {}, "returned [2], but 2 worker(s) were asked for",
                 id="one-worker-short"),
    pytest.param(SwappedStreams, {"topology": "master_worker"},
                 "step 'add workers': CompositeException: AuthenticationError: worker via "
                 "<StreamTransport streams> closed the connection during the handshake",
                 id="connect-swaps-the-streams"),
    pytest.param(_not_a_manager, {}, "step 'create the manager': manager_factory(2) returned "
                 "<object object", id="not-a-manager"),
])
def test_a_broken_manager_fails_with_a_clear_message(no_workers, factory, params, expected):
    with pytest.raises(ManagerCheckFailed) as failure:
        check_cluster_manager(factory, n=2, timeout=20, **params)
    message = str(failure.value)
    assert message.startswith("check_cluster_manager, step '"), message
    assert expected in _unnumbered(message, expected), message
    assert isinstance(failure.value, AssertionError)  # pytest and plain scripts report it
    assert distexec.procs() == [1]  # whatever joined was removed


def _unnumbered(message: str, expected: str) -> str:
    """The pids in the message as the expectation numbers them (the master's counter runs on)."""
    if "[2]" not in expected:
        return message
    return re.sub(r"returned \[\d+\]", "returned [2]", message)


def test_bad_n_is_refused():
    with pytest.raises(ValueError, match="n must be a positive int"):
        check_cluster_manager(LocalManager, n=0)


class BlocksInLaunch(ClusterManager):
    """A ``launch`` that never returns (until the test releases it)."""

    def __init__(self, n):
        self.release = threading.Event()

    def launch(self, params, launched, launch_ntfy):
        self.release.wait(60)

    def manage(self, pid, config, op):
        pass


def test_a_launch_that_blocks_fails_after_the_timeout(no_workers):
    manager = BlocksInLaunch(2)
    started = time.monotonic()
    try:
        with pytest.raises(ManagerCheckFailed, match=re.escape(
                "check_cluster_manager, step 'add workers': timed out after 1.0 s waiting for "
                "addprocs(BlocksInLaunch(...)) to return (launch() or connect() may be blocked)")):
            check_cluster_manager(lambda n: manager, n=2, timeout=1.0)
        assert time.monotonic() - started < 5
    finally:
        manager.release.set()  # the abandoned addprocs returns and frees the cluster's lock
    assert distexec.addprocs(ShellManager(0)) == []  # the next addprocs is not stuck behind it
