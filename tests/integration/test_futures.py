"""Future: fetch, caching, write-once put, waiting, errors, and concurrent.futures interop.

Real workers on loopback (the module's two ``shared_workers``). A computation that must not
finish yet waits on a *gate*: a master-owned RemoteChannel the test feeds when it wants the
computation to go on. "Blocked" is observed by waiting briefly for an event that must not
fire. That the owner freed a value is read from the owner's reference table
(``owned_clients``, through ``tests.helpers.owns``) with ``wait_until``.
"""

from __future__ import annotations

import concurrent.futures as cf
import pickle
import sys

import cloudpickle
import pytest

import distexec
from distexec import DistributedError, Future, RemoteChannel, RemoteException
from tests.helpers import InThread, owns, wait_freed, wait_until

pytestmark = pytest.mark.timeout(60)

# Functions defined here travel by value, so workers never import this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

BLOCKED = 0.2  # seconds to observe that something does not happen
DEADLINE = 10.0  # seconds for something that must happen


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def gated(pid: int, value, gate=None) -> tuple[Future, RemoteChannel]:
    """A remotecall on ``pid`` that returns ``value`` once the returned gate is fed."""
    gate = RemoteChannel() if gate is None else gate
    return distexec.remotecall(lambda g, v: (g.take(), v)[1], pid, gate, value), gate


def put_and_drop(ref, value) -> None:
    """Remote body: ``put`` into ``ref`` and return nothing (so no cached copy comes back)."""
    ref.put(value)


@pytest.fixture
def w(shared_workers):
    return shared_workers


# --------------------------------------------------------------------------------------------
# fetch
# --------------------------------------------------------------------------------------------
def test_fetch_blocks_until_the_value_exists(w):
    fut, gate = gated(w[0], "ready")
    fetching = InThread(fut.fetch)
    assert not fetching.done.wait(BLOCKED)
    gate.put(None)
    assert fetching.join() == "ready"


def test_fetch_caches_the_value_the_owner_then_frees(w):
    fut = distexec.remotecall(lambda: [1, 2, 3], w[0])
    value = fut.fetch()
    assert value == [1, 2, 3]
    wait_freed(w[0], fut)
    # The owner has nothing left, so this can only come from the cache: same object, no call.
    assert fut.fetch() is value
    assert distexec.fetch(fut) is value
    assert fut.isready()


def test_fetched_value_survives_its_owner(add_workers):
    (pid,) = add_workers(1)
    fut = distexec.remotecall(lambda: {"k": 1}, pid)
    assert fut.fetch() == {"k": 1}
    distexec.rmprocs(pid, waitfor=20)
    assert pid not in distexec.procs()
    assert fut.fetch() == {"k": 1}
    assert fut.isready() and fut.done()
    fut.wait()


def test_none_is_a_cached_value(w):
    fut = distexec.remotecall(lambda: None, w[0])
    assert fut.fetch() is None
    wait_freed(w[0], fut)
    # "not cached" would ask the owner, which no longer has a value: a timeout, not None.
    assert fut.fetch(timeout=5) is None
    assert fut.isready()
    assert fut.wait(timeout=5) is fut


def test_failures_are_raised_and_not_cached(w):
    fut = distexec.remotecall(lambda: 1 / 0, w[0])
    for _ in range(2):
        with pytest.raises(RemoteException) as info:
            fut.fetch(timeout=DEADLINE)
        assert isinstance(info.value.captured.ex, ZeroDivisionError)
        assert info.value.pid == w[0]
    # Not cached: the owner still keeps the error for the next fetch.
    assert owns(w[0], fut)
    with pytest.raises(RemoteException):
        distexec.wait(fut, timeout=DEADLINE)
    with pytest.raises(RemoteException):
        fut.result(timeout=DEADLINE)


def test_fetch_of_a_local_failure_raises_too(w):
    fut = distexec.remotecall(lambda: 1 / 0, distexec.myid())
    for _ in range(2):
        with pytest.raises(RemoteException) as info:
            fut.fetch(timeout=DEADLINE)
        assert isinstance(info.value.captured.ex, ZeroDivisionError)


def test_getitem_fetches_then_indexes(w):
    fut = distexec.remotecall(lambda: ["a", "b", "c"], w[1])
    assert fut[1] == "b"
    assert fut[-1] == "c"


