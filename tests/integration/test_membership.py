"""Membership: addprocs, rmprocs, the views of the cluster, myid, cookie, interrupt.

Julia: ``addprocs``, ``rmprocs``, ``procs``/``workers``/``nprocs``/``nworkers``/``other_*``,
``myid``, ``cluster_cookie``, ``interrupt`` (spec/distributednext.md §2, §9).

Every test adds its own workers (``add_workers``): several need the cluster to have no other
workers, and a module-scoped pool would still exist while they run.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
import threading
import time

import pytest

import distexec as d
from tests.helpers import os_pid, wait_gone, wait_until

pytestmark = pytest.mark.timeout(60)


# --------------------------------------------------------------------------------------------
# remote helpers (run on workers)
# --------------------------------------------------------------------------------------------
def _views():
    return {
        "myid": d.myid(),
        "procs": d.procs(),
        "workers": d.workers(),
        "nprocs": d.nprocs(),
        "nworkers": d.nworkers(),
        "other_procs": d.other_procs(),
        "other_workers": d.other_workers(),
    }


def _expected_views(me: int, pids: list[int]) -> dict:
    everyone = [1, *sorted(pids)]
    return {
        "myid": me,
        "procs": everyone,
        "workers": sorted(pids),
        "nprocs": len(everyone),
        "nworkers": len(pids),
        "other_procs": [p for p in everyone if p != me],
        "other_workers": [p for p in sorted(pids) if p != me],
    }


def _signal_then_sleep(channel, seconds):
    channel.put(("running", threading.current_thread() is threading.main_thread()))
    time.sleep(seconds)
    return "slept"


def _signal_then_loop(channel, seconds):
    """Busy in Python code (short sleeps): where an asynchronous exception can land."""
    channel.put(("running", threading.current_thread() is threading.main_thread()))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.01)
    return "looped"


def _sigint_pending(os_pid: int) -> bool:
    """Whether SIGINT is still pending for ``os_pid`` (not yet delivered to it)."""
    bit = 1 << (signal.SIGINT - 1)
    with open(f"/proc/{os_pid}/status") as status:
        for line in status:
            if line.startswith(("SigPnd:", "ShdPnd:")) and int(line.split()[1], 16) & bit:
                return True
    return False


# --------------------------------------------------------------------------------------------
# addprocs
# --------------------------------------------------------------------------------------------
def test_addprocs_returns_the_new_pids_sorted(add_workers):
    before = set(d.procs())
    pids = add_workers(3)
    assert pids == sorted(pids)
    assert len(pids) == 3
    assert set(d.procs()) - before == set(pids)
    assert all(d.remotecall_fetch(d.myid, p) == p for p in pids)


def test_pids_are_never_reused_after_rmprocs(empty_cluster, add_workers):
    first = add_workers(2)
    d.rmprocs(first)
    second = add_workers(2)
    assert min(second) > max(first)
    d.rmprocs(second[0])
    third = add_workers(1)
    assert third[0] > max(second)
    assert d.procs() == [1, second[1], third[0]]


def test_addprocs_rejects_an_unknown_keyword(empty_cluster):
    with pytest.raises(ValueError, match="^Invalid keyword argument x$"):
        d.addprocs(1, x=1)
    assert d.procs() == [1]


# --------------------------------------------------------------------------------------------
# the views: procs, workers, nprocs, nworkers, other_*
# --------------------------------------------------------------------------------------------
def test_views_without_workers(empty_cluster):
    assert d.procs() == [1]
    assert d.nprocs() == 1
    assert d.workers() == [1]
    assert d.nworkers() == 1
    assert d.other_workers() == []
    assert d.other_procs() == []
    assert d.myid() == 1


def test_views_on_the_master(empty_cluster, add_workers):
    pids = add_workers(3)
    assert _views() == _expected_views(1, pids)


def test_workers_agree_with_the_master(empty_cluster, add_workers):
    pids = add_workers(3)
    for pid in pids:
        assert d.remotecall_fetch(_views, pid) == _expected_views(pid, pids)


def test_workers_agree_with_the_master_after_a_removal(empty_cluster, add_workers):
    pids = add_workers(3)
    d.rmprocs(pids[1])
    left = [pids[0], pids[2]]
    assert _views() == _expected_views(1, left)
    for pid in left:
        assert d.remotecall_fetch(_views, pid) == _expected_views(pid, left)


def test_workers_agree_after_a_removal_with_worker_links(empty_cluster, add_workers):
    """The removed worker had a link to a remaining one: both paths must forget it."""
    pids = add_workers(3)
    assert d.remotecall_fetch(d.remotecall_fetch, pids[2], d.myid, pids[1]) == pids[1]
    d.rmprocs(pids[1])
    left = [pids[0], pids[2]]
    for pid in left:
        assert d.remotecall_fetch(_views, pid) == _expected_views(pid, left)


def test_procs_of_a_local_worker(empty_cluster, add_workers):
    pids = add_workers(2)
    assert d.procs(pids[0]) == [1, *pids]
    assert d.procs(1) == [1, *pids]
    assert d.other_procs(pids[0]) == pids
    assert d.remotecall_fetch(d.procs, pids[1], pids[0]) == [1, *pids]


# --------------------------------------------------------------------------------------------
# rmprocs
# --------------------------------------------------------------------------------------------
def test_rmprocs_takes_varargs(add_workers):
    pids = add_workers(3)
    d.rmprocs(pids[0], pids[2])
    assert pids[0] not in d.procs() and pids[2] not in d.procs()
    assert pids[1] in d.procs()


@pytest.mark.parametrize("container", [list, tuple, set, iter])
def test_rmprocs_takes_one_iterable(add_workers, container):
    pids = add_workers(2)
    d.rmprocs(container(pids))
    assert not set(pids) & set(d.procs())


def test_rmprocs_of_pid_1_warns_and_keeps_the_master(empty_cluster, add_workers, caplog):
    pids = add_workers(1)
    with caplog.at_level(logging.WARNING, logger="distexec"):
        d.rmprocs(1, pids[0])
    assert "rmprocs: process 1 not removed" in caplog.text
    assert d.procs() == [1]
    assert d.myid() == 1


def test_rmprocs_of_an_unknown_pid_raises_as_a_call_does_and_removes_nothing(add_workers):
    pids = add_workers(1)
    missing = pids[0] + 1000
    with pytest.raises(d.DistributedError, match=f"^no process with id {missing} exists$"):
        d.rmprocs(pids[0], missing)
    assert pids[0] in d.procs()  # checked before any was removed: a typo removes nothing


def test_rmprocs_of_a_removed_pid_does_nothing(add_workers):
    pids = add_workers(2)
    d.rmprocs(pids[0])
    handle = d.rmprocs(pids[0], pids[1])
    assert handle.result(timeout=0) is None
    assert not set(pids) & set(d.procs())


def test_removed_pid_leaves_procs_and_calls_to_it_fail(add_workers):
    pids = add_workers(2)
    d.rmprocs(pids[0])
    assert pids[0] not in d.procs()
    assert d.workers() == [pids[1]]
    with pytest.raises(d.ProcessExitedException) as info:
        d.remotecall_fetch(d.myid, pids[0])
    assert info.value.worker_id == pids[0]
    with pytest.raises(d.ProcessExitedException):
        d.remotecall(d.myid, pids[0])
    assert d.remotecall_fetch(d.myid, pids[1]) == pids[1]


def test_rmprocs_waitfor_0_returns_a_handle_that_completes(add_workers):
    pids = add_workers(2)
    handle = d.rmprocs(pids, waitfor=0)
    assert handle.result(timeout=20) is None
    assert not set(pids) & set(d.procs())
    with pytest.raises(d.ProcessExitedException):
        d.remotecall_fetch(d.myid, pids[1])


def test_rmprocs_ends_the_worker_processes(add_workers):
    pids = add_workers(2)
    os_pids = [os_pid(p) for p in pids]
    d.rmprocs(pids)
    wait_gone(os_pids, 10)


# --------------------------------------------------------------------------------------------
# what reaches the worker: env, dir, exeflags, sys.path
# --------------------------------------------------------------------------------------------
def _worker_setup():
    return {
        "FOO": os.environ.get("DISTEXEC_TEST_FOO"),
        "cwd": os.getcwd(),
        "dev_mode": sys.flags.dev_mode,
    }


def test_env_dir_and_exeflags_reach_the_worker(add_workers, tmp_path):
    (pid,) = add_workers(1, env={"DISTEXEC_TEST_FOO": "bar baz"}, dir=str(tmp_path),
                         exeflags=["-X", "dev"])
    assert d.remotecall_fetch(_worker_setup, pid) == {
        "FOO": "bar baz", "cwd": str(tmp_path), "dev_mode": True}


def test_env_as_pairs_and_exeflags_as_one_string(add_workers):
    (pid,) = add_workers(1, env=[("DISTEXEC_TEST_FOO", "pairs")], exeflags="-Xdev")
    setup = d.remotecall_fetch(_worker_setup, pid)
    assert setup["FOO"] == "pairs"
    assert setup["dev_mode"] is True
    assert setup["cwd"] == os.getcwd()


def test_master_sys_path_additions_are_importable_on_workers(add_workers, tmp_path,
                                                             monkeypatch):
    module = "distexec_test_pathmod_" + tmp_path.name.replace("-", "_")
    (tmp_path / f"{module}.py").write_text("ANSWER = 41 + 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    (pid,) = add_workers(1)

    def import_it(name):
        import importlib
        return importlib.import_module(name).ANSWER

    assert d.remotecall_fetch(import_it, pid, module) == 42


# --------------------------------------------------------------------------------------------
# cluster_cookie
# --------------------------------------------------------------------------------------------
def test_cluster_cookie_is_64_characters_and_stable():
    cookie = d.cluster_cookie()
    assert isinstance(cookie, str)
    assert len(cookie) == 64
    assert d.cluster_cookie() == cookie


def test_cluster_cookie_refuses_a_short_cookie():
    cookie = d.cluster_cookie()
    with pytest.raises(ValueError):
        d.cluster_cookie("short")
    assert d.cluster_cookie() == cookie


def test_cluster_cookie_is_not_revealed_by_repr_or_pickle():
    cookie = d.cluster_cookie()
    assert str(cookie) not in repr(cookie)
    assert str(cookie) not in repr([cookie])
    assert str(cookie) not in f"{cookie!r}"
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        with pytest.raises(Exception):
            pickle.dumps(cookie, protocol)


def test_cluster_cookie_cannot_be_sent_to_a_worker(add_workers):
    (pid,) = add_workers(1)
    with pytest.raises(Exception):
        d.remotecall_fetch(len, pid, d.cluster_cookie())
    assert d.remotecall_fetch(d.myid, pid) == pid


# --------------------------------------------------------------------------------------------
# interrupt
# --------------------------------------------------------------------------------------------
def test_interrupt_fails_a_sleeping_call_and_the_worker_serves_on(add_workers):
    (pid,) = add_workers(1)
    channel = d.RemoteChannel(1, 10)
    call = d.remotecall(_signal_then_sleep, pid, channel, 30)
    # on the main thread, even as the worker's first call: SIGINT stops a sleep only there
    assert channel.take(timeout=10) == ("running", True)
    start = time.monotonic()
    d.interrupt(pid)
    with pytest.raises(d.RemoteException) as info:
        call.fetch(timeout=10)
    assert time.monotonic() - start < 5
    assert isinstance(info.value.captured.ex, KeyboardInterrupt)
    assert info.value.pid == pid
    assert d.remotecall_fetch(lambda: 6 * 7, pid) == 42
    assert pid in d.procs()


def test_interrupt_without_pids_reaches_every_worker(add_workers):
    pids = add_workers(2)
    channel = d.RemoteChannel(1, 10)
    calls = [d.remotecall(_signal_then_loop, p, channel, 30) for p in pids]
    for _ in pids:
        assert channel.take(timeout=10)[0] == "running"
    d.interrupt()
    for call in calls:
        with pytest.raises(d.RemoteException) as info:
            call.fetch(timeout=10)
        assert isinstance(info.value.captured.ex, KeyboardInterrupt)


def test_interrupt_of_an_idle_worker_changes_nothing(add_workers):
    (pid,) = add_workers(1)
    target = os_pid(pid)
    d.interrupt(pid)
    wait_until(lambda: not _sigint_pending(target), 10, message="SIGINT delivered")
    assert d.remotecall_fetch(_signal_then_loop, pid, d.RemoteChannel(1, 10), 0.2) == "looped"
    assert d.remotecall_fetch(d.myid, pid) == pid
    assert pid in d.procs()


def test_interrupt_reaches_a_call_on_a_non_main_thread(add_workers):
    (pid,) = add_workers(1)
    channel = d.RemoteChannel(1, 10)
    calls = [d.remotecall(_signal_then_loop, pid, channel, 30) for _ in range(2)]
    on_main = [channel.take(timeout=10) for _ in calls]
    assert (("running", False)) in on_main, on_main
    d.interrupt(pid)
    for call in calls:
        with pytest.raises(d.RemoteException) as info:
            call.fetch(timeout=10)
        assert isinstance(info.value.captured.ex, KeyboardInterrupt)
    assert d.remotecall_fetch(d.myid, pid) == pid


def test_interrupt_of_an_unknown_pid_raises_as_a_call_does(add_workers):
    (pid,) = add_workers(1)
    with pytest.raises(d.DistributedError, match=f"^no process with id {pid + 1000} exists$"):
        d.interrupt(pid + 1000)


def test_interrupt_of_a_removed_worker_raises_as_a_call_does(add_workers):
    (pid,) = add_workers(1)
    d.rmprocs(pid)
    with pytest.raises(d.ProcessExitedException) as info:
        d.interrupt(pid)
    assert info.value.worker_id == pid
