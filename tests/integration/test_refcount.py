"""Distributed reference counting, observed from the owners' reference tables.

A value lives on its owner while any process holds a reference to it that has not fetched
it; these tests hold, forward, fetch and drop references and watch the owner's table
(``owned_refs_count`` / ``owned_clients``, asked with a remote call). Releases travel
asynchronously, so every "is freed" is waited for with ``wait_until``; every "is still there"
is checked after an event that would have freed it if the bookkeeping were wrong.
"""

from __future__ import annotations

import gc
import sys

import cloudpickle
import pytest

import distexec
from distexec import Future, RemoteChannel
from distexec.runtime.context import current_context
from distexec.runtime.owned import owned_clients, owned_refs_count
from tests.helpers import kill_and_wait, owner_clients, wait_until

pytestmark = pytest.mark.timeout(60)

# Functions defined here travel by value, so workers never import this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

DEADLINE = 10.0


def _flush_releases(owner: int) -> None:
    """On any process: send the releases queued here, then a call to ``owner`` behind them.

    GC notices and calls share a connection, so when the call returns the owner has applied
    every notice this process had queued.
    """
    gc.collect()
    current_context().gc.flush()
    if owner != distexec.myid():
        distexec.remotecall_fetch(lambda: None, owner)


def settle(owner: int) -> None:
    """Make every release already queued anywhere reach ``owner``."""
    for pid in distexec.procs():
        if pid == distexec.myid():
            _flush_releases(owner)
        elif pid != owner:
            distexec.remotecall_fetch(_flush_releases, pid, owner)


def still(pid: int, ref, expected) -> None:
    """Assert the owner's client set for ``ref`` is ``expected`` once nothing is in flight."""
    settle(pid)
    assert owner_clients(pid, ref) == (None if expected is None else frozenset(expected))


def wait_clients(pid: int, ref, expected) -> None:
    """Wait until the owner's client set for ``ref`` is ``expected`` (None: freed), and stays."""
    expected = None if expected is None else frozenset(expected)
    wait_until(lambda: owner_clients(pid, ref) == expected, DEADLINE,
               message=f"clients of {ref!r} on {pid} == {expected}")
    still(pid, ref, expected)


def count(pid: int) -> int:
    return distexec.remotecall_fetch(owned_refs_count, pid)


@pytest.fixture
def w(shared_workers):
    return shared_workers


ME = 1  # the master's pid: the tests run there


# --------------------------------------------------------------------------------------------
# remotecall results
# --------------------------------------------------------------------------------------------
def test_results_stay_on_the_owner_until_fetched_then_are_freed(add_workers):
    (pid,) = add_workers(1)  # a fresh owner: its table holds only what this test makes
    assert count(pid) == 0
    futs = [distexec.remotecall(lambda i: i, pid, i) for i in range(5)]
    for f in futs:
        f.wait(timeout=DEADLINE)
    settle(pid)
    assert count(pid) == 5
    assert [f.fetch() for f in futs[:3]] == [0, 1, 2]
    wait_until(lambda: count(pid) == 2, DEADLINE, message="3 fetched results freed")
    settle(pid)
    assert count(pid) == 2
    assert [f.fetch() for f in futs] == [0, 1, 2, 3, 4]
    wait_until(lambda: count(pid) == 0, DEADLINE, message="all results freed")


def test_a_result_is_kept_for_its_creator_only(w):
    fut = distexec.remotecall(lambda: "v", w[0])
    fut.wait(timeout=DEADLINE)
    still(w[0], fut, {ME})
    fut.fetch()
    wait_clients(w[0], fut, None)


def test_remotecall_wait_result_stays_until_fetched(w):
    fut = distexec.remotecall_wait(lambda: "waited", w[0])
    still(w[0], fut, {ME})
    assert fut.fetch() == "waited"
    wait_clients(w[0], fut, None)


