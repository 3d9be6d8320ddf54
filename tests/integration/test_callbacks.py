"""Worker lifecycle callbacks and worker statuses, on the master and from workers.

Julia: ``add_worker_{starting,started,exiting,exited}_callback``, ``remove_*``,
``setstatus!``/``getstatus`` (spec/distributednext.md §2.9, §2.10).
"""

from __future__ import annotations

import logging
import threading

import psutil
import pytest

import distexec as d
from tests.helpers import kill_worker, wait_until

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def register():
    """``register(kind, fn, key=None)`` adds a callback that is removed after the test."""
    added = []

    def add(kind: str, fn, key=None):
        key = getattr(d, f"add_worker_{kind}_callback")(fn, key=key)
        added.append((kind, key))
        return key

    yield add
    for kind, key in added:
        getattr(d, f"remove_worker_{kind}_callback")(key)


class Recorder:
    """A callback that records its calls (thread-safe) and can wait for them."""

    def __init__(self, result=None, error: BaseException | None = None):
        self.calls: list[tuple] = []
        self.lock = threading.Lock()
        self.result = result
        self.error = error

    def __call__(self, *args):
        with self.lock:
            self.calls.append(args)
        if self.error is not None:
            raise self.error
        return self.result

    def wait_calls(self, n: int) -> list[tuple]:
        wait_until(lambda: len(self.calls) >= n, 10, message=f"{n} callback call(s)")
        return list(self.calls)


def _added_since(before: set[int]) -> list[int]:
    return sorted(set(d.procs()) - before)


def _child_count() -> int:
    return len(psutil.Process().children(recursive=True))


# --------------------------------------------------------------------------------------------
# statuses
# --------------------------------------------------------------------------------------------
def test_setstatus_and_getstatus_on_the_master(add_workers):
    low, high = add_workers(2)
    assert d.getstatus(low) is None
    assert d.setstatus({"phase": 1}, low) == {"phase": 1}
    assert d.getstatus(low) == {"phase": 1}
    assert d.getstatus(high) is None
    d.setstatus("second", low)
    assert d.getstatus(low) == "second"
    assert d.setstatus("master", 1) == "master"
    assert d.getstatus() == "master"


def test_status_for_an_unknown_pid_is_refused(add_workers):
    (pid,) = add_workers(1)
    with pytest.raises(ValueError, match=f"Worker {pid + 1000} does not exist"):
        d.getstatus(pid + 1000)
    with pytest.raises(ValueError, match=f"Worker {pid + 1000} does not exist"):
        d.setstatus("x", pid + 1000)


def test_setstatus_from_a_worker_is_kept_on_the_master(add_workers):
    low, high = add_workers(2)
    assert d.remotecall_fetch(d.setstatus, low, "busy") == "busy"
    assert d.getstatus(low) == "busy"
    assert d.remotecall_fetch(d.getstatus, low) == "busy"
    assert d.remotecall_fetch(d.getstatus, high, low) == "busy"
    assert d.remotecall_fetch(d.getstatus, high) is None
    d.setstatus("from master", high)
    assert d.remotecall_fetch(d.getstatus, high) == "from master"


def test_status_of_an_unknown_pid_from_a_worker_is_refused(add_workers):
    (pid,) = add_workers(1)
    with pytest.raises(d.RemoteException) as info:
        d.remotecall_fetch(d.getstatus, pid, pid + 1000)
    assert isinstance(info.value.captured.ex, ValueError)
    assert f"Worker {pid + 1000} does not exist" in str(info.value)


def test_status_is_readable_in_exited_callbacks_and_gone_after(add_workers, register):
    pids = add_workers(2)
    seen = Recorder()
    together = threading.Barrier(2, timeout=5)

    def read_status(pid, state):
        try:
            together.wait()  # when two workers' callbacks run at once, overlap them
        except threading.BrokenBarrierError:
            pass
        seen(pid, d.getstatus(pid))

    register("exited", read_status)
    for pid in pids:
        d.setstatus(f"status of {pid}", pid)
    d.rmprocs(pids)
    calls = seen.wait_calls(2)
    assert sorted(calls) == [(pid, f"status of {pid}") for pid in pids]

    def refused(pid):
        try:
            d.getstatus(pid)
        except ValueError:
            return True
        return False

    for pid in pids:
        wait_until(lambda pid=pid: refused(pid), 10, message=f"status of {pid} gone")


# --------------------------------------------------------------------------------------------
# starting callbacks
# --------------------------------------------------------------------------------------------
def test_starting_callback_gets_the_manager_and_params(add_workers, register):
    seen = Recorder()
    register("starting", seen)
    add_workers(1, env={"DISTEXEC_TEST_STARTING": "1"})
    (manager, params), = seen.calls
    assert isinstance(manager, d.LocalManager)
    assert params["env"] == {"DISTEXEC_TEST_STARTING": "1"}
    assert params["topology"] == "all_to_all"


def test_starting_callback_error_stops_addprocs_before_launching(register):
    started = Recorder()
    register("starting", Recorder(error=RuntimeError("no workers today")))
    register("started", started)
    before, children = set(d.procs()), _child_count()
    with pytest.raises(RuntimeError, match="no workers today"):
        d.addprocs(2)
    assert set(d.procs()) == before
    assert _child_count() == children
    assert started.calls == []


