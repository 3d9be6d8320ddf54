"""Batches: a backlog of short tasks travels several to a message, and nothing else changes.

When its queue holds more tasks than it has free slots, ``DistributedExecutor`` sends several
queued tasks of one function to a worker as one message (``distexec.runtime.batches``).
Every task keeps its own outcome: the tests below force batches (``BATCH_SECONDS`` raised, so
the backlog alone sizes them, and a spy that records how many tasks each message carried)
and check that each task ends exactly as it does when sent alone: values, original exception
types, arguments and results that cannot be (un)pickled, objects never shared between tasks,
results over the size limit, an interrupt and a worker's death.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest

import distexec
from distexec import DistributedExecutor, ProcessExitedException
from distexec.executor import MAX_IN_FLIGHT
from distexec.runtime import batches
from tests.executor.helpers import Boom
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(120)


# -- functions the workers run ----------------------------------------------------------------
def behave(kind, x=None, shared=None):
    """One function for every behaviour, so that the tasks of a table travel together."""
    if kind == "ok":
        return x * x
    if kind == "raise":
        raise Boom(f"boom {x}")
    if kind == "exit":
        sys.exit(3)
    if kind == "lock":
        return threading.Lock()
    if kind == "rejected-by-master":
        return RejectedBy(x)
    if kind == "mutate":
        shared.append(x)
        return len(shared)
    if kind == "spin":  # x: a file to create once started; busy, so that an interrupt stops
        Path(x).write_text(str(os.getpid()))  # it on whichever thread the batch runs
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pass
        return "spun"
    if kind == "bytes":
        return bytes(x)
    if kind == "len":
        return len(x)
    if kind == "die":
        os._exit(9)
    raise ValueError(kind)


def hold(path, seconds=30.0):
    """Keep a worker's slot busy until ``path`` exists (a different function from behave)."""
    deadline = time.monotonic() + seconds
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.005)


class RejectedBy:
    """Pickles on any process; refuses to be rebuilt on the process with OS pid ``pid``."""

    def __init__(self, pid):
        self.pid = pid

    def __reduce__(self):
        return (_rebuild_unless, (self.pid,))


def _rebuild_unless(pid):
    if os.getpid() == pid:
        raise ValueError(f"cannot be unpickled on process {pid}")
    return RejectedBy(pid)


# -- helpers ------------------------------------------------------------------------------------
@pytest.fixture
def sizes(monkeypatch):
    """Batches sized by the backlog alone; returns the number of tasks of every message."""
    monkeypatch.setattr(batches, "BATCH_SECONDS", 3600.0)
    seen: list[int] = []
    dispatch = DistributedExecutor._dispatch

    def spy(self, pid, tasks):
        seen.append(len(tasks))
        return dispatch(self, pid, tasks)

    monkeypatch.setattr(DistributedExecutor, "_dispatch", spy)
    return seen


def in_batches(ex, tmp_path, calls):
    """Submit ``calls`` ((fn, args) pairs) while every slot is busy, so they queue up and go
    in batches once the slots free; returns their futures."""
    ex.submit(behave, "ok", 1).result(timeout=30)  # behave's tasks now have an estimate
    release = tmp_path / "release"
    blockers = [ex.submit(hold, str(release)) for _ in range(len(ex.workers()) * MAX_IN_FLIGHT)]
    futures = [ex.submit(fn, *args) for fn, args in calls]
    release.write_text("")
    for blocker in blockers:
        blocker.exception(timeout=60)  # (fails if a batch kills its worker meanwhile)
    return futures


def outcome(future):
    """What a user sees of a finished future: its value, or its exception's type and text."""
    error = future.exception(timeout=60)
    if error is None:
        return "value", future.result()
    return "error", type(error).__name__, str(error).splitlines()[0]


# -- tests ----------------------------------------------------------------------------------------
def test_each_task_in_a_batch_ends_as_it_would_alone(tmp_path, sizes):
    master = os.getpid()
    shared: list = []
    table = [
        (behave, ("ok", 3)),
        (behave, ("raise", 4)),
        (behave, ("exit",)),
        (behave, ("lock",)),  # a result that cannot be pickled
        (behave, ("rejected-by-master", master)),  # a result that cannot be unpickled here
        (behave, ("ok", RejectedBy(None))),  # placeholder, replaced below
        (behave, ("mutate", 1, shared)),  # the same list for three tasks: never shared
        (behave, ("mutate", 2, shared)),
        (behave, ("mutate", 3, shared)),
        (behave, ("ok", 5)),
    ]
    with DistributedExecutor(1) as ex:
        (worker_os_pid,) = [distexec.remotecall_fetch(os.getpid, p) for p in ex.workers()]
        # an argument that cannot be unpickled on the worker
        table[5] = (behave, ("ok", RejectedBy(worker_os_pid)))
        alone = [outcome(ex.submit(fn, *args)) for fn, args in table]
        sizes.clear()
        together = [outcome(f) for f in in_batches(ex, tmp_path, table)]
        assert max(sizes) >= 5, sizes  # they did travel together
        assert ex.submit(behave, "ok", 7).result(timeout=30) == 49  # the worker serves on
    assert together == alone
    assert alone[0] == ("value", 9)
    assert alone[1] == ("error", "Boom", "boom 4")
    assert alone[2][:2] == ("error", "SystemExit")
    assert alone[3][:2] == ("error", "ResultPicklingError") and "lock" in alone[3][2]
    assert alone[4] == ("error", "ValueError", f"cannot be unpickled on process {master}")
    assert alone[5] == ("error", "ValueError", f"cannot be unpickled on process {worker_os_pid}")
    assert alone[6:9] == [("value", 1)] * 3 and shared == []
    assert alone[9] == ("value", 25)


