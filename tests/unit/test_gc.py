"""Unit tests of distributed reference counting: client sets, GC notices, release, forwarding.

No processes and no sockets: each test runs against its own ClusterContext (pid 1), made
current for the test's thread. Peers, where needed, are records whose connection only
records what would have been sent. The GC thread delivers notices asynchronously, so their
effect is waited for with ``wait_until``.
"""

from __future__ import annotations

import gc as pygc
import pickle
import threading
import time

import pytest

from distexec.protocol import serialization
from distexec.protocol.frames import RRID, Kind
from distexec.runtime import gc
from distexec.runtime.context import ClusterContext, WorkerRecord, WorkerState, _current
from distexec.runtime.owned import forget_client, lookup, owned_clients, owned_refs_count
from distexec.runtime.refs import Future, RemoteChannel
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(30)

ME = 1


@pytest.fixture
def ctx():
    context = ClusterContext()
    token = _current.set(context)
    yield context
    _current.reset(token)
    context.close()


class RecordingConn:
    """Stands in for a peer's connection: keeps every GC frame it is asked to send."""

    def __init__(self):
        self.entries: list[tuple[int, RRID, int]] = []
        self.frames = 0
        self.closed = False
        self.last_received = time.monotonic()  # the context's heartbeat watches it
        self._lock = threading.Lock()

    def send(self, kind, payload=b"", buffers=(), **ids):
        assert kind == Kind.GC
        with self._lock:
            self.frames += 1
            self.entries.extend(gc.decode(payload))

    def close(self):
        self.closed = True


def add_peer(ctx: ClusterContext, pid: int) -> RecordingConn:
    conn = RecordingConn()
    ctx.register(WorkerRecord(pid, WorkerState.CONNECTED, conn=conn))
    return conn


def clientset(ctx, rrid):
    rv = ctx.refs.get(rrid)
    return None if rv is None else set(rv.clientset)


# --------------------------------------------------------------------------------------------
# the wire format of GC notices
# --------------------------------------------------------------------------------------------
def test_entries_round_trip():
    entries = [(gc.ADD, RRID(1, 7), 3), (gc.DEL, RRID(4, 2**40), 1), (gc.DEL, RRID(2, 1), 2)]
    assert gc.decode(gc.encode(entries)) == entries
    assert gc.decode(gc.encode([])) == []


def test_a_malformed_frame_is_rejected():
    payload = gc.encode([(gc.ADD, RRID(1, 1), 2)])
    with pytest.raises(ValueError):
        gc.decode(payload[:-1])


# --------------------------------------------------------------------------------------------
# owner side: client sets
# --------------------------------------------------------------------------------------------
def test_first_lookup_makes_the_value_held_by_its_creator(ctx):
    rrid = RRID(5, 1)
    rv = lookup(ctx, rrid, list)
    assert rv.store == [] and rv.clientset == {5}
    assert lookup(ctx, rrid, lambda: pytest.fail("made twice")) is rv


def test_add_then_del_frees_only_when_nobody_holds(ctx):
    rrid = RRID(ME, 1)
    gc.add_client(ctx, rrid, 2)
    gc.add_client(ctx, rrid, 3)
    assert clientset(ctx, rrid) == {ME, 2, 3}
    gc.del_client(ctx, rrid, ME)
    gc.del_client(ctx, rrid, 2)
    assert clientset(ctx, rrid) == {3}
    gc.del_client(ctx, rrid, 3)
    assert clientset(ctx, rrid) is None
    gc.del_client(ctx, rrid, 3)  # a late release of a freed value does nothing
    assert owned_refs_count() == 0


def test_a_client_notice_before_the_first_operation_keeps_the_real_storage(ctx):
    rrid = RRID(ME, 2)
    gc.add_client(ctx, rrid, 2)  # forwarded before anyone used it
    rv = lookup(ctx, rrid, lambda: "the channel")
    assert rv.store == "the channel"
    assert rv.clientset == {ME, 2}


def test_entries_apply_in_order(ctx):
    rrid = RRID(ME, 3)
    gc.apply_entries(ctx, [(gc.ADD, rrid, 2), (gc.DEL, rrid, ME), (gc.DEL, rrid, 2),
                           (gc.ADD, RRID(ME, 4), 3)])
    assert clientset(ctx, rrid) is None
    assert clientset(ctx, RRID(ME, 4)) == {ME, 3}


def test_forgetting_a_dead_client(ctx):
    both, only_dead, other = RRID(ME, 1), RRID(2, 1), RRID(ME, 2)
    gc.add_client(ctx, both, 2)
    gc.add_client(ctx, other, 3)
    lookup(ctx, only_dead, list)  # created by 2, held by 2 only
    forget_client(ctx, 2)
    assert clientset(ctx, both) == {ME}
    assert clientset(ctx, only_dead) is None
    assert clientset(ctx, other) == {ME, 3}
    assert owned_clients(tuple(both)) == frozenset({ME})


# --------------------------------------------------------------------------------------------
# holder side: the GC queue
# --------------------------------------------------------------------------------------------
def test_queued_notices_reach_each_owner_in_order(ctx):
    conns = {pid: add_peer(ctx, pid) for pid in (2, 3)}
    sent = {2: [], 3: []}
    for i in range(1, 30):
        owner = 2 + i % 2
        entry = (gc.ADD if i % 3 else gc.DEL, RRID(owner, i), ME)
        sent[owner].append(entry)
        ctx.gc.enqueue(owner, *entry)
    for pid, conn in conns.items():
        wait_until(lambda conn=conn, pid=pid: len(conn.entries) == len(sent[pid]))
        assert conn.entries == sent[pid]
        assert conn.frames <= len(sent[pid])