def test_remotecall_to_self_returns_a_working_future(w):
    fut = distexec.remotecall(lambda x: x * 2, distexec.myid(), 21)
    assert fut.where == distexec.myid()
    assert fut.fetch(timeout=DEADLINE) == 42
    assert fut.done()


# --------------------------------------------------------------------------------------------
# waiting: isready, wait, timeouts, concurrent.futures
# --------------------------------------------------------------------------------------------
def test_isready_wait_and_fetch_time_out_until_the_value_exists(w):
    fut, gate = gated(w[0], 7)
    assert fut.isready() is False
    assert distexec.isready(fut) is False
    with pytest.raises(TimeoutError):
        fut.wait(timeout=0.05)
    with pytest.raises(TimeoutError):
        distexec.wait(fut, timeout=0.05)
    with pytest.raises(TimeoutError):
        fut.fetch(timeout=0.05)
    with pytest.raises(TimeoutError):
        distexec.fetch(fut, timeout=0.05)
    gate.put(None)
    assert fut.wait(timeout=DEADLINE) is fut
    assert fut.isready() is True
    assert owns(w[0], fut) and "cached" not in repr(fut), "wait must not fetch"
    assert fut.fetch(timeout=DEADLINE) == 7


def test_done_turns_true_without_fetching(w):
    fut, gate = gated(w[0], "v")
    assert not fut.done()
    gate.put(None)
    wait_until(fut.done, DEADLINE, message="done()")
    # Done is only a notice: the value is still on the owner, not cached here.
    assert owns(w[0], fut)
    assert "cached" not in repr(fut)
    assert fut.fetch() == "v"


def test_concurrent_futures_wait_all_completed(w):
    futs = [distexec.remotecall(lambda i: i * i, w[i % 2], i) for i in range(6)]
    done, not_done = cf.wait(futs, timeout=DEADLINE, return_when=cf.ALL_COMPLETED)
    assert done == set(futs) and not not_done
    assert [f.fetch() for f in futs] == [0, 1, 4, 9, 16, 25]


def test_concurrent_futures_wait_first_completed(w):
    slow, gate = gated(w[0], "slow")
    fast = distexec.remotecall(lambda: "fast", w[1])
    done, not_done = cf.wait([slow, fast], timeout=DEADLINE, return_when=cf.FIRST_COMPLETED)
    assert done == {fast} and not_done == {slow}
    gate.put(None)
    done, not_done = cf.wait([slow, fast], timeout=DEADLINE)
    assert done == {slow, fast}
    assert slow.fetch() == "slow"


def test_concurrent_futures_wait_sees_failures_and_first_exception(w):
    slow, gate = gated(w[0], "slow")
    bad = distexec.remotecall(lambda: 1 / 0, w[1])
    done, not_done = cf.wait([slow, bad], timeout=DEADLINE, return_when=cf.FIRST_EXCEPTION)
    assert done == {bad} and not_done == {slow}
    assert isinstance(bad.exception(), RemoteException)
    gate.put(None)
    assert slow.fetch() == "slow"


def test_as_completed_yields_in_completion_order(w):
    gate1, gate2 = RemoteChannel(), RemoteChannel()
    first, _ = gated(w[0], 1, gate1)
    second, _ = gated(w[1], 2, gate2)
    order = cf.as_completed([first, second], timeout=DEADLINE)
    gate2.put(None)
    assert next(order) is second
    gate1.put(None)
    assert next(order) is first
    with pytest.raises(StopIteration):
        next(order)
    assert (first.fetch(), second.fetch()) == (1, 2)


def test_concurrent_fetches_from_ten_threads_do_not_hang(w):
    fut, gate = gated(w[0], [1.5])
    with cf.ThreadPoolExecutor(10) as pool:
        fetches = [pool.submit(fut.fetch) for _ in range(10)]
        done, _ = cf.wait(fetches, timeout=BLOCKED)
        assert not done
        gate.put(None)
        results = [f.result(timeout=DEADLINE) for f in fetches]
    assert results == [[1.5]] * 10
    assert all(r is results[0] for r in results), "one cached value wins"


