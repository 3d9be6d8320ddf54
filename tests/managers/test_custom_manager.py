"""Custom cluster managers: the interface a user implements to launch workers their own way.

Two small managers written as a user would: one starts ``distexec worker`` through a plain
shell command (TCP, with a custom topology), one talks to its workers over their stdin/stdout
pipes with ``init_worker`` and ``process_messages`` (its own transport).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import pytest

import distexec
from distexec import ClusterManager, RemoteException, WorkerConfig
from distexec.cluster.local import worker_environment
from distexec.runtime.context import current_context

pytestmark = pytest.mark.timeout(60)


class ShellManager(ClusterManager):
    """Starts each worker with ``sh -c 'exec python -m distexec worker'``.

    ``links`` maps a worker's index to the indexes it must connect to (custom topology).
    """

    def __init__(self, n: int, links: dict[int, list[int]] | None = None):
        self.n, self.links = n, links or {}
        self.ops: list[tuple[int, str]] = []
        self.lock = threading.Lock()

    def launch(self, params, launched, launch_ntfy):
        command = f"exec {sys.executable} -m distexec worker --bind-to 127.0.0.1"
        for index in range(self.n):
            process = subprocess.Popen(["sh", "-c", command], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, env=worker_environment(params),
                                       start_new_session=True)
            process.stdin.write(distexec.cluster_cookie().encode() + b"\n")
            process.stdin.flush()
            config = WorkerConfig(io=process.stdout, process=process, ident=index,
                                  connect_idents=self.links.get(index, []))
            with launch_ntfy:
                launched.append(config)
                launch_ntfy.notify()

    def manage(self, pid, config, op):
        with self.lock:
            self.ops.append((pid, op))


PIPE_WORKER = textwrap.dedent("""
    import os, sys
    import distexec
    frames_out = os.fdopen(os.dup(1), "wb")   # the protocol owns the real stdout
    os.dup2(2, 1)                             # so user prints go to stderr
    cookie = sys.stdin.buffer.readline().decode().strip()
    distexec.init_worker(cookie)
    distexec.process_messages(sys.stdin.buffer, frames_out).join()
""")


class PipeManager(ClusterManager):
    """Workers reached over their own stdin/stdout: no socket at all."""

    def __init__(self, n: int):
        self.n = n

    def launch(self, params, launched, launch_ntfy):
        for _ in range(self.n):
            process = subprocess.Popen([sys.executable, "-c", PIPE_WORKER],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       env=worker_environment(params), start_new_session=True)
            process.stdin.write(distexec.cluster_cookie().encode() + b"\n")
            process.stdin.flush()
            with launch_ntfy:
                launched.append(WorkerConfig(process=process))
                launch_ntfy.notify()

    def connect(self, pid, config):
        return config.process.stdout, config.process.stdin

    def manage(self, pid, config, op):
        pass


@pytest.fixture
def clean_cluster():
    """These tests set the topology, which needs a cluster without workers."""
    leftover = [p for p in distexec.procs() if p != 1]
    if leftover:
        distexec.rmprocs(leftover, waitfor=20)
    added: list[int] = []
    yield added
    alive = [p for p in added if p in distexec.procs()]
    if alive:
        distexec.rmprocs(alive, waitfor=20)


def test_shell_manager_adds_workers_that_serve_calls(clean_cluster):
    manager = ShellManager(2)
    pids = distexec.addprocs(manager)
    clean_cluster.extend(pids)
    assert len(pids) == 2 and distexec.workers() == pids
    assert [distexec.remotecall_fetch(distexec.myid, p) for p in pids] == pids
    assert sorted(p for p, op in manager.ops if op == "register") == pids
    distexec.rmprocs(pids, waitfor=20)
    assert sorted(p for p, op in manager.ops if op == "deregister") == pids


def test_custom_topology_links_exactly_the_listed_idents(clean_cluster):
    # ident 1 connects to 0, ident 2 connects to 1: a chain.
    pids = distexec.addprocs(ShellManager(3, {1: [0], 2: [1]}), topology="custom")
    clean_cluster.extend(pids)
    ctx = current_context()
    by_ident = {ctx.record(p).config.ident: p for p in pids}
    first, second, third = by_ident[0], by_ident[1], by_ident[2]

    def ask(target):
        return distexec.remotecall_fetch(distexec.myid, target)

    # Linked pairs talk in both directions; the links exist from the start.
    assert distexec.remotecall_fetch(ask, second, first) == first
    assert distexec.remotecall_fetch(ask, first, second) == second
    assert distexec.remotecall_fetch(ask, third, second) == second
    # An unlisted pair is refused, as in master_worker.
    with pytest.raises(RemoteException, match="Topology : custom"):
        distexec.remotecall_fetch(ask, third, first)
    assert distexec.remotecall_fetch(distexec.workers, third) == sorted(pids)


def test_custom_topology_rejects_a_peer_that_never_joins(clean_cluster, monkeypatch):
    monkeypatch.setenv("DISTEXEC_WORKER_TIMEOUT", "2")
    with pytest.raises(distexec.DistexecError, match="did not connect within 2.0 seconds"):
        distexec.addprocs(ShellManager(1, {0: ["nobody"]}), topology="custom")
    clean_cluster.extend(p for p in distexec.procs() if p != 1)


def test_a_custom_transport_over_pipes(clean_cluster):
    pids = distexec.addprocs(PipeManager(2))
    clean_cluster.extend(pids)
    assert [distexec.remotecall_fetch(distexec.myid, p) for p in pids] == pids
    big = bytes(range(256)) * 4096  # 1 MiB through a pipe, out of band
    assert distexec.remotecall_fetch(lambda b: b[::-1], pids[0], big) == big[::-1]
    future = distexec.remotecall(os.getpid, pids[1])
    assert future.fetch() != os.getpid()
    with pytest.raises(RemoteException, match="ZeroDivisionError"):
        distexec.remotecall_fetch(lambda: 1 / 0, pids[0])
    distexec.rmprocs(pids, waitfor=20)
    assert not [p for p in pids if p in distexec.procs()]


def test_a_pipe_worker_with_the_wrong_cookie_is_refused(clean_cluster, monkeypatch):
    class WrongCookie(PipeManager):
        def launch(self, params, launched, launch_ntfy):
            real = distexec.cluster_cookie
            monkeypatch.setattr(distexec, "cluster_cookie", lambda: "x" * 64)
            try:
                super().launch(params, launched, launch_ntfy)
            finally:
                monkeypatch.setattr(distexec, "cluster_cookie", real)

    with pytest.raises(distexec.AuthenticationError, match="worker via"):
        distexec.addprocs(WrongCookie(1))
    assert distexec.workers() == [1]