def test_a_notice_for_this_process_is_applied_here(ctx):
    rrid = RRID(ME, 9)
    lookup(ctx, rrid, list)
    ctx.gc.enqueue(ME, gc.DEL, rrid, ME)
    wait_until(lambda: clientset(ctx, rrid) is None)


def test_a_vanished_owner_does_not_stop_the_queue(ctx):
    conn = add_peer(ctx, 2)
    ctx.gc.enqueue(9, gc.DEL, RRID(9, 1), ME)  # no such process
    ctx.gc.enqueue(2, gc.DEL, RRID(2, 1), ME)
    wait_until(lambda: conn.entries == [(gc.DEL, RRID(2, 1), ME)])


# --------------------------------------------------------------------------------------------
# releasing references
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", [Future, RemoteChannel])
def test_dropping_a_reference_releases_it(ctx, kind):
    ref = kind()
    ref.isready()  # touch it: the owner's value exists, held by its creator
    rrid = ref.rrid
    assert clientset(ctx, rrid) == {ME}
    del ref
    pygc.collect()
    wait_until(lambda: clientset(ctx, rrid) is None)


@pytest.mark.parametrize("kind", [Future, RemoteChannel])
def test_release_is_explicit_and_idempotent(ctx, kind):
    conn = add_peer(ctx, 2)
    ref = kind(2)
    ref.release()
    ref.release()
    del ref
    pygc.collect()
    wait_until(lambda: conn.entries)
    ctx.gc.flush()
    assert len(conn.entries) == 1


def test_a_future_that_arrived_with_its_value_owes_no_release(ctx):
    conn = add_peer(ctx, 2)
    sender_ctx = ClusterContext()
    sender = Future._existing(sender_ctx, 2, RRID(3, 50), cached="value")
    payload, buffers = serialization.dumps(sender, ME)
    with serialization.receiving(ctx, 3):
        arrived = serialization.loads(payload, buffers)
    assert arrived.fetch() == "value"
    del arrived
    pygc.collect()
    ctx.gc.flush()
    assert conn.entries == []  # the owner never counted this process
    sender_ctx.close()


def test_a_future_put_here_frees_the_owner_copy(ctx):
    fut = Future()
    fut.put("v")
    assert clientset(ctx, fut.rrid) is None
    assert fut.fetch() == "v"


# --------------------------------------------------------------------------------------------
# references crossing the cluster serializer
# --------------------------------------------------------------------------------------------
def test_forwarding_counts_the_receiver_before_it_is_sent(ctx):
    rc = RemoteChannel()
    rc.isready()
    serialization.dumps(rc, 2)
    assert clientset(ctx, rc.rrid) == {ME, 2}


def test_a_future_with_a_value_travels_without_a_client(ctx):
    fut = Future()
    fut.isready()
    other = Future._existing(ctx, ME, RRID(7, 1), cached=[1, 2])
    serialization.dumps((fut, other), 3)
    assert clientset(ctx, fut.rrid) == {ME, 3}
    assert clientset(ctx, other.rrid) is None


def test_forwarding_a_remote_owners_reference_tells_the_owner_first(ctx):
    owner = add_peer(ctx, 2)
    rc = RemoteChannel(2)
    serialization.dumps(rc, 3)
    assert owner.entries == [(gc.ADD, rc.rrid, 3)]  # sent synchronously, not queued
    serialization.dumps(rc, 2)
    assert owner.entries == [(gc.ADD, rc.rrid, 3)]  # the owner counts arrivals itself


def test_an_arriving_reference_is_the_one_already_held(ctx):
    add_peer(ctx, 2)
    rc = RemoteChannel(2)
    payload, buffers = serialization.dumps([rc, rc], 3)
    with serialization.receiving(ctx, 3):
        back = serialization.loads(payload, buffers)
    assert back[0] is rc and back[1] is rc


def test_a_value_arriving_with_a_copy_fills_the_held_future(ctx):
    conn = add_peer(ctx, 2)
    held = Future(2)
    sender = Future._existing(ClusterContext(), 2, held.rrid, cached="filled")
    sender_ctx = sender._ctx
    payload, buffers = serialization.dumps(sender, 1)
    with serialization.receiving(ctx, 2):
        arrived = serialization.loads(payload, buffers)
    assert arrived is held
    assert held.fetch() == "filled"
    wait_until(lambda: conn.entries == [(gc.DEL, held.rrid, ME)])
    sender_ctx.close()


def test_a_future_arriving_at_its_owner_is_held_there(ctx):
    fut = Future()
    rrid = fut.rrid
    payload, buffers = serialization.dumps(fut, 2)  # as if it went to 2 ...
    del fut
    pygc.collect()
    wait_until(lambda: clientset(ctx, rrid) == {2})
    with serialization.receiving(ctx, 2):  # ... and 2 sent it back
        back = serialization.loads(payload, buffers)
    assert back.rrid == rrid
    assert clientset(ctx, rrid) == {ME, 2}


def test_outside_the_cluster_a_reference_pickles_as_an_inert_null(ctx):
    rc = RemoteChannel(2, 5)
    fut = Future(2)
    null_rc, null_fut = pickle.loads(pickle.dumps((rc, fut)))
    assert (null_rc.where, tuple(null_rc.rrid), null_rc.size) == (0, (0, 0), 5)
    assert (null_fut.where, tuple(null_fut.rrid)) == (0, (0, 0))
    null_rc.release()
    null_fut.release()
    assert owned_refs_count() == 0
