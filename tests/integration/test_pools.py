"""Worker pools: the pool operations, dead-worker pruning, the default pool, pools shared with
workers, CachingPool, and the pool forms of the call API (spec/distributednext.md §6).

Real workers on loopback. Every test starts its own workers (``add_workers``), because the
default pool is the whole cluster's and several tests kill workers; the tests that need a
cluster without workers come first and remove any they find (``no_workers``).

"Blocked" is observed by waiting briefly for an event that must not fire. A computation that
must not finish yet waits on a *gate*, a master-owned RemoteChannel the test feeds. The pool
forms of the calls are tested both through the public ``distexec.remotecall*(fn, pool, ...)``
and through the pool layer's ``distexec.pools.pool_remotecall*`` (the ``via`` fixture).
"""

from __future__ import annotations

import concurrent.futures
import pickle
import sys
from types import SimpleNamespace

import cloudpickle
import pytest

import distexec
from distexec import (
    AbstractWorkerPool,
    CachingPool,
    DistributedError,
    RemoteChannel,
    RemoteException,
    WorkerPool,
    default_worker_pool,
    set_default_worker_pool,
)
from distexec.pools import (
    pool_remote_do,
    pool_remotecall,
    pool_remotecall_fetch,
    pool_remotecall_wait,
)
from distexec.runtime.context import default_context
from tests.helpers import PickleCounter, in_thread, kill_and_wait, kill_worker, pickles, wait_until

pytestmark = pytest.mark.timeout(60)

# Functions defined here travel by value, so workers never import this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

BLOCKED = 0.2  # seconds to observe that something does not happen
DEADLINE = 10.0  # seconds for something that must happen


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
@pytest.fixture
def fresh_default_pool():
    """Let a test create the master's default pool anew; the old one is restored after."""
    ctx = default_context()
    with ctx.lock:
        saved, ctx.default_pool = ctx.default_pool, None
    yield
    with ctx.lock:
        ctx.default_pool = saved


POOL_LAYER = SimpleNamespace(
    remotecall=lambda fn, pool, *args, **kw: pool_remotecall(fn, pool, args, kw),
    remotecall_fetch=lambda fn, pool, *args, **kw: pool_remotecall_fetch(fn, pool, args, kw),
    remotecall_wait=lambda fn, pool, *args, **kw: pool_remotecall_wait(fn, pool, args, kw),
    remote_do=lambda fn, pool, *args, **kw: pool_remote_do(fn, pool, args, kw),
)


@pytest.fixture(params=["distexec", "distexec.pools"])
def via(request):
    """The call functions taking a pool: the public API, or the pool layer under it."""
    return distexec if request.param == "distexec" else POOL_LAYER


def blocks(future, seconds: float = BLOCKED) -> bool:
    """Whether ``future`` (from ``in_thread``) is still pending after ``seconds``."""
    try:
        future.result(timeout=seconds)
    except (TimeoutError, concurrent.futures.TimeoutError):  # two types on Python 3.10
        return True
    except Exception:
        return False
    return False


def counting_closure():
    """A function that carries a PickleCounter and a large payload, like a closure over data."""
    counter, payload = PickleCounter(), bytes(1_000_000)

    def work(x):
        assert counter is not None and len(payload) == 1_000_000
        return distexec.myid(), x * 2

    return work


@pytest.fixture
def pickle_count():
    """A function returning how many PickleCounters were pickled since the test started."""
    pickles.clear()
    return lambda: len(pickles)


def owned_channels(pid: int) -> int:
    """How many channels worker ``pid`` owns (where a CachingPool keeps its functions)."""
    from distexec.runtime.channel import Channel

    def count():
        refs = dict(default_context().refs)
        return sum(isinstance(rv.store, Channel) for rv in refs.values())

    return distexec.remotecall_fetch(count, pid)


