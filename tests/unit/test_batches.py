"""Batch sizing and the outcome format of executor batches (``distexec.runtime.batches``).

No processes: how many queued tasks travel together given what was measured, which tasks
share an estimate, and how one outcome that cannot be unpickled fails only its own task.
"""

from __future__ import annotations

import functools
import pickle

import pytest

from distexec import RemoteException
from distexec.runtime import batches
from distexec.runtime.batches import BatchSizer, Outcomes, cost_key
from distexec.runtime.context import ClusterContext

pytestmark = pytest.mark.timeout(30)


def work(x):
    return x


def other(x):
    return x


class Worker:
    def method(self, x):
        return x


def test_a_function_never_measured_travels_alone():
    assert BatchSizer().limit(work, backlog=1000, free_slots=1, slots=4) == 1


def test_no_batch_while_free_slots_can_take_the_backlog_one_by_one():
    sizer = BatchSizer()
    sizer.measured_alone(work, 1e-6)
    assert sizer.limit(work, backlog=3, free_slots=3, slots=4) == 1
    assert sizer.limit(work, backlog=9, free_slots=3, slots=4) == 3


def test_short_tasks_fill_a_batch_up_to_the_cap_and_a_fair_share():
    sizer = BatchSizer()
    sizer.measured_batch([work], 1e-7)
    assert sizer.limit(work, backlog=100_000, free_slots=1, slots=4) == batches.MAX_BATCH
    # the last tasks are spread over every slot
    assert sizer.limit(work, backlog=40, free_slots=1, slots=4) == 10


def test_a_batch_holds_about_batch_seconds_of_work():
    sizer = BatchSizer()
    sizer.measured_batch([work], batches.BATCH_SECONDS / 8)
    assert sizer.limit(work, backlog=100_000, free_slots=1, slots=4) == 8


def test_long_tasks_always_travel_alone():
    sizer = BatchSizer()
    sizer.measured_alone(work, 0.010)
    assert sizer.limit(work, backlog=100_000, free_slots=1, slots=4) == 1


def test_a_round_trip_only_lowers_the_estimate():
    sizer = BatchSizer()
    sizer.measured_alone(work, 0.010)
    sizer.measured_alone(work, 0.020)  # a slow round trip (a busy machine) changes nothing
    assert sizer.limit(work, backlog=100_000, free_slots=1, slots=4) == 1
    sizer.measured_alone(work, batches.BATCH_SECONDS / 4)
    assert sizer.limit(work, backlog=100_000, free_slots=1, slots=4) == 4


def test_a_slow_batch_raises_the_estimate_at_once_and_a_fast_one_lowers_it_gradually():
    sizer = BatchSizer()
    sizer.measured_batch([work], 1e-6)
    sizer.measured_batch([work], 0.1)  # one slow task in the batch: batch no more
    assert sizer.limit(work, backlog=100_000, free_slots=1, slots=4) == 1
    sizer.measured_batch([work], 1e-6)
    assert sizer._estimates[cost_key(work)] == pytest.approx(0.1 / 4)


def test_estimates_follow_the_code_not_the_callable():
    fresh = [lambda x: x for _ in range(2)]  # a new closure each time: one estimate
    assert cost_key(fresh[0]) == cost_key(fresh[1])
    assert cost_key(functools.partial(work, 1)) == cost_key(work)
    assert cost_key(Worker().method) == cost_key(Worker().method)
    assert cost_key(work) != cost_key(other)
    assert cost_key(len) != cost_key(abs)


def test_pickled_tasks_are_grouped_into_messages_within_the_byte_limit():
    tasks = [(None, b"x" * n, []) for n in (3, 3, 5, 20, 1)]
    groups = batches.by_size(tasks, 8)
    assert [[len(payload) for _, payload, _ in group] for group in groups] == [[3, 3], [5], [20], [1]]
    assert batches.by_size([], 8) == []


def test_the_table_of_estimates_is_bounded():
    sizer = BatchSizer()
    for i in range(BatchSizer.MAX_FUNCTIONS + 10):
        sizer._remember(("key", i), 1.0)
    assert len(sizer._estimates) == BatchSizer.MAX_FUNCTIONS
    assert ("key", 0) not in sizer._estimates


class FailsToLoad:
    def __reduce__(self):
        return (_refuse, ())


def _refuse():
    raise ValueError("cannot be rebuilt here")


def test_an_outcome_that_cannot_be_unpickled_fails_only_its_own_task():
    ctx = ClusterContext()
    good = pickle.dumps([1, 2], protocol=5)
    bad = pickle.dumps(FailsToLoad(), protocol=5)
    outcomes = pickle.loads(pickle.dumps(Outcomes(0, 0.05, [
        (False, None, None), (False, good, []), (False, bad, []), (False, "plain", None)])))
    assert outcomes.load(ctx, 2, 0) == (False, None)
    assert outcomes.load(ctx, 2, 1) == (False, [1, 2])
    is_error, error = outcomes.load(ctx, 2, 2)
    assert is_error and isinstance(error, RemoteException)
    assert isinstance(error.captured.ex, ValueError) and error.pid == ctx.myid
    assert outcomes.load(ctx, 2, 3) == (False, "plain")
