"""RemoteChannel: sizes, the channel operations from owner and non-owner, iteration, close,
factories, blocked takers, the unbuffered hand-over (Julia #29932, #33972), ids and identity.

Real workers on loopback (the module's two ``shared_workers``). Code that runs on a worker is
defined here and travels by value. "Blocked" is observed by waiting briefly for an event that
must not fire; everything else waits for its event with a deadline.
"""

from __future__ import annotations

import math
import pickle
import sys
from fractions import Fraction

import cloudpickle
import pytest

import distexec
from distexec import Channel, ChannelClosedError, DistributedError, RemoteChannel, RemoteException
from tests.helpers import InThread, wait_until

pytestmark = pytest.mark.timeout(60)

# Functions defined here travel by value, so workers never import this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

BLOCKED = 0.2  # seconds to observe that something does not happen
DEADLINE = 10.0  # seconds for something that must happen


def put_all(rc, values, close=False) -> None:
    """Remote body: put every value, then optionally close."""
    for v in values:
        rc.put(v)
    if close:
        rc.close()


def take_n(rc, n):
    return [rc.take() for _ in range(n)]


@pytest.fixture
def w(shared_workers):
    return shared_workers


@pytest.fixture(params=["master", "worker"])
def owner(request, w):
    """The pid owning the channel under test: this process, or a worker."""
    return distexec.myid() if request.param == "master" else w[0]


def _closed(exc: BaseException) -> bool:
    if isinstance(exc, RemoteException):
        exc = exc.captured.ex
    return isinstance(exc, ChannelClosedError)


# --------------------------------------------------------------------------------------------
# sizes
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 1, 3, math.inf])
def test_values_pass_in_fifo_order_between_processes(w, size):
    rc = RemoteChannel(w[0], size)
    producer = distexec.remotecall(put_all, w[1], rc, list(range(20)))
    assert [rc.take(timeout=DEADLINE) for _ in range(20)] == list(range(20))
    assert producer.fetch(timeout=DEADLINE) is None


def test_unbuffered_put_waits_for_a_taker(owner, w):
    rc = RemoteChannel(owner, 0)
    assert rc.size == 0
    putting = InThread(rc.put, "x")
    wait_until(rc.isready, DEADLINE, message="the putter's value on offer")
    assert not putting.done.wait(BLOCKED)
    taker = distexec.remotecall(lambda c: c.take(), w[1], rc)
    assert taker.fetch(timeout=DEADLINE) == "x"
    assert putting.join() is rc
    with pytest.raises(TimeoutError):
        rc.put("nobody takes this", timeout=0.05)
    assert not rc.isready()


def test_buffered_put_blocks_only_when_full(owner):
    rc = RemoteChannel(owner, 3)
    for i in range(3):
        rc.put(i, timeout=DEADLINE)
    assert len(rc) == 3
    with pytest.raises(TimeoutError):
        rc.put(3, timeout=0.05)
    putting = InThread(rc.put, 3)
    assert not putting.done.wait(BLOCKED)
    assert rc.take() == 0
    putting.join()
    assert [rc.take() for _ in range(3)] == [1, 2, 3]


def test_unbounded_channel_never_blocks_a_putter(owner):
    rc = RemoteChannel(owner, math.inf)
    for i in range(500):
        rc.put(i, timeout=DEADLINE)
    assert len(rc) == 500
    assert rc.take() == 0


def test_default_size_is_one(owner):
    rc = RemoteChannel(owner)
    rc.put("a")
    with pytest.raises(TimeoutError):
        rc.put("b", timeout=0.05)
    assert rc.take() == "a"


# --------------------------------------------------------------------------------------------
# operations
# --------------------------------------------------------------------------------------------
def test_put_take_fetch_isready_len(owner):
    rc = RemoteChannel(owner, 10)
    assert rc.isopen() and not rc.isready() and len(rc) == 0
    assert distexec.put(rc, 1) is rc
    rc.put("Hello").put(5.0)
    assert rc.isready() and distexec.isready(rc)
    assert len(rc) == 3
    assert rc.fetch() == 1
    assert distexec.fetch(rc) == 1, "fetch does not remove"
    assert rc.take() == 1
    assert distexec.take(rc) == "Hello"
    assert rc.fetch() == 5.0
    assert rc.take() == 5.0
    assert not rc.isready() and len(rc) == 0
    assert rc.isopen()
    distexec.close(rc)
    assert not rc.isopen()