# --------------------------------------------------------------------------------------------
# the default pool of a cluster without workers (first: these remove workers)
# --------------------------------------------------------------------------------------------
def test_default_pool_without_workers_hands_out_the_master(no_workers):
    pool = default_worker_pool()
    assert pool.workers() == [1]
    assert pool.nworkers() == 1
    assert len(pool) == 0  # no members: pid 1 is lent, never a member
    assert pool.isready()
    assert pool.take() == 1
    assert pool.take() == 1  # never blocks
    assert pool.isready()
    pool.put(1)  # not a member: dropped
    assert len(pool) == 0 and pool.workers() == [1]
    pool.wait()  # returns at once
    assert pool_remotecall_fetch(distexec.myid, pool, (), {}) == 1


# --------------------------------------------------------------------------------------------
# the operations
# --------------------------------------------------------------------------------------------
def test_push_take_put_and_the_views(add_workers):
    a, b = add_workers(2)
    pool = WorkerPool([a])
    assert isinstance(pool, AbstractWorkerPool)
    assert (len(pool), pool.workers(), pool.nworkers(), pool.isready()) == (1, [a], 1, True)
    pool.push(b)
    assert (len(pool), pool.workers(), pool.nworkers()) == (2, [a, b], 2)
    assert pool.take() == a  # free members are handed out first in, first out
    assert pool.take() == b
    assert not pool.isready()
    assert (len(pool), pool.workers()) == (2, [a, b])  # busy members still count
    assert pool.put(b) == b
    assert pool.isready()
    pool.wait()  # a member is free: returns without taking it
    assert pool.isready()
    assert pool.take() == b


def test_an_empty_pool_is_not_the_default_pool(add_workers):
    add_workers(1)
    pool = WorkerPool()
    assert (len(pool), pool.workers(), pool.nworkers()) == (0, [], 0)
    with pytest.raises(DistributedError, match="No active worker available in pool"):
        pool.take()


def test_take_blocks_until_a_member_is_put_back(add_workers):
    (a,) = add_workers(1)
    pool = WorkerPool([a])
    assert pool.take() == a
    taker = in_thread(pool.take)
    assert blocks(taker)
    pool.put(a)
    assert taker.result(DEADLINE) == a
    assert not pool.isready()


def test_wait_blocks_until_a_member_is_put_back_and_does_not_take_it(add_workers):
    (a,) = add_workers(1)
    pool = WorkerPool([a])
    assert pool.take() == a
    waiter = in_thread(pool.wait)
    assert blocks(waiter)
    pool.put(a)
    assert waiter.result(DEADLINE) is None
    assert pool.isready() and pool.take() == a


def test_a_put_wakes_a_taker_even_when_waiters_wait_too(add_workers):
    (a,) = add_workers(1)
    pool = WorkerPool([a])
    assert pool.take() == a
    waiter = in_thread(pool.wait)
    assert blocks(waiter)  # the waiter waits first...
    taker = in_thread(pool.take)
    assert blocks(taker)  # ...then the taker
    pool.put(a)
    assert taker.result(DEADLINE) == a


def test_put_ignores_non_members(add_workers):
    a, b = add_workers(2)
    pool = WorkerPool([a])
    assert pool.take() == a
    assert pool.put(b) == b  # a live worker, but not a member
    assert pool.put(999) == 999  # not a worker at all
    assert pool.put(1) == 1
    assert not pool.isready()
    assert (len(pool), pool.workers()) == (1, [a])
    taker = in_thread(pool.take)
    assert blocks(taker)
    pool.put(a)
    assert taker.result(DEADLINE) == a


# --------------------------------------------------------------------------------------------
# dead members
# --------------------------------------------------------------------------------------------
def test_a_killed_worker_leaves_the_pool_and_is_never_handed_out(add_workers):
    a, b = add_workers(2)
    pool = WorkerPool([a, b])
    kill_and_wait(a)
    assert (len(pool), pool.workers(), pool.nworkers()) == (1, [b], 1)
    assert pool.take() == b
    assert not pool.isready()
    pool.put(a)  # returning the dead one does not bring it back
    assert not pool.isready()
    assert pool.workers() == [b]