def test_an_unfetched_result_is_freed_when_dropped(w):
    fut = distexec.remotecall(lambda: "never fetched", w[0])
    fut.wait(timeout=DEADLINE)
    probe = distexec.remoteref_id(fut)
    assert distexec.remotecall_fetch(owned_clients, w[0], tuple(probe)) == {ME}
    del fut  # dropped the way a user drops it
    gc.collect()
    wait_until(lambda: distexec.remotecall_fetch(owned_clients, w[0], tuple(probe)) is None,
               DEADLINE, message="dropped result freed")


def test_release_frees_an_unfetched_result_at_once(w):
    fut = distexec.remotecall(lambda: "released", w[1])
    fut.wait(timeout=DEADLINE)
    fut.release()
    wait_clients(w[1], fut, None)
    fut.release()  # idempotent


def test_a_failure_stays_until_released(w):
    fut = distexec.remotecall(lambda: 1 / 0, w[0])
    with pytest.raises(distexec.RemoteException):
        fut.fetch(timeout=DEADLINE)
    # A failed fetch does not count as fetched: the error is kept for the next one.
    still(w[0], fut, {ME})
    fut.release()
    wait_clients(w[0], fut, None)


def test_a_result_on_this_process_is_freed_after_fetch():
    fut = distexec.remotecall(lambda: "local", distexec.myid())
    fut.wait(timeout=DEADLINE)
    assert owned_clients(distexec.remoteref_id(fut)) == {ME}
    assert fut.fetch() == "local"
    wait_until(lambda: owned_clients(distexec.remoteref_id(fut)) is None, DEADLINE)


# --------------------------------------------------------------------------------------------
# forwarded Futures
# --------------------------------------------------------------------------------------------
def test_a_forwarded_future_stays_until_every_holder_fetched(w):
    owner, other = w
    fut = distexec.remotecall(distexec.myid, owner)
    store = RemoteChannel(other)
    store.put(fut)  # `other` holds an unfetched copy
    assert fut.fetch() == owner
    wait_clients(owner, fut, {other})
    assert distexec.remotecall_fetch(lambda s: s.fetch().fetch(), other, store) == owner
    wait_clients(owner, fut, None)


def test_a_forwarded_future_stays_until_every_holder_dropped(w):
    owner, other = w
    fut = distexec.remotecall(lambda: "x", owner)
    store = RemoteChannel(other)
    store.put(fut)
    fut.release()
    wait_clients(owner, fut, {other})
    distexec.remotecall_fetch(lambda s: s.take() and None, other, store)  # dropped there
    wait_clients(owner, fut, None)


def test_a_fetched_future_adds_no_client_when_forwarded(w):
    owner, other = w
    fut = distexec.remotecall(lambda: [1, 2], owner)
    fut.wait(timeout=DEADLINE)
    fut.fetch()
    store = RemoteChannel(other)
    store.put(fut)  # carries its value: `other` never needs the owner
    wait_clients(owner, fut, None)
    assert distexec.remotecall_fetch(lambda s: s.fetch().fetch(timeout=5), other, store) == [1, 2]


def test_a_future_sent_to_its_owner_and_fetched_there_keeps_only_its_creator(w):
    """Julia #25847: fetching on the owner must not leave the owner in its own client set."""
    owner = w[0]
    fut = distexec.remotecall_wait(lambda: list(range(10)), owner)

    def fetch_there(ref):
        ref.fetch()
        return True

    for _ in range(2):
        assert distexec.remotecall_fetch(fetch_there, owner, fut)
        wait_clients(owner, fut, {ME})
    fut.release()
    wait_clients(owner, fut, None)


def test_a_future_is_not_made_on_its_owner_until_touched(w):
    fut = Future(w[0])
    assert owner_clients(w[0], fut) is None
    assert fut.isready() is False  # touching it creates it, held by its creator
    assert owner_clients(w[0], fut) == {ME}
    fut.put("set")
    # The putter has the value cached, so the owner's copy goes at once.
    wait_clients(w[0], fut, None)
    assert fut.fetch() == "set"


def test_a_future_put_by_another_process_is_kept_for_the_creator(w):
    fut = Future(w[0])
    distexec.remotecall_fetch(lambda f: f.put("from 3") and None, w[1], fut)
    wait_clients(w[0], fut, {ME})
    assert fut.fetch() == "from 3"
    wait_clients(w[0], fut, None)