def test_remote_channels_are_never_cached(owner, w):
    rc = RemoteChannel(owner, 2)
    rc.put("first")
    assert rc.fetch() == "first"
    distexec.remotecall_fetch(lambda c: (c.take(), c.put("second")), w[1], rc)
    assert rc.fetch() == "second"


def test_indexing_runs_on_the_owner(owner):
    rc = RemoteChannel(owner)
    rc.put([10, 20, 30])
    assert rc[1] == 20
    assert rc[-1] == 30
    assert len(rc) == 1, "indexing does not remove"


def test_wait_blocks_until_a_value_exists(owner, w):
    rc = RemoteChannel(owner)
    with pytest.raises(TimeoutError):
        rc.wait(timeout=0.05)
    with pytest.raises(TimeoutError):
        distexec.wait(rc, timeout=0.05)
    waiting = InThread(rc.wait)
    assert not waiting.done.wait(BLOCKED)
    distexec.remotecall_fetch(lambda c: c.put("v"), w[1], rc)
    assert waiting.join() is rc
    assert rc.take() == "v", "wait does not remove"


@pytest.mark.parametrize("op", ["take", "fetch"])
def test_timeouts_raise_timeout_error_from_any_owner(owner, op):
    rc = RemoteChannel(owner)
    with pytest.raises(TimeoutError):
        getattr(rc, op)(timeout=0.05)
    rc.put(1)
    assert getattr(rc, op)(timeout=DEADLINE) == 1


def test_a_remote_exception_taken_from_a_channel_is_raised(w):
    rc = RemoteChannel(w[0], 2)
    failure = distexec.remotecall(lambda: 1 / 0, w[1])
    err = failure.exception(timeout=DEADLINE)
    rc.put(err)
    with pytest.raises(RemoteException) as info:
        rc.take()
    assert isinstance(info.value.captured.ex, ZeroDivisionError)


# --------------------------------------------------------------------------------------------
# close and iteration
# --------------------------------------------------------------------------------------------
def test_closed_channel_raises_channel_closed_error_locally():
    rc = RemoteChannel(None, 2)
    rc.put(1)
    rc.close()
    with pytest.raises(ChannelClosedError):
        rc.put(2)
    assert rc.take() == 1, "values put before close can still be taken"
    with pytest.raises(ChannelClosedError):
        rc.take()
    with pytest.raises(ChannelClosedError):
        rc.fetch()


def test_closed_channel_raises_wrapped_when_the_owner_is_remote(w):
    rc = RemoteChannel(w[0], 2)
    rc.put(1)
    rc.close()
    with pytest.raises(RemoteException) as info:
        rc.put(2)
    assert isinstance(info.value.captured.ex, ChannelClosedError)
    assert info.value.pid == w[0]
    assert rc.take() == 1
    with pytest.raises(RemoteException) as info:
        rc.take()
    assert isinstance(info.value.captured.ex, ChannelClosedError)


def test_close_ends_a_pending_remote_take(owner, w):
    rc = RemoteChannel(owner)
    taker = distexec.remotecall(lambda c: c.take(), w[1], rc)
    assert not taker.done() and not taker.isready()
    rc.close()
    with pytest.raises(RemoteException) as info:
        taker.fetch(timeout=DEADLINE)
    assert _closed(info.value.captured.ex)


@pytest.mark.parametrize("size", [0, 1, 4])
def test_iteration_ends_cleanly_after_close(owner, w, size):
    rc = RemoteChannel(owner, size)
    producer = distexec.remotecall(put_all, w[1], rc, list(range(10)), True)
    assert list(rc) == list(range(10))
    producer.fetch(timeout=DEADLINE)
    assert list(rc) == [], "iterating a closed, drained channel ends at once"


def test_owner_iterates_while_another_process_produces(w):
    rc = RemoteChannel(w[0], 1)
    consumer = distexec.remotecall(lambda c: [x for x in c], w[0], rc)
    put_all(rc, ["a", "b", "c"], close=True)
    assert consumer.fetch(timeout=DEADLINE) == ["a", "b", "c"]


def test_worker_iterates_a_master_owned_channel(w):
    rc = RemoteChannel(None, 1)
    consumer = distexec.remotecall(lambda c: sum(1 for _ in c), w[1], rc)
    put_all(rc, range(10), close=True)
    assert consumer.fetch(timeout=DEADLINE) == 10