def test_a_member_that_dies_while_taken_is_never_handed_out(add_workers):
    a, b = add_workers(2)
    pool = WorkerPool([a, b])
    assert pool.take() == a and pool.take() == b
    taker = in_thread(pool.take)
    assert blocks(taker)
    kill_and_wait(a)
    pool.put(a)  # e.g. its caller returning it after the call failed
    assert blocks(taker)
    pool.put(b)
    assert taker.result(DEADLINE) == b


def test_take_raises_once_every_member_died(add_workers):
    a, b = add_workers(2)
    pool = WorkerPool([a, b])
    kill_and_wait(a)
    kill_and_wait(b)
    assert (len(pool), pool.workers()) == (0, [])
    with pytest.raises(DistributedError, match="No active worker available in pool"):
        pool.take()


def test_a_blocked_take_fails_when_the_last_member_dies(add_workers):
    (a,) = add_workers(1)
    pool = WorkerPool([a])
    assert pool.take() == a
    taker = in_thread(pool.take)
    assert blocks(taker)
    kill_worker(a)
    with pytest.raises(DistributedError, match="No active worker available in pool"):
        taker.result(DEADLINE)


# --------------------------------------------------------------------------------------------
# the default pool
# --------------------------------------------------------------------------------------------
def test_default_pool_holds_every_worker_and_new_ones_join_it(add_workers):
    pool = default_worker_pool()
    assert default_worker_pool() is pool
    first = add_workers(2)
    assert pool.workers() == distexec.workers() == first
    (later,) = add_workers(1)
    assert pool.workers() == first + [later]
    distexec.rmprocs(later, waitfor=20)
    assert pool.workers() == first


def test_a_default_pool_created_late_holds_the_existing_workers(add_workers, fresh_default_pool):
    pids = add_workers(2)
    pool = default_worker_pool()
    assert pool.workers() == pids
    assert sorted([pool.take(), pool.take()]) == pids  # each exactly once
    assert not pool.isready()


def test_set_default_worker_pool_replaces_it(add_workers, fresh_default_pool):
    a, _b = add_workers(2)
    mine = CachingPool([a])
    assert set_default_worker_pool(mine) is mine
    assert default_worker_pool() is mine
    with pytest.raises(TypeError):
        set_default_worker_pool([a])


def test_the_default_pool_of_a_worker_is_the_masters(add_workers):
    a, b = add_workers(2)
    pool = default_worker_pool()
    assert distexec.remotecall_fetch(lambda: default_worker_pool().workers(), a) == [a, b]
    taken = distexec.remotecall_fetch(lambda: default_worker_pool().take(), a)
    assert taken in (a, b)
    assert pool.isready()
    other = pool.take()
    assert {taken, other} == {a, b}
    assert not pool.isready()  # the worker's take emptied the master's pool
    assert not distexec.remotecall_fetch(lambda: default_worker_pool().isready(), b)
    distexec.remotecall_fetch(lambda p: default_worker_pool().put(p), b, taken)
    assert pool.isready() and pool.take() == taken


# --------------------------------------------------------------------------------------------
# a pool sent to a worker acts on its owner's pool
# --------------------------------------------------------------------------------------------
def test_a_worker_taking_from_a_sent_pool_takes_from_the_masters(add_workers):
    a, b = add_workers(2)
    pool = WorkerPool([a, b])
    assert distexec.remotecall_fetch(lambda p: p.take(), a, pool) == a
    assert pool.isready() and len(pool) == 2
    assert pool.take() == b
    assert not pool.isready()
    seen = distexec.remotecall_fetch(
        lambda p: (isinstance(p, AbstractWorkerPool), p.isready(), len(p), p.workers(),
                   p.nworkers()), b, pool)
    assert seen == (True, False, 2, [a, b], 2)
    distexec.remotecall_fetch(lambda p: p.put(a), b, pool)
    assert pool.isready() and pool.take() == a