def test_remote_frames_survive_in_a_batch(tmp_path, sizes):
    with DistributedExecutor(1) as ex:
        futures = in_batches(ex, tmp_path, [(behave, ("raise", i)) for i in range(20)])
        errors = [f.exception(timeout=60) for f in futures]
    assert max(sizes) > 1, sizes
    for i, error in enumerate(errors):
        assert type(error) is Boom and error.args == (f"boom {i}",)
        assert error.__cause__.stack[-1].name == "behave"


def test_results_too_large_together_travel_apart(tmp_path, sizes, monkeypatch):
    limit = 1 << 20
    monkeypatch.setenv("DISTEXEC_MAX_MESSAGE_SIZE", str(limit))
    table = [(behave, ("bytes", n)) for n in (600_000, 600_000, 2 * limit, 10, 600_000)]
    with DistributedExecutor(1) as ex:
        futures = in_batches(ex, tmp_path, table)
        outcomes = [outcome(f) for f in futures]
        assert max(sizes) >= 3, sizes
        assert ex.submit(behave, "ok", 2).result(timeout=30) == 4
    assert [o[0] for o in outcomes] == ["value", "value", "error", "value", "value"]
    assert [len(o[1]) for o in outcomes if o[0] == "value"] == [600_000, 600_000, 10, 600_000]
    assert outcomes[2][1] == "ResultPicklingError" and "max_message_size" in outcomes[2][2]


def test_arguments_too_large_together_travel_in_several_messages(tmp_path, sizes, monkeypatch):
    messages: list[int] = []
    send = DistributedExecutor._send

    def spy(self, pid, pickled):
        messages.append(len(pickled))
        return send(self, pid, pickled)

    monkeypatch.setattr(DistributedExecutor, "_send", spy)
    payload = bytes(400_000)  # five of these exceed a batch's 1 MiB: split, all to one worker
    with DistributedExecutor(1) as ex:
        futures = in_batches(ex, tmp_path, [(behave, ("len", payload)) for _ in range(10)])
        assert [f.result(timeout=30) for f in futures] == [len(payload)] * 10
        assert max(sizes) == 5 and max(messages) == 2, (sizes, messages)
        assert ex.submit(behave, "ok", 5).result(timeout=30) == 25
    # shutdown returned: every message, however the batch was split, was accounted for


def test_interrupt_fails_only_the_running_task_of_a_batch(tmp_path, sizes):
    started = tmp_path / "started"
    with DistributedExecutor(1) as ex:
        (pid,) = ex.workers()
        futures = in_batches(ex, tmp_path, [(behave, ("ok", 2)), (behave, ("spin", started)),
                                            *[(behave, ("ok", i)) for i in range(10)]])
        wait_until(started.exists, 30, message="the sleeping task to start")
        distexec.interrupt(pid)
        assert type(futures[1].exception(timeout=10)) is KeyboardInterrupt
        assert [f.result(timeout=30) for f in futures[:1] + futures[2:]] == \
            [4, *[i * i for i in range(10)]]
        assert max(sizes) > 2, sizes
        assert ex.submit(behave, "ok", 3).result(timeout=30) == 9
        assert ex.workers() == [pid]


def test_a_worker_dying_in_a_batch_fails_only_that_workers_tasks(tmp_path, sizes, monkeypatch):
    monkeypatch.setattr(batches, "MAX_BATCH", 5)
    table = [(behave, ("ok", i)) for i in range(40)]
    table[3] = (behave, ("die",))
    with DistributedExecutor(2) as ex:
        futures = in_batches(ex, tmp_path, table)
        victims = set()
        for i, future in enumerate(futures):
            error = future.exception(timeout=60)
            if error is None:
                assert future.result() == i * i
            else:
                assert isinstance(error, ProcessExitedException), repr(error)
                victims.add(error.worker_id)
        assert len(victims) == 1 and max(sizes) == 5
        failed = sum(f.exception() is not None for f in futures)
        assert 1 <= failed <= MAX_IN_FLIGHT * 5  # the batches that were on the dead worker
        (victim,) = victims
        # gone from the executor (a replacement, started while tasks were queued, may be in)
        wait_until(lambda: victim not in ex.workers(), 10)
        assert ex.submit(behave, "ok", 4).result(timeout=30) == 16