def test_iteration_raises_other_errors(w):
    rc = RemoteChannel(w[0], 1)
    rc.put(distexec.remotecall(lambda: 1 / 0, w[1]).exception(timeout=DEADLINE))
    with pytest.raises(RemoteException):
        next(iter(rc))


# --------------------------------------------------------------------------------------------
# factories
# --------------------------------------------------------------------------------------------
def test_factory_runs_on_the_owner(w):
    def make():
        chan = Channel(5)
        chan.put(distexec.myid())
        return chan

    rc = RemoteChannel(make, w[0])
    assert rc.where == w[0]
    assert rc.size == 5
    assert rc.take() == w[0]
    for i in range(5):
        rc.put(i)
    with pytest.raises(TimeoutError):
        rc.put(5, timeout=0.05)


def test_factory_of_an_unbuffered_channel(w):
    rc = RemoteChannel(lambda: Channel(0), w[0])
    assert rc.size == 0
    taker = distexec.remotecall(lambda c: c.take(), w[1], rc)
    rc.put("handed over", timeout=DEADLINE)
    assert taker.fetch(timeout=DEADLINE) == "handed over"


def test_factory_on_this_process():
    local = Channel(2)
    rc = RemoteChannel(lambda: local)
    assert rc.where == distexec.myid()
    rc.put("x")
    assert local.take() == "x"


def test_factory_must_return_a_channel(w):
    with pytest.raises(RemoteException) as info:
        RemoteChannel(lambda: 5, w[0])
    assert isinstance(info.value.captured.ex, TypeError)


def test_invalid_size_is_rejected_in_the_caller(w):
    with pytest.raises(ValueError):
        RemoteChannel(w[0], -1)
    with pytest.raises(TypeError):
        RemoteChannel(w[0], "3")


# --------------------------------------------------------------------------------------------
# blocked takers and the call threads serving them
# --------------------------------------------------------------------------------------------
def test_a_worker_blocked_in_take_on_a_master_channel_while_the_master_serves(w):
    rc = RemoteChannel()
    taker = distexec.remotecall(lambda c: c.take(), w[0], rc)
    assert not taker.done()
    # The same worker calls the master (and the master it) while its take is pending.
    assert distexec.remotecall_fetch(
        lambda: distexec.remotecall_fetch(lambda: distexec.myid() * 10, 1), w[0]) == 10
    assert distexec.remotecall_fetch(distexec.myid, w[0]) == w[0]
    assert not taker.done()
    rc.put("fed")
    assert taker.fetch(timeout=DEADLINE) == "fed"


def test_many_takers_blocked_on_master_channels_then_fed(w):
    n = 12
    started = RemoteChannel(None, math.inf)
    chans = [RemoteChannel() for _ in range(n)]

    def take_one(started, chan, i):
        started.put(i)
        return (distexec.myid(), chan.take())

    takers = [distexec.remotecall(take_one, w[i % 2], started, chans[i], i) for i in range(n)]
    assert sorted(started.take(timeout=DEADLINE) for _ in range(n)) == list(range(n))
    assert not any(t.done() for t in takers)
    for i in reversed(range(n)):
        chans[i].put(f"value {i}")
    results = [t.fetch(timeout=DEADLINE) for t in takers]
    assert results == [(w[i % 2], f"value {i}") for i in range(n)]


# --------------------------------------------------------------------------------------------
# the unbuffered hand-over (Julia #29932, #33972)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["list", "long list", "large bytearray"])
def test_owner_may_mutate_a_value_once_put_returns(w, kind):
    """#29932: put on the owner returns only once the remote taker's copy is made.

    The long list holds objects pickled by Python code (Fractions), slow enough for other
    threads to run meanwhile: a putter that returned early would change it mid-pickle. The
    large bytearray travels as an out-of-band buffer.
    """
    rc = RemoteChannel(None, 0)
    taker = distexec.remotecall(
        lambda c: [(lambda v: (v[0], v[-1], len(v)))(c.take()) for _ in range(10)], w[0], rc)
    n = {"list": 3, "long list": 20_000, "large bytearray": 256 * 1024}[kind]
    value = bytearray(n) if kind == "large bytearray" else [None] * n
    for i in range(10):
        value[:] = bytes([i]) * n if kind == "large bytearray" else [
            Fraction(i) for _ in range(n)]  # distinct objects: each one pickled on its own
        rc.put(value)
        value[0] = value[-1] = 99  # what the taker sees if this is not its own copy
    assert taker.fetch(timeout=DEADLINE) == [(i, i, n) for i in range(10)]


