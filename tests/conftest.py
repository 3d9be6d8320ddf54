"""Fixtures shared by every test under ``tests/``.

After each test nothing the test started may remain (DESIGN.md §5): no child process (worker)
and no non-daemon thread that did not exist before the test. Resources a test starts take a
moment to go away after it asks them to, so the check waits for them with a deadline
(:func:`wait_until`) before it calls them leaked. Leaked processes are killed so one faulty test
does not poison the next ones; the test is then failed with their command lines.

Workers started by a module- or session-scoped fixture exist before this function-scoped
fixture takes its snapshot, so they are not counted against the tests that use them.

Per-test timeouts come from pytest-timeout (``pyproject.toml``), which also dumps every
thread's stack when one fires.
"""

from __future__ import annotations

import threading

import psutil
import pytest

from tests.helpers import wait_until

__all__ = ["wait_until"]

LEAK_TIMEOUT = 10.0
"""Seconds a test's processes and threads get to finish after the test body returns."""

_TIMEOUT_THREAD_PREFIX = "pytest_timeout"


def _process_key(proc: psutil.Process) -> tuple[int, float] | None:
    """(pid, start time): survives pid reuse. None when the process is already gone."""
    try:
        return proc.pid, proc.create_time()
    except psutil.Error:
        return None


TEMPLATE_MODULE = "distexec.cluster.template_server"
"""The template process of local workers lives as long as the master's cluster, not as one
test: it is not counted (the workers it forks are, as its children)."""


def _child_processes() -> dict[tuple[int, float], psutil.Process]:
    children = {}
    for proc in psutil.Process().children(recursive=True):
        key = _process_key(proc)
        if key is not None and not _is_template(proc):
            children[key] = proc
    return children


def _is_template(proc: psutil.Process) -> bool:
    try:
        return TEMPLATE_MODULE in proc.cmdline()
    except psutil.Error:
        return False


def _is_running(proc: psutil.Process) -> bool:
    """True while the process runs; an exited child waiting to be reaped (zombie) does not."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _describe(proc: psutil.Process) -> str:
    try:
        cmdline = " ".join(proc.cmdline()) or proc.name()
    except psutil.Error:
        cmdline = "<exited>"
    return f"pid {proc.pid}: {cmdline}"


def _kill_all(procs: list[psutil.Process]) -> None:
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=5)


def _new_processes(before: set[tuple[int, float]]) -> list[psutil.Process]:
    return [p for key, p in _child_processes().items() if key not in before and _is_running(p)]


def _watched_threads() -> set[threading.Thread]:
    return {
        t
        for t in threading.enumerate()
        if not t.daemon and not t.name.startswith(_TIMEOUT_THREAD_PREFIX)
    }


def _new_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    return [t for t in _watched_threads() if t not in before and t.is_alive()]


def _settled(predicate) -> bool:
    """Whether ``predicate`` became true within :data:`LEAK_TIMEOUT`."""
    try:
        wait_until(predicate, LEAK_TIMEOUT)
    except AssertionError:
        return False
    return True


@pytest.fixture(autouse=True)
def no_leaked_processes():
    """Fail a test that leaves a child process behind (and kill that process)."""
    before = set(_child_processes())
    yield
    if _settled(lambda: not _new_processes(before)):
        return
    leaked = _new_processes(before)
    if leaked:
        described = [_describe(p) for p in leaked]
        _kill_all(leaked)
        pytest.fail(
            f"test leaked {len(leaked)} process(es), now killed:\n  " + "\n  ".join(described),
            pytrace=False,
        )


@pytest.fixture(autouse=True)
def no_leaked_threads():
    """Fail a test that leaves a non-daemon thread running."""
    before = _watched_threads()
    yield
    if _settled(lambda: not _new_threads(before)):
        return
    leaked = _new_threads(before)
    if leaked:
        names = [f"{t.name} (ident {t.ident})" for t in leaked]
        pytest.fail(
            f"test leaked {len(leaked)} non-daemon thread(s):\n  " + "\n  ".join(names),
            pytrace=False,
        )


# --------------------------------------------------------------------------------------------
# Clusters. The master's cluster is per process (one default context), so fixtures add workers
# to it and remove exactly the ones they added. A test that needs a particular topology or no
# workers at all starts from ``no_workers`` (removes strays) or ``empty_cluster`` (fails on them).
# --------------------------------------------------------------------------------------------
def _remove_workers(pids) -> None:
    import distexec

    alive = [p for p in pids if p in distexec.procs()]
    if alive:
        distexec.rmprocs(alive, waitfor=20)


@pytest.fixture(scope="module")
def shared_workers():
    """Two workers shared by a test module (for tests that do not kill or remove them)."""
    import distexec

    pids = distexec.addprocs(2)
    yield pids
    _remove_workers(pids)


@pytest.fixture
def add_workers():
    """Factory: ``add_workers(n, **params)`` adds workers that are removed after the test."""
    import distexec

    added: list[int] = []

    def add(n: int = 2, **params) -> list[int]:
        pids = distexec.addprocs(n, **params)
        added.extend(pids)
        return pids

    yield add
    _remove_workers(added)


@pytest.fixture
def no_workers():
    """A cluster of the master alone (removes workers an earlier test may have left)."""
    import distexec

    stray = [p for p in distexec.procs() if p != 1]
    if stray:
        distexec.rmprocs(stray, waitfor=20)
    assert distexec.procs() == [1]


@pytest.fixture
def empty_cluster():
    """The master has no workers, so a test may choose the topology; fails if some are left.

    Unlike :func:`no_workers` it removes nothing: for modules whose every test adds its own
    workers, a leftover worker is another module's bug, to be reported rather than hidden.
    """
    import distexec

    assert distexec.procs() == [1], f"workers left over by another test: {distexec.procs()}"


@pytest.fixture(scope="module")
def executor():
    """A DistributedExecutor with two fresh workers, shared by a test module; shut down after."""
    from distexec import DistributedExecutor

    ex = DistributedExecutor(2)
    yield ex
    ex.shutdown(wait=True)
