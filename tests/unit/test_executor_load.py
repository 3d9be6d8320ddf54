"""The executor's per-worker load (``distexec.executor_load.InFlight``) and a WorkerPool's take.

No processes. What the executor's pump asks for every task (the least loaded worker, the
messages in flight overall) must not cost a pass over every worker: at 128 workers on 2 cores
that pass was most of the master's CPU per task. These tests pin the answers; the data
structure is what makes them O(1).
"""

from __future__ import annotations

import threading
import time

import pytest

from distexec.executor_load import InFlight
from distexec.pools import WorkerPool
from distexec.runtime import context as context_mod

pytestmark = pytest.mark.timeout(30)


def test_the_least_loaded_worker_with_a_free_slot():
    load = InFlight(limit=2)
    load.track([2, 3, 4])
    load.add(2)
    load.add(3)
    assert load.least_loaded() == 4
    load.add(4)
    load.add(4)  # full
    assert load.least_loaded() in (2, 3)
    load.add(2)
    load.add(3)
    assert load.least_loaded() is None  # every worker at its limit
    assert load.total == 6
    assert load.done(3) == 1 and load.least_loaded() == 3


def test_among_idle_workers_the_last_to_finish_goes_first():
    load = InFlight(limit=2)
    load.track([2, 3, 4])
    for pid in (2, 3, 4):
        load.add(pid)
    load.done(3)
    load.done(2)
    assert load.least_loaded() == 2  # finished last: likeliest to be awake still
    load.done(4)
    assert load.least_loaded() == 4


def test_accept_skips_workers_that_may_not_take_tasks():
    load = InFlight(limit=2)
    load.track([2, 3, 4])
    load.add(4)
    assert load.least_loaded(accept=lambda pid: pid == 4) == 4
    assert load.least_loaded(accept=lambda pid: False) is None


def test_track_follows_the_executors_workers():
    load = InFlight(limit=2)
    workers = [2, 3]
    load.track(workers)
    load.add(2)
    load.add(3)
    load.track([3, 5])  # 2 left, 5 joined
    assert load.least_loaded() == 5
    load.add(5)
    load.add(5)
    assert load.least_loaded() == 3
    assert load.get(2) == 1 and load.total == 4  # 2's message is still out


def test_a_forgotten_worker_is_never_chosen_and_its_messages_leave_the_total():
    load = InFlight(limit=2)
    load.track([2, 3])
    load.add(2, 2)
    load.add(3)
    assert load.forget(2) == 2 and load.total == 1
    assert load.forget(7) is None  # never sent anything
    assert load.done(2) == 0 and load.total == 1  # a late reply of the lost worker
    load.done(3)
    assert load.least_loaded() == 3


def test_least_loaded_does_not_visit_every_worker():
    load = InFlight(limit=2)
    load.track(list(range(2, 1002)))
    seen = []
    for pid in range(2, 1002):
        load.add(pid)
    load.done(500)
    assert load.least_loaded(accept=lambda pid: seen.append(pid) or True) == 500
    assert seen == [500]


def _fake_cluster(monkeypatch):
    """A master context whose live_pids counts its calls (a WorkerPool prunes with it)."""
    ctx = context_mod.current_context()
    calls = []
    real = ctx.live_pids
    members = [ctx.myid, 2, 3, 4]

    def live_pids():
        calls.append(1)
        return members

    monkeypatch.setattr(ctx, "live_pids", live_pids)
    monkeypatch.setattr("distexec.runtime.arguments.check_exists", lambda ctx, pid: None)
    return ctx, calls, real


def test_a_pool_take_reads_the_membership_only_when_it_changed(monkeypatch):
    ctx, calls, _ = _fake_cluster(monkeypatch)
    pool = WorkerPool([2, 3, 4])
    for _ in range(100):
        pool.put(pool.take())
    assert len(calls) <= 1  # once after the pushes, not per take
    ctx.changed.notifications += 1  # a worker came or went: the next take prunes
    pool.put(pool.take())
    assert len(calls) <= 2


def test_a_worker_put_back_reaches_a_taker_and_a_waiter(monkeypatch):
    """put wakes one taker when only takers wait, all when a wait() (which takes nothing)
    does: no taker is left asleep beside a free worker either way."""
    _fake_cluster(monkeypatch)
    pool = WorkerPool([2])
    pid = pool.take()
    woken = threading.Event()
    waiter = threading.Thread(target=lambda: (pool.wait(), woken.set()))
    waiter.start()
    while pool._watchers == 0:
        time.sleep(0.01)
    pool.put(pid)
    assert woken.wait(5)
    waiter.join(5)

    pid = pool.take()
    taken: list[int] = []
    takers = [threading.Thread(target=lambda: taken.append(pool.take())) for _ in range(3)]
    for t in takers:
        t.start()
    for round_ in range(1, 4):  # each put goes to one of the takers still waiting
        pool.put(pid)
        for _ in range(500):
            if len(taken) == round_:
                break
            time.sleep(0.01)
        assert len(taken) == round_
    for t in takers:
        t.join(5)
    assert taken == [pid] * 3
