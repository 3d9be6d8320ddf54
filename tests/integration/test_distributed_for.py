"""distributed_for (Julia's ``@distributed``) with and without a reducer, and ``with sync():``
(spec/distributednext.md §8).

Real workers on loopback. The test that needs a cluster without workers comes first and
removes any it finds; the rest share the module's two ``shared_workers``. Work that must not
finish yet waits on a *gate*, a master-owned RemoteChannel the test feeds; what the loop
bodies did is logged into a master-owned unbounded RemoteChannel.
"""

from __future__ import annotations

import concurrent.futures as cf
import operator
import sys
from collections import Counter

import cloudpickle
import pytest

import distexec
from distexec import (
    CompositeException,
    RemoteChannel,
    RemoteException,
    distributed_for,
    sync,
)
from tests.helpers import drain, new_log

pytestmark = pytest.mark.timeout(60)

# Functions defined here travel by value, so workers never import this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

DEADLINE = 10.0  # seconds for something that must happen


# --------------------------------------------------------------------------------------------
# without workers (first: it removes workers)
# --------------------------------------------------------------------------------------------
def test_without_workers_the_loop_runs_on_the_master(no_workers):
    assert distributed_for(lambda x: [(x, distexec.myid())], range(4), operator.add) == \
        [(x, 1) for x in range(4)]
    log = new_log()
    distributed_for(lambda x: log.put(x), range(5)).result(DEADLINE)
    assert sorted(drain(log)) == list(range(5))


# --------------------------------------------------------------------------------------------
# with a reducer
# --------------------------------------------------------------------------------------------
def test_a_sum_equals_the_sequential_fold(shared_workers):
    assert distributed_for(lambda x: x * x, range(1000), operator.add) == \
        sum(x * x for x in range(1000))


def test_list_concatenation_preserves_iteration_order(shared_workers):
    words = [f"w{i}" for i in range(37)]
    assert distributed_for(lambda w: [w.upper()], words, operator.add) == \
        [w.upper() for w in words]
    assert distributed_for(str, range(12), operator.add) == "01234567891011"


def test_chunks_are_contiguous_balanced_and_go_to_the_workers_in_order(shared_workers):
    a, b = shared_workers
    placed = distributed_for(lambda x: [(x, distexec.myid())], range(7), operator.add)
    assert placed == [(x, a) for x in range(4)] + [(x, b) for x in range(4, 7)]
    counts = distributed_for(lambda x: Counter([distexec.myid()]), range(10), operator.add)
    assert counts == Counter({a: 5, b: 5})


def test_fewer_elements_than_workers_uses_fewer_workers(shared_workers):
    a, _b = shared_workers
    assert distributed_for(lambda x: [distexec.myid()], ["only"], operator.add) == [a]


def test_the_iterable_is_evaluated_once_on_the_caller(shared_workers):
    produced = []

    def source():
        for x in range(10):
            produced.append(x)
            yield x

    assert distributed_for(lambda x: x, source(), operator.add) == 45
    assert produced == list(range(10))


def test_an_error_in_the_body_propagates(shared_workers):
    with pytest.raises(RemoteException) as info:
        distributed_for(lambda x: 1 / (x - 5), range(10), operator.add)
    assert isinstance(info.value.captured.ex, ZeroDivisionError)


def test_a_reduction_over_nothing_raises(shared_workers):
    with pytest.raises(ValueError):
        distributed_for(lambda x: x, [], operator.add)


# --------------------------------------------------------------------------------------------
# without a reducer
# --------------------------------------------------------------------------------------------
def test_without_reducer_returns_a_handle_at_once(shared_workers):
    gate, log = RemoteChannel(), new_log()

    def body(x):
        if x == 0:
            gate.take()
        log.put((x, distexec.myid()))

    handle = distributed_for(body, range(8))
    assert isinstance(handle, cf.Future)
    with pytest.raises(cf.TimeoutError):
        handle.result(timeout=0.2)  # still running: element 0 waits on the gate
    gate.put("go")
    assert handle.result(timeout=DEADLINE) is None
    logged = drain(log)
    assert sorted(x for x, _ in logged) == list(range(8))
    assert {pid for _, pid in logged} == set(shared_workers)


def test_sync_waits_for_the_loops_started_inside(shared_workers):
    gate, log = RemoteChannel(), new_log()

    def body(x):
        gate.take()  # one token per element
        log.put(x)

    with sync():
        first = distributed_for(body, range(6))
        second = distributed_for(body, range(6, 10))
        assert not first.done() and not second.done()
        for _ in range(10):
            gate.put("go")  # the elements can only finish after this
    assert first.done() and second.done()
    assert sorted(drain(log)) == list(range(10))


def test_errors_inside_surface_as_composite_exception(shared_workers):
    handle = distributed_for(lambda x: 1 / (x - 3), range(8))
    with pytest.raises(CompositeException) as info:
        handle.result(timeout=DEADLINE)
    (only,) = info.value.exceptions
    assert isinstance(only, RemoteException)
    assert isinstance(only.captured.ex, ZeroDivisionError)


def test_sync_raises_the_errors_of_its_loops(shared_workers):
    log = new_log()
    with pytest.raises(CompositeException) as info:
        with sync():
            distributed_for(lambda x: 1 / (x - 3), range(8))
            distributed_for(lambda x: log.put(x), range(4))
    (failed,) = info.value.exceptions  # the failing loop's errors, not a group in a group
    assert isinstance(failed, RemoteException)
    assert isinstance(failed.captured.ex, ZeroDivisionError)
    assert str(info.value) == f"ZeroDivisionError on worker {failed.pid}: division by zero"
    assert sorted(drain(log)) == list(range(4))  # the other loop was waited for too


def test_sync_collects_only_in_its_own_block(shared_workers):
    gate = RemoteChannel()
    outside = distributed_for(lambda x: gate.take(), range(1))
    with sync() as pending:
        inside = distributed_for(lambda x: None, range(3))
    assert pending == [inside]
    assert not outside.done()
    gate.put("go")
    assert outside.result(timeout=DEADLINE) is None
