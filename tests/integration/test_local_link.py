"""The link between the master and its local workers: a Unix socket pair made at launch.

A local worker inherits one end of a socket pair and authenticates the master over it like
any accepted connection; it still listens on TCP, where its peers reach it. A worker that
never starts must not leave the master's end open.
"""

from __future__ import annotations

import gc
import socket
import warnings

import psutil
import pytest

import distexec
from distexec import LaunchWorkerError
from distexec.runtime.context import current_context
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(60)


def _link_family(pid: int) -> int:
    """On any process: the address family of its connection to ``pid``."""
    conn = current_context().peers[pid].conn
    assert conn is not None
    return conn.sock.family


def _family_of_link_to(pid: int) -> int:
    """On a worker: open (if need be) and describe its link to worker ``pid``."""
    distexec.remotecall_fetch(distexec.myid, pid)
    return _link_family(pid)


def test_the_master_reaches_local_workers_through_a_socket_pair(add_workers):
    a, b = add_workers(2)
    assert _link_family(a) == _link_family(b) == socket.AF_UNIX
    assert distexec.remotecall_fetch(_link_family, a, 1) == socket.AF_UNIX
    # the workers' own link: TCP to the address each printed
    assert distexec.remotecall_fetch(_family_of_link_to, a, b) == socket.AF_INET
    assert distexec.remotecall_fetch(lambda: distexec.remotecall_fetch(distexec.myid, b), a) == b


def test_the_link_carries_large_messages_both_ways(add_workers):
    (pid,) = add_workers(1)
    data = bytes(range(256)) * (64 * 1024)  # 16 MiB
    assert distexec.remotecall_fetch(lambda blob: blob[::-1], pid, data) == data[::-1]


def test_a_worker_that_exits_at_once_leaves_no_link_open():
    me = psutil.Process()
    before = me.num_fds()
    flags = ["-c", "raise SystemExit(3)"]
    with _no_socket_left_to_the_collector():
        with pytest.raises(LaunchWorkerError, match=r"exit status 3"):
            distexec.addprocs(1, exeflags=flags)
    # the failed launch's pipes and link close as its threads finish
    wait_until(lambda: me.num_fds() <= before, message="the failed worker's descriptors to close")
    assert distexec.workers() == [1]


def test_a_worker_that_cannot_start_leaves_no_link_open():
    me = psutil.Process()
    before = me.num_fds()
    with _no_socket_left_to_the_collector():
        with pytest.raises(LaunchWorkerError, match="/nonexistent/python"):
            distexec.addprocs(1, exename="/nonexistent/python")
    assert me.num_fds() <= before


class _no_socket_left_to_the_collector(warnings.catch_warnings):
    """Fails if a socket was closed by the garbage collector (ResourceWarning), not by us."""

    def __init__(self):
        super().__init__(record=True)

    def __enter__(self):
        self.caught = super().__enter__()
        warnings.simplefilter("always", ResourceWarning)
        return self.caught

    def __exit__(self, *exc):
        gc.collect()
        super().__exit__(*exc)
        leaked = [w for w in self.caught if issubclass(w.category, ResourceWarning)
                  and "socket" in str(w.message)]
        assert not leaked, [str(w.message) for w in leaked]
        return False