def test_a_worker_push_adds_to_the_masters_pool(add_workers):
    a, b = add_workers(2)
    pool = WorkerPool([a])
    distexec.remotecall_fetch(lambda p: p.push(b), a, pool)
    assert pool.workers() == [a, b]
    assert [pool.take(), pool.take()] == [a, b]


def test_a_worker_blocks_on_the_masters_pool_until_the_master_puts_back(add_workers):
    a, b = add_workers(2)
    pool = WorkerPool([b])
    assert pool.take() == b
    worker_take = distexec.remotecall(lambda p: p.take(), a, pool)
    with pytest.raises(TimeoutError):
        worker_take.fetch(timeout=BLOCKED)
    pool.put(b)
    assert worker_take.fetch(timeout=DEADLINE) == b
    assert not pool.isready()


def test_a_pool_sent_back_to_its_owner_is_the_pool_itself(add_workers):
    (a,) = add_workers(1)
    pool = WorkerPool([a])
    assert distexec.remotecall_fetch(lambda p: p, a, pool) is pool


def test_a_worker_pool_pickles_only_inside_a_cluster_send(add_workers):
    (a,) = add_workers(1)
    with pytest.raises(DistributedError):
        pickle.dumps(WorkerPool([a]))


# --------------------------------------------------------------------------------------------
# CachingPool
# --------------------------------------------------------------------------------------------
def test_caching_pool_ships_each_function_once_per_worker(add_workers, pickle_count, via):
    a, b = add_workers(2)
    work = counting_closure()
    pool = CachingPool([a, b])
    results = [via.remotecall_fetch(work, pool, i) for i in range(20)]
    assert [r[1] for r in results] == [2 * i for i in range(20)]
    assert {r[0] for r in results} == {a, b}
    assert pickle_count() == 2
    assert via.remotecall(work, pool, 1).fetch() in {(a, 2), (b, 2)}
    assert via.remotecall_wait(work, pool, 1).fetch() in {(a, 2), (b, 2)}
    via.remote_do(work, pool, 1)
    assert distexec.remote(work, pool)(x=1) in {(a, 2), (b, 2)}
    assert pickle_count() == 2


def test_a_plain_pool_ships_the_function_every_call(add_workers, pickle_count):
    a, b = add_workers(2)
    work = counting_closure()
    pool = WorkerPool([a, b])
    for i in range(5):
        pool_remotecall_fetch(work, pool, (i,), {})
    assert pickle_count() == 5


def test_caching_pool_keeps_a_function_whose_call_failed(add_workers, pickle_count):
    (a,) = add_workers(1)
    counter = PickleCounter()

    def fails(x):
        assert counter is not None
        raise ValueError(x)

    pool = CachingPool([a])
    for i in range(3):
        with pytest.raises(RemoteException) as info:
            pool_remotecall_fetch(fails, pool, (i,), {})
        assert isinstance(info.value.captured.ex, ValueError)
    assert pickle_count() == 1
    assert pool.isready()


def test_caching_pool_clear_frees_the_cached_functions_on_the_workers(add_workers, pickle_count):
    a, b = add_workers(2)
    work = counting_closure()
    pool = CachingPool([a, b])
    before = {p: owned_channels(p) for p in (a, b)}
    for i in range(6):
        pool_remotecall_fetch(work, pool, (i,), {})
    assert {p: owned_channels(p) for p in (a, b)} == {p: n + 1 for p, n in before.items()}
    assert distexec.clear(pool) is pool
    wait_until(lambda: {p: owned_channels(p) for p in (a, b)} == before, DEADLINE,
               message="the workers to drop the cached function")
    pool_remotecall_fetch(work, pool, (0,), {})
    assert pickle_count() == 3  # shipped again after clear


