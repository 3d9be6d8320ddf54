"""Topologies: all_to_all with lazy and eager worker-to-worker links, and master_worker.

Julia: the ``topology`` and ``lazy`` keywords of ``addprocs`` (spec/distributednext.md §2.3,
§10.5). Topology and laziness are cluster-wide, so every test starts from a cluster without
workers (``empty_cluster``) and adds its own.
"""

from __future__ import annotations

import itertools

import pytest

import distexec as d
from distexec.runtime.context import current_context

pytestmark = pytest.mark.timeout(60)


# --------------------------------------------------------------------------------------------
# remote helpers
# --------------------------------------------------------------------------------------------
def _linked_peers() -> list[int]:
    """On a worker: the other workers it holds a connection to."""
    ctx = current_context()
    with ctx.lock:
        return sorted(p for p, r in ctx.peers.items() if p != 1 and r.conn is not None)


def _links(pids) -> set[frozenset[int]]:
    """Every worker-worker link, as seen from both ends (each end must agree)."""
    ends = {p: d.remotecall_fetch(_linked_peers, p) for p in pids}
    links = set()
    for pid, linked in ends.items():
        for other in linked:
            assert pid in ends.get(other, [pid]), f"{pid} links to {other}, not back: {ends}"
            links.add(frozenset((pid, other)))
    return links


def _endpoint_count(pids) -> int:
    return sum(len(d.remotecall_fetch(_linked_peers, p)) for p in pids)


def _call_via(caller: int, callee: int):
    """From ``caller``, ask ``callee`` for its id."""
    return d.remotecall_fetch(d.remotecall_fetch, caller, d.myid, callee)


# --------------------------------------------------------------------------------------------
# all_to_all, lazy (the default)
# --------------------------------------------------------------------------------------------
def test_lazy_starts_without_worker_links(empty_cluster, add_workers):
    pids = add_workers(3)
    assert _endpoint_count(pids) == 0


def test_lazy_calls_work_higher_to_lower(empty_cluster, add_workers):
    low, high = add_workers(2)
    assert _call_via(high, low) == low
    assert _links([low, high]) == {frozenset((low, high))}


def test_lazy_calls_work_lower_to_higher(empty_cluster, add_workers):
    low, high = add_workers(2)
    assert _call_via(low, high) == high
    assert _links([low, high]) == {frozenset((low, high))}
    assert _call_via(high, low) == low  # the same link, both ways
    assert _links([low, high]) == {frozenset((low, high))}


def test_lazy_links_grow_by_one_per_new_pair(empty_cluster, add_workers):
    pids = add_workers(4)
    expected: set[frozenset[int]] = set()
    for caller, callee in itertools.permutations(pids, 2):
        before = _endpoint_count(pids)
        assert _call_via(caller, callee) == callee
        new_pair = frozenset((caller, callee)) not in expected
        expected.add(frozenset((caller, callee)))
        assert _endpoint_count(pids) == before + (2 if new_pair else 0), (caller, callee)
        assert _links(pids) == expected
    assert len(expected) == 6


def test_lazy_first_calls_from_both_ends_at_once_share_one_link(empty_cluster, add_workers):
    low, high = add_workers(2)
    calls = [d.remotecall(_call_via_worker, low, high), d.remotecall(_call_via_worker, high, low)]
    assert [c.fetch(timeout=20) for c in calls] == [high, low]
    assert _links([low, high]) == {frozenset((low, high))}


def _call_via_worker(callee: int):
    return d.remotecall_fetch(d.myid, callee)


def test_lazy_links_to_a_later_worker(empty_cluster, add_workers):
    (first,) = add_workers(1)
    (later,) = add_workers(1)
    assert _call_via(first, later) == later
    assert _call_via(later, first) == first
    assert _links([first, later]) == {frozenset((first, later))}


# --------------------------------------------------------------------------------------------
# all_to_all, eager (lazy=False)
# --------------------------------------------------------------------------------------------
def _all_pairs(pids) -> set[frozenset[int]]:
    return {frozenset(pair) for pair in itertools.combinations(pids, 2)}


def test_eager_links_exist_right_after_addprocs(empty_cluster, add_workers):
    pids = add_workers(4, lazy=False)
    assert _links(pids) == _all_pairs(pids)
    assert _endpoint_count(pids) == 4 * 3


def test_eager_links_include_workers_added_later(empty_cluster, add_workers):
    pids = add_workers(2, lazy=False)
    pids += add_workers(2, lazy=False)
    assert _links(pids) == _all_pairs(pids)
    for caller, callee in itertools.permutations(pids, 2):
        assert _call_via(caller, callee) == callee
    assert _links(pids) == _all_pairs(pids)


def test_eager_worker_views_agree_also_after_a_removal(empty_cluster, add_workers):
    pids = add_workers(3, lazy=False)
    for pid in pids:
        assert d.remotecall_fetch(d.workers, pid) == pids
    d.rmprocs(pids[1])
    left = [pids[0], pids[2]]
    for pid in left:
        assert d.remotecall_fetch(d.workers, pid) == left
    assert _links(left) == {frozenset(left)}


# --------------------------------------------------------------------------------------------
# master_worker
# --------------------------------------------------------------------------------------------
def test_master_worker_refuses_worker_to_worker_calls(empty_cluster, add_workers):
    low, high = add_workers(2, topology="master_worker")
    for caller, callee in ((low, high), (high, low)):
        with pytest.raises(d.RemoteException) as info:
            _call_via(caller, callee)
        assert info.value.pid == caller
        assert "Topology : master_worker" in str(info.value)
    assert _endpoint_count([low, high]) == 0
    assert d.remotecall_fetch(d.myid, low) == low


def test_master_worker_views_agree_with_the_master(empty_cluster, add_workers):
    pids = add_workers(3, topology="master_worker")
    for pid in pids:
        assert d.remotecall_fetch(d.workers, pid) == pids
    d.rmprocs(pids[0])
    for pid in pids[1:]:
        assert d.remotecall_fetch(d.workers, pid) == pids[1:]


def test_topology_accepted_again_while_the_same(empty_cluster, add_workers):
    pids = add_workers(1, topology="master_worker")
    pids += add_workers(1, topology="master_worker")
    with pytest.raises(d.RemoteException, match="Topology : master_worker"):
        _call_via(pids[1], pids[0])


# --------------------------------------------------------------------------------------------
# cluster-wide settings
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("first, second", [
    ({}, {"topology": "master_worker"}),
    ({"topology": "master_worker"}, {"topology": "all_to_all"}),
    ({"topology": "master_worker"}, {}),
])
def test_changing_the_topology_with_workers_is_refused(empty_cluster, add_workers,
                                                        first, second):
    pids = add_workers(1, **first)
    with pytest.raises(d.DistributedError, match="already exist"):
        d.addprocs(1, **second)
    assert d.procs() == [1, *pids]


@pytest.mark.parametrize("first, second", [(True, False), (False, True)])
def test_changing_lazy_with_workers_is_refused(empty_cluster, add_workers, first, second):
    pids = add_workers(1, lazy=first)
    with pytest.raises(ValueError, match=f"lazy={first}.*lazy={second}"):
        d.addprocs(1, lazy=second)
    assert d.procs() == [1, *pids]


def test_topology_can_change_once_the_workers_are_gone(empty_cluster, add_workers):
    pids = add_workers(2, topology="master_worker")
    d.rmprocs(pids)
    low, high = add_workers(2, lazy=False)
    assert _links([low, high]) == {frozenset((low, high))}
    assert _call_via(low, high) == high
