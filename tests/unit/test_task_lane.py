"""The task lane (``transport.lane``) and how an executor routes its messages over it
(``executor_routes``): no processes, a real socket pair and a fake cluster context."""

from __future__ import annotations

import pickle
import socket

import pytest

from distexec.errors import ProcessExitedException, ProtocolError
from distexec.executor_routes import InOrderRoutes
from distexec.protocol.frames import Flag, Kind, RRID
from distexec.transport.lane import LANE_MAX, LaneReader, TaskLane, lane_pair

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def lane():
    master_end, worker_end = lane_pair()
    writer, reader = TaskLane(master_end), LaneReader(worker_end.detach())
    yield writer, reader
    writer.close()
    reader.close()


def test_a_task_crosses_the_lane_whole(lane):
    writer, reader = lane
    payload = pickle.dumps((print, ("hi",), {}))
    assert reader.take() is None  # nothing there: no wait
    assert writer.offer(Kind.CALL_FETCH, payload, flags=Flag.IN_ORDER, notify=RRID(1, 7))
    frame = reader.take()
    assert frame.header.kind == Kind.CALL_FETCH and frame.header.flags == Flag.IN_ORDER
    assert frame.header.notify == RRID(1, 7) and frame.payload == payload
    assert frame.buffers == [] and reader.take() is None


def test_a_large_message_is_refused_and_leaves_nothing_behind(lane):
    writer, reader = lane
    assert not writer.offer(Kind.CALL_FETCH, b"x" * (LANE_MAX + 1), flags=Flag.IN_ORDER,
                            notify=RRID(1, 1))
    assert reader.take() is None


def test_a_full_lane_refuses_whole_messages_and_keeps_the_ones_it_took(lane):
    writer, reader = lane
    taken = 0
    while writer.offer(Kind.CALL_FETCH, bytes([taken % 256]) * LANE_MAX, flags=Flag.IN_ORDER,
                       notify=RRID(1, taken)):
        taken += 1
        assert taken < 10_000, "the lane never filled up"
    assert taken >= 4  # what a worker can have waiting (MAX_IN_FLIGHT and a probe) fits
    for k in range(taken):
        frame = reader.take()
        assert frame.header.notify == RRID(1, k) and frame.payload == bytes([k % 256]) * LANE_MAX
    assert reader.take() is None


def test_the_workers_end_sees_the_master_go(lane):
    writer, reader = lane
    writer.close()
    assert reader.take() is None and reader.ended
    assert not writer.offer(Kind.CALL_FETCH, b"late", flags=Flag.IN_ORDER, notify=RRID(1, 1))


def test_a_malformed_datagram_is_a_protocol_error():
    master_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    reader = LaneReader(worker_end.detach())
    try:
        master_end.send(b"not a frame header")
        with pytest.raises(ProtocolError):
            reader.take()
    finally:
        master_end.close()
        reader.close()


# --------------------------------------------------------------------------------------------
# InOrderRoutes: never the lane and the connection at once, to one worker
# --------------------------------------------------------------------------------------------
class _Lane:
    def __init__(self):
        self.sent, self.full = [], False

    def offer(self, kind, payload, *, flags, notify):
        if self.full:
            return False
        self.sent.append(notify)
        return True


class _Conn:
    def __init__(self, lane):
        self.task_lane = lane


class _Record:
    def __init__(self, lane):
        self.conn = _Conn(lane)


class _Ctx:
    """The parts of ClusterContext the routes use."""

    def __init__(self, lane):
        self.peers = {2: _Record(lane)}
        self.waiters, self.sent, self.deleted = {}, [], {}

    def add_waiter(self, rrid, waiter):
        if waiter.waitingfor in self.deleted:
            raise ProcessExitedException(waiter.waitingfor)
        self.waiters[rrid] = waiter

    def pop_waiter(self, rrid):
        return self.waiters.pop(rrid, None)

    def send(self, pid, kind, *, payload, buffers, notify, flags):
        self.sent.append(notify)


class _Waiter:
    def __init__(self):
        self.waitingfor, self.via_lane, self.failed = 2, None, None

    def fail(self, exc):
        self.failed = exc


def _route(routes, n, buffers=()):
    waiter = _Waiter()
    routes.send(2, RRID(1, n), waiter, b"task", list(buffers))
    return waiter