def test_caching_pool_is_not_serializable(add_workers):
    (a,) = add_workers(1)
    pool = CachingPool([a])
    with pytest.raises(DistributedError, match="CachingPool objects are not serializable."):
        pickle.dumps(pool)
    with pytest.raises(DistributedError, match="CachingPool objects are not serializable."):
        distexec.remotecall_fetch(lambda p: 1, a, pool)


# --------------------------------------------------------------------------------------------
# the pool forms of the calls: when the worker goes back to the pool
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", [WorkerPool, CachingPool])
def test_remotecall_keeps_the_worker_until_its_future_completes(add_workers, kind, via):
    (a,) = add_workers(1)
    pool = kind([a])
    gate = RemoteChannel()
    future = via.remotecall(lambda g: g.take(), pool, gate)
    assert not pool.isready()
    taker = in_thread(pool.take)  # as a second call would
    assert blocks(taker)
    gate.put("go")
    assert taker.result(DEADLINE) == a  # back in the pool as the Future completed, unfetched
    assert future.fetch() == "go"
    pool.put(a)
    assert pool.isready()


def test_remotecall_returns_a_worker_whose_call_failed(add_workers, via):
    (a,) = add_workers(1)
    pool = WorkerPool([a])
    gate = RemoteChannel()
    future = via.remotecall(lambda g: 1 / g.take(), pool, gate)
    assert not pool.isready()
    gate.put(0)
    wait_until(pool.isready, DEADLINE, message="the worker to go back to the pool")
    with pytest.raises(RemoteException):
        future.fetch()


def test_remotecall_fetch_and_wait_return_the_worker_when_they_return(add_workers, via):
    (a,) = add_workers(1)
    pool = WorkerPool([a])
    assert via.remotecall_fetch(lambda x, y=0: (distexec.myid(), x + y), pool, 1, y=2) == (a, 3)
    assert pool.isready()
    assert via.remotecall_wait(lambda x: x + 1, pool, 1).fetch() == 2
    assert pool.isready()
    with pytest.raises(RemoteException):
        via.remotecall_fetch(lambda: 1 / 0, pool)
    assert pool.isready()


def test_remote_do_returns_the_worker_at_once(add_workers, via):
    (a,) = add_workers(1)
    pool = WorkerPool([a])
    gate, done = RemoteChannel(), RemoteChannel()
    via.remote_do(lambda g, d: d.put(g.take()), pool, gate, done)
    assert pool.isready()  # while the call still waits on the gate
    gate.put("went")
    assert done.take() == "went"


def test_remote_calls_through_a_pool_or_the_default_pool(add_workers):
    a, b = add_workers(2)
    assert distexec.remote(distexec.myid, WorkerPool([b]))() == b
    on_default = distexec.remote(lambda x, y: (distexec.myid(), x * y))
    assert [on_default(i, y=3)[1] for i in range(4)] == [0, 3, 6, 9]
    assert {on_default(0, 0)[0] for _ in range(4)} == {a, b}


def test_a_worker_calling_through_its_masters_pool(add_workers):
    a, b = add_workers(2)
    pool = WorkerPool([b, 1])

    def on_worker(p):
        values = [distexec.remotecall(distexec.myid, p).fetch() for _ in range(4)]
        values.append(distexec.remotecall_fetch(distexec.myid, p))
        return values

    values = distexec.remotecall_fetch(on_worker, a, pool)
    assert set(values) == {b, 1}
    assert sorted([pool.take(), pool.take()]) == [1, b]


def test_a_worker_that_dies_during_a_pool_call_leaves_the_pool(add_workers):
    (a,) = add_workers(1)
    pool = WorkerPool([a])
    gate = RemoteChannel()
    future = distexec.remotecall(lambda g: g.take(), pool, gate)
    kill_and_wait(a)
    with pytest.raises(distexec.ProcessExitedException):
        future.fetch(timeout=DEADLINE)
    assert pool.workers() == []
    with pytest.raises(DistributedError, match="No active worker available in pool"):
        distexec.remotecall_fetch(distexec.myid, pool)