# --------------------------------------------------------------------------------------------
# started callbacks
# --------------------------------------------------------------------------------------------
def test_started_callback_runs_once_per_new_pid(add_workers, register):
    seen = Recorder()
    register("started", lambda pid: seen(pid, d.remotecall_fetch(d.myid, pid)))
    pids = add_workers(3)
    assert sorted(seen.calls) == [(p, p) for p in pids]


def test_started_callback_error_propagates_and_the_worker_stays(register):
    register("started", Recorder(error=RuntimeError("started failed")))
    before = set(d.procs())
    try:
        with pytest.raises(RuntimeError, match="started failed"):
            d.addprocs(1)
        (pid,) = _added_since(before)
        assert d.remotecall_fetch(d.myid, pid) == pid
    finally:
        d.rmprocs(_added_since(before), waitfor=20)


# --------------------------------------------------------------------------------------------
# exiting callbacks
# --------------------------------------------------------------------------------------------
def test_exiting_callback_runs_in_rmprocs_before_the_worker_goes(add_workers, register):
    seen = Recorder()
    register("exiting", lambda pid: seen(pid, d.remotecall_fetch(d.myid, pid)))
    pids = add_workers(2)
    d.rmprocs(pids)
    assert sorted(seen.calls) == [(p, p) for p in pids]


def test_exiting_callback_error_is_ignored(add_workers, register):
    register("exiting", Recorder(error=RuntimeError("exiting failed")))
    (pid,) = add_workers(1)
    assert d.rmprocs(pid).result(timeout=0) is None
    assert pid not in d.procs()


def test_slow_exiting_callback_is_bounded_by_callback_timeout(add_workers, register, caplog):
    release = threading.Event()
    register("exiting", lambda pid: release.wait(30), key="slow-exiting")
    (pid,) = add_workers(1)
    try:
        with caplog.at_level(logging.WARNING, logger="distexec"):
            handle = d.rmprocs(pid, waitfor=0, callback_timeout=0.5)
            handle.result(timeout=10)
        assert pid not in d.procs()
        assert "Some worker-exiting callbacks have not yet finished" in caplog.text
        assert "'slow-exiting'" in caplog.text
    finally:
        release.set()


# --------------------------------------------------------------------------------------------
# exited callbacks
# --------------------------------------------------------------------------------------------
def test_exited_callback_after_rmprocs_says_terminated(add_workers, register):
    seen = Recorder()
    register("exited", seen)
    pids = add_workers(2)
    d.rmprocs(pids[0])
    assert seen.wait_calls(1) == [(pids[0], "terminated")]
    assert pids[0] not in d.procs()


def test_exited_callback_after_sigkill_says_exterminated(add_workers, register):
    seen = Recorder()
    register("exited", seen)
    (pid,) = add_workers(1)
    kill_worker(pid)
    assert seen.wait_calls(1) == [(pid, "exterminated")]
    assert pid not in d.procs()
    with pytest.raises(d.ProcessExitedException):
        d.remotecall_fetch(d.myid, pid)


def test_exited_callback_error_is_logged(add_workers, register, caplog):
    after = Recorder()
    register("exited", Recorder(error=RuntimeError("exited failed")), key="failing-exited")
    register("exited", after)
    (pid,) = add_workers(1)
    with caplog.at_level(logging.ERROR, logger="distexec"):
        d.rmprocs(pid)
        after.wait_calls(1)
        wait_until(lambda: "failing-exited" in caplog.text, 10, message="the error log")
    assert "Error when running worker-exited callback 'failing-exited'" in caplog.text
    assert "exited failed" in caplog.text


# --------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------
KINDS_AND_CALLBACKS = [
    ("starting", lambda manager, params: None),
    ("started", lambda pid: None),
    ("exiting", lambda pid: None),
    ("exited", lambda pid, state: None),
]


@pytest.mark.parametrize("kind, fn", KINDS_AND_CALLBACKS)
def test_add_returns_the_key_and_refuses_a_duplicate(register, kind, fn):
    assert register(kind, fn, key="the-key") == "the-key"
    with pytest.raises(ValueError, match="'the-key' already exists"):
        getattr(d, f"add_worker_{kind}_callback")(fn, key="the-key")


@pytest.mark.parametrize("kind, fn", KINDS_AND_CALLBACKS)
def test_generated_keys_are_distinct(register, kind, fn):
    first = register(kind, fn)
    second = register(kind, fn)
    assert first != second


@pytest.mark.parametrize("kind, bad", [
    ("starting", lambda pid: None),
    ("started", lambda: None),
    ("started", lambda pid, state: None),
    ("exiting", lambda: None),
    ("exited", lambda pid: None),
])
def test_a_callback_with_the_wrong_signature_is_refused(kind, bad):
    with pytest.raises(TypeError, match="Callback function is invalid"):
        getattr(d, f"add_worker_{kind}_callback")(bad)


@pytest.mark.parametrize("kind", ["starting", "started", "exiting", "exited"])
def test_remove_of_an_absent_key_is_quiet(kind):
    getattr(d, f"remove_worker_{kind}_callback")("no-such-callback")


def test_a_removed_callback_no_longer_runs(add_workers):
    seen = Recorder()
    key = d.add_worker_started_callback(seen)
    d.remove_worker_started_callback(key)
    add_workers(1)
    assert seen.calls == []