def test_small_messages_take_the_lane():
    lane = _Lane()
    ctx = _Ctx(lane)
    routes = InOrderRoutes(ctx)
    waiters = [_route(routes, n) for n in range(3)]
    assert lane.sent == [RRID(1, 0), RRID(1, 1), RRID(1, 2)] and ctx.sent == []
    assert all(w.via_lane is True for w in waiters) and len(ctx.waiters) == 3


def test_a_message_with_buffers_waits_for_the_lane_to_clear_then_takes_the_connection():
    lane = _Lane()
    ctx = _Ctx(lane)
    routes = InOrderRoutes(ctx)
    first = _route(routes, 0)
    big = _route(routes, 1, buffers=[b"x"])
    after = _route(routes, 2)  # behind the held one: neither the lane nor the connection yet
    assert lane.sent == [RRID(1, 0)] and ctx.sent == []
    routes.done(2, first.via_lane)
    assert ctx.sent == [RRID(1, 1), RRID(1, 2)] and big.via_lane is False
    small = _route(routes, 3)  # the connection's are out: the lane would overtake them
    assert ctx.sent[-1] == RRID(1, 3) and small.via_lane is False
    for waiter in (big, after, small):
        routes.done(2, waiter.via_lane)
    assert _route(routes, 4).via_lane is True and lane.sent[-1] == RRID(1, 4)


def test_a_full_lane_holds_while_its_messages_are_out():
    lane = _Lane()
    ctx = _Ctx(lane)
    routes = InOrderRoutes(ctx)
    first = _route(routes, 0)
    lane.full = True
    held = _route(routes, 1)
    assert ctx.sent == [] and held.via_lane is None and RRID(1, 1) not in ctx.waiters
    lane.full = False
    routes.done(2, first.via_lane)
    assert ctx.sent == [RRID(1, 1)] and held.via_lane is False and RRID(1, 1) in ctx.waiters


def test_a_lost_worker_gives_back_the_messages_it_never_got():
    lane = _Lane()
    ctx = _Ctx(lane)
    routes = InOrderRoutes(ctx)
    _route(routes, 0)
    held = _route(routes, 1, buffers=[b"x"])
    assert routes.lost(2) == [held]
    assert RRID(1, 1) not in ctx.waiters and ctx.sent == []


def test_the_messages_held_for_a_worker_that_died_are_given_back_not_sent():
    """Its death fails what it was sent (each done) before it is forgotten (lost): what it
    held stays held for ``lost``, which hands it back to go to another worker."""
    lane = _Lane()
    ctx = _Ctx(lane)
    routes = InOrderRoutes(ctx)
    first = _route(routes, 0)
    held = _route(routes, 1, buffers=[b"x"])
    ctx.deleted[2] = "its record"
    routes.done(2, first.via_lane)
    assert ctx.sent == [] and held.failed is None and held.via_lane is None
    assert routes.lost(2) == [held]


def test_a_failed_send_whose_waiter_the_workers_loss_took_is_settled_not_raised():
    """The loss fails that waiter itself: raising too would have the executor send the task
    again, and complete its future twice."""
    lane = _Lane()
    lane.full = True  # (the lane refuses: the connection it is)
    ctx = _Ctx(lane)

    def send_meets_the_loss(pid, kind, *, payload, buffers, notify, flags):
        ctx.waiters.clear()  # what ClusterContext.peer_lost does, on the reader thread
        raise BrokenPipeError

    ctx.send = send_meets_the_loss
    routes = InOrderRoutes(ctx)
    waiter = _route(routes, 0)  # no exception
    assert waiter.via_lane is False  # as the loss counts it done

    def send_fails(pid, kind, *, payload, buffers, notify, flags):
        raise BrokenPipeError  # its waiter is still registered: the caller's to send again

    ctx.send = send_fails
    with pytest.raises(BrokenPipeError):
        _route(routes, 1)
    assert ctx.waiters == {}


def test_a_worker_gone_before_the_send_leaves_nothing_counted():
    lane = _Lane()
    ctx = _Ctx(lane)
    ctx.deleted[2] = "its record"
    routes = InOrderRoutes(ctx)
    with pytest.raises(ProcessExitedException):
        _route(routes, 0)
    with pytest.raises(ProcessExitedException):
        _route(routes, 1, buffers=[b"x"])
    ctx.deleted.clear()
    assert _route(routes, 2).via_lane is True  # nothing was left counted against the lane