# --------------------------------------------------------------------------------------------
# RemoteChannels
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["worker", "master"])
def test_a_channel_survives_fetch_and_is_freed_when_released(w, where):
    owner = w[0] if where == "worker" else ME
    rc = RemoteChannel(owner)
    rc.put("kept")
    assert rc.fetch() == "kept"
    still(owner, rc, {ME})
    assert rc.take() == "kept"
    still(owner, rc, {ME})
    rc.release()
    wait_clients(owner, rc, None)


def test_a_channel_is_freed_after_all_holders_release(w):
    owner, other = w
    rc = RemoteChannel(owner)
    rc.put("shared")
    store = RemoteChannel(other)
    store.put(rc)
    wait_clients(owner, rc, {ME, other})
    del rc
    gc.collect()
    probe = distexec.remotecall_fetch(lambda s: tuple(distexec.remoteref_id(s.fetch())),
                                      other, store)
    wait_until(lambda: distexec.remotecall_fetch(owned_clients, owner, probe) == {other},
               DEADLINE, message="only `other` holds the channel")
    assert distexec.remotecall_fetch(lambda s: s.fetch().fetch(), other, store) == "shared"
    distexec.remotecall_fetch(lambda s: s.take() and None, other, store)
    wait_until(lambda: distexec.remotecall_fetch(owned_clients, owner, probe) is None,
               DEADLINE, message="channel freed")


def test_a_channel_made_on_a_worker_and_returned_is_held_by_the_receiver(w):
    owner, maker = w
    rc = distexec.remotecall_fetch(lambda p: RemoteChannel(p, 2), maker, owner)
    assert (rc.where, rc.whence) == (owner, maker)
    rc.put(1)
    wait_clients(owner, rc, {ME})  # the maker dropped its copy, the master holds one
    assert rc.take() == 1
    rc.release()
    wait_clients(owner, rc, None)


# --------------------------------------------------------------------------------------------
# worker death
# --------------------------------------------------------------------------------------------
def test_a_dead_worker_leaves_every_client_set(w, add_workers):
    owner = w[0]
    (victim,) = add_workers(1)
    rc = RemoteChannel(owner)
    fut = distexec.remotecall(lambda: "result", owner)
    fut.wait(timeout=DEADLINE)
    holder = RemoteChannel(victim, 2)
    holder.put(rc)
    holder.put(fut)
    wait_clients(owner, rc, {ME, victim})
    wait_clients(owner, fut, {ME, victim})
    fut.release()
    wait_clients(owner, fut, {victim})

    kill_and_wait(victim)
    wait_clients(owner, rc, {ME})
    wait_clients(owner, fut, None)
    rc.put("still usable")
    assert rc.take() == "still usable"


# --------------------------------------------------------------------------------------------
# after release
# --------------------------------------------------------------------------------------------
def test_a_released_channel_is_dead_and_does_not_bring_its_value_back(w):
    rc = RemoteChannel(w[0])
    rc.put("gone")
    rc.release()
    wait_clients(w[0], rc, None)
    for use in (lambda: rc.put(1), rc.take, rc.fetch, rc.isready, lambda: len(rc),
                lambda: rc[0]):
        with pytest.raises(distexec.DistributedError, match="released"):
            use()
    # Sent elsewhere it arrives as dead as it left, and the owner is not told to keep it.
    assert distexec.remotecall_fetch(lambda c: tuple(distexec.remoteref_id(c)), w[1], rc) == (0, 0)
    still(w[0], rc, None)


def test_a_released_future_keeps_its_cached_value_only(w):
    fetched = distexec.remotecall(lambda: "cached", w[0])
    fetched.fetch()
    fetched.release()
    assert fetched.fetch() == "cached"
    pending = distexec.remotecall(lambda: "lost", w[0])
    pending.wait(timeout=DEADLINE)
    pending.release()
    wait_clients(w[0], pending, None)
    with pytest.raises(distexec.DistributedError, match="released"):
        pending.fetch()
    still(w[0], pending, None)