@pytest.mark.parametrize("owner_kind", ["master", "worker"])
def test_references_handed_over_an_unbuffered_channel_stay_live(w, owner_kind):
    rc = RemoteChannel(None if owner_kind == "master" else w[1], 0)
    inner = RemoteChannel(w[1], 3)
    inner.put("inside")
    pending = distexec.remotecall(lambda: "computed", w[1])
    taker = distexec.remotecall(
        lambda c: (lambda r, f: (r.fetch(), f.fetch(timeout=5)))(*c.take()), w[0], rc)
    rc.put((inner, pending))
    assert taker.fetch(timeout=DEADLINE) == ("inside", "computed")


def test_a_failed_remote_take_does_not_block_later_hand_overs(w):
    """#33972: the owner's hand-over lock is released when a remote take fails."""
    rc = RemoteChannel(w[0], 0)
    with pytest.raises(TimeoutError):
        rc.take(timeout=0.05)
    putter = distexec.remotecall(lambda c: c.put("after"), w[0], rc)
    assert rc.take(timeout=DEADLINE) == "after"
    assert putter.fetch(timeout=DEADLINE) is rc


# --------------------------------------------------------------------------------------------
# ids and identity
# --------------------------------------------------------------------------------------------
def test_remoteref_id_and_channel_from_id_on_the_owner(w):
    rc = RemoteChannel(None, 4)
    rrid = distexec.remoteref_id(rc)
    assert rrid == distexec.RRID(distexec.myid(), rrid.id)
    assert (rrid.whence, rrid.id) == (rc.whence, rc.id)
    rc.put("through the ref")
    local = distexec.channel_from_id(rrid)
    assert isinstance(local, Channel)
    assert local.take() == "through the ref"
    local.put("through the channel")
    assert rc.take() == "through the channel"


def test_channel_from_id_on_a_worker_owner(w):
    rc = RemoteChannel(w[0], 3)

    def backing(c):
        chan = distexec.channel_from_id(distexec.remoteref_id(c))
        chan.put("backing")
        return type(chan).__name__, chan.size

    assert distexec.remotecall_fetch(backing, w[0], rc) == ("Channel", 3)
    assert rc.take() == "backing"


def test_channel_from_id_elsewhere_is_an_error(w):
    rc = RemoteChannel(w[0])
    rc.put(1)
    with pytest.raises(DistributedError, match="Local instance of remote reference not found"):
        distexec.channel_from_id(distexec.remoteref_id(rc))
    with pytest.raises(RemoteException) as info:
        distexec.remotecall_fetch(lambda r: distexec.channel_from_id(r), w[1],
                                  distexec.remoteref_id(rc))
    assert "Local instance of remote reference not found" in str(info.value.captured.ex)
    with pytest.raises(DistributedError, match="not found"):
        distexec.channel_from_id(distexec.RRID(distexec.myid(), 10**9))


def test_a_channel_sent_back_is_the_same_object(w):
    rc = RemoteChannel(w[0])
    assert distexec.remotecall_fetch(lambda c: c, w[1], rc) is rc
    pair = distexec.remotecall_fetch(lambda c: (c, {"again": c}), w[1], rc)
    assert pair[0] is rc and pair[1]["again"] is rc
    assert distexec.remotecall_fetch(lambda c: c, w[0], rc) is rc


def test_a_channel_arriving_twice_on_a_worker_is_the_same_object_there(w):
    rc = RemoteChannel(w[0])
    holder = RemoteChannel(w[1], 1)
    holder.put(rc)  # w[1] keeps its copy inside `holder`
    assert distexec.remotecall_fetch(lambda h, c: h.fetch() is c, w[1], holder, rc) is True
    assert distexec.remotecall_fetch(lambda h, c: h.fetch() == c, w[1], holder, rc) is True
    assert holder.fetch() is rc


def test_pickled_outside_the_cluster_is_an_inert_null_reference(w):
    rc = RemoteChannel(w[0], 3)
    null = pickle.loads(pickle.dumps(rc))
    assert tuple(distexec.remoteref_id(null)) == (0, 0)
    assert null.size == 3
    with pytest.raises(DistributedError):
        null.put(1)
    rc.put(1)
    assert rc.take() == 1