def test_concurrent_fetches_from_two_processes_do_not_hang(w):
    fut, gate = gated(w[0], "shared")
    here = InThread(fut.fetch)
    there = distexec.remotecall(lambda f: f.fetch(), w[1], fut)
    assert not here.done.wait(BLOCKED)
    gate.put(None)
    assert here.join() == "shared"
    assert there.fetch(timeout=DEADLINE) == "shared"
    wait_freed(w[0], fut)


# --------------------------------------------------------------------------------------------
# Future(pid) and put
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["worker", "master"])
def test_future_put_from_another_process(w, where):
    pid = w[0] if where == "worker" else distexec.myid()
    fut = Future(pid)
    assert fut.where == pid and fut.whence == distexec.myid()
    assert not fut.isready()
    distexec.remotecall_fetch(put_and_drop, w[1], fut, {"from": w[1]})
    assert fut.isready()
    assert fut.fetch(timeout=DEADLINE) == {"from": w[1]}


@pytest.mark.parametrize("where", ["worker", "master"])
def test_second_put_from_the_same_process_fails(w, where):
    fut = Future(w[0] if where == "worker" else None)
    assert distexec.put(fut, "first") is fut
    with pytest.raises(DistributedError, match="Future can be set only once"):
        fut.put("second")
    assert fut.fetch() == "first"


def test_put_from_a_process_holding_an_uncached_copy_raises_remote_exception(w):
    owner, other = w
    fut = Future(owner)
    store = RemoteChannel(other)
    store.put(fut)  # `other` now holds a copy without a value
    fut.put("master's")

    def put_again(store):
        try:
            store.fetch().put("other's")
        except RemoteException as exc:
            return type(exc.captured.ex).__name__, str(exc.captured.ex)
        return None

    assert distexec.remotecall_fetch(put_again, other, store) == (
        "DistributedError", "Future can be set only once")
    assert distexec.remotecall_fetch(lambda s: s.fetch().fetch(), other, store) == "master's"


def test_take_and_close_are_not_supported(w):
    fut = distexec.remotecall(lambda: 1, w[0])
    with pytest.raises(TypeError):
        fut.take()
    with pytest.raises(TypeError):
        distexec.take(fut)
    with pytest.raises(TypeError):
        fut.close()
    with pytest.raises(TypeError):
        distexec.close(fut)
    assert fut.fetch() == 1


# --------------------------------------------------------------------------------------------
# sending Futures
# --------------------------------------------------------------------------------------------
def test_a_fetched_future_carries_its_value(w):
    fut = distexec.remotecall(lambda: list(range(5)), w[0])
    fut.fetch()
    wait_freed(w[0], fut)
    # The owner has no copy left: the receiver can only answer from the value that came along.
    got = distexec.remotecall_fetch(lambda f: (f.isready(), f.fetch(timeout=5)), w[1], fut)
    assert got == (True, [0, 1, 2, 3, 4])


def test_an_unfetched_future_can_be_fetched_by_the_receiver(w):
    fut = distexec.remotecall(lambda: "deferred", w[0])
    assert distexec.remotecall_fetch(lambda f: f.fetch(timeout=5), w[1], fut) == "deferred"
    assert fut.fetch() == "deferred"


def test_a_future_comes_back_as_the_same_object(w):
    fut = distexec.remotecall(lambda: 3, w[0])
    back = distexec.remotecall_fetch(lambda f: f, w[1], fut)
    assert back is fut
    assert distexec.remotecall_fetch(lambda f: (f, [f]), w[1], fut) == (fut, [fut])
    pair = distexec.remotecall_fetch(lambda f: (f, [f]), w[1], fut)
    assert pair[0] is fut and pair[1][0] is fut


def test_a_value_arriving_with_a_copy_fills_the_uncached_original(w):
    fut = Future(w[0])
    returned = distexec.remotecall_fetch(lambda f: f.put("filled"), w[1], fut)
    assert returned is fut
    assert "cached" in repr(fut)
    assert fut.fetch(timeout=5) == "filled"


def test_pickled_outside_the_cluster_is_an_inert_null_reference(w):
    fut = distexec.remotecall(lambda: 1, w[0])
    null = pickle.loads(pickle.dumps(fut))
    assert tuple(distexec.remoteref_id(null)) == (0, 0)
    assert null.where == 0
    with pytest.raises(DistributedError):
        null.fetch()
    assert fut.fetch() == 1
