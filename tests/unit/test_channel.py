"""Unit tests of the local Channel: buffering, rendezvous, close, timeouts, concurrency.

Threads signal progress with events; nothing sleeps to wait for something to happen. A
"blocked" thread is observed by waiting a short while for an event that must *not* fire.
"""

from __future__ import annotations

import collections
import math
import threading

import pytest

from distexec.errors import ChannelClosedError
from distexec.runtime.channel import Channel
from tests.helpers import InThread

pytestmark = pytest.mark.timeout(30)

DEADLINE = 10.0  # seconds to wait for something that must happen
BLOCKED = 0.1  # seconds to observe that something does not happen


class Runner(InThread):
    """Run ``fn`` in a daemon thread; record its result or exception, then set ``done``.

    Here ``join`` returns the runner, so a test inspects ``result`` or ``error`` itself.
    """

    def join(self):
        assert self.done.wait(DEADLINE), "thread did not finish"
        self.thread.join(DEADLINE)
        return self

    def assert_blocked(self):
        assert not self.done.wait(BLOCKED), "thread should still be blocked"


# ---------------------------------------------------------------- construction


class TestConstruction:
    @pytest.mark.parametrize("size", [0, 1, 5, 2.0, math.inf])
    def test_good_sizes(self, size):
        ch = Channel(size)
        assert ch.size == size
        assert ch.isopen()
        assert len(ch) == 0

    def test_default_is_unbuffered(self):
        assert Channel().size == 0

    @pytest.mark.parametrize("size", [-1, -math.inf, 1.5, math.nan])
    def test_bad_sizes_raise_value_error(self, size):
        with pytest.raises(ValueError):
            Channel(size)

    @pytest.mark.parametrize("size", [True, False, "3", None, [1]])
    def test_bad_types_raise_type_error(self, size):
        with pytest.raises(TypeError):
            Channel(size)

    def test_repr(self):
        ch = Channel(3)
        ch.put(1)
        assert repr(ch) == "Channel(size=3, n_avail=1, open=True)"
        ch.close()
        assert repr(ch) == "Channel(size=3, n_avail=1, open=False)"

    def test_empty_channel_is_truthy(self):
        assert Channel(1)


# ---------------------------------------------------------------- buffered


class TestBuffered:
    def test_fifo_order(self):
        ch = Channel(10)
        for i in range(10):
            assert ch.put(i) == i
        assert [ch.take() for _ in range(10)] == list(range(10))

    def test_put_blocks_when_full_until_take(self):
        ch = Channel(2)
        ch.put("a")
        ch.put("b")
        putter = Runner(ch.put, "c")
        putter.assert_blocked()
        assert ch.take() == "a"
        putter.join()
        assert putter.error is None and putter.result == "c"
        assert [ch.take(), ch.take()] == ["b", "c"]

    def test_take_blocks_when_empty_until_put(self):
        ch = Channel(1)
        taker = Runner(ch.take)
        taker.assert_blocked()
        ch.put(42)
        assert taker.join().result == 42

    def test_fetch_does_not_remove(self):
        ch = Channel(2)
        ch.put("x")
        ch.put("y")
        assert ch.fetch() == "x"
        assert ch.fetch() == "x"
        assert len(ch) == 2
        assert ch.take() == "x"

    def test_isready_and_len(self):
        ch = Channel(3)
        assert not ch.isready() and len(ch) == 0 and ch.n_avail() == 0
        ch.put(1)
        ch.put(2)
        assert ch.isready() and len(ch) == 2 and ch.n_avail() == 2
        ch.take()
        ch.take()
        assert not ch.isready() and len(ch) == 0

    def test_wait_returns_channel_and_removes_nothing(self):
        ch = Channel(1)
        waiter = Runner(ch.wait)
        waiter.assert_blocked()
        ch.put(7)
        assert waiter.join().result is ch
        assert len(ch) == 1

    def test_fetcher_does_not_starve_taker(self):
        # A single put must wake the taker even when a fetcher is also waiting.
        ch = Channel(1)
        fetcher = Runner(ch.fetch)
        taker = Runner(ch.take)
        fetcher.assert_blocked()
        taker.assert_blocked()
        ch.put("v")
        assert fetcher.join().result == "v"
        assert taker.join().result == "v"

    def test_unbounded_never_blocks(self):
        ch = Channel(math.inf)
        for i in range(10_000):
            ch.put(i, timeout=0)
        assert len(ch) == 10_000
        assert [ch.take() for _ in range(10_000)] == list(range(10_000))


# ---------------------------------------------------------------- unbuffered


class TestUnbuffered:
    def test_put_returns_only_after_take(self):
        ch = Channel(0)
        putter = Runner(ch.put, "hello")
        putter.assert_blocked()
        assert ch.take() == "hello"
        putter.join()
        assert putter.error is None and putter.result == "hello"

    def test_take_blocks_until_put(self):
        ch = Channel(0)
        taker = Runner(ch.take)
        taker.assert_blocked()
        assert ch.put("v") == "v"
        assert taker.join().result == "v"

    def test_two_putters_one_taker(self):
        ch = Channel(0)
        first = Runner(ch.put, 1)
        assert ch.fetch(timeout=DEADLINE) == 1  # the first putter is waiting
        second = Runner(ch.put, 2)

        assert ch.take() == 1
        first.join()
        assert ch.fetch(timeout=DEADLINE) == 2
        second.assert_blocked()  # its value was not taken yet
        assert ch.take() == 2
        second.join()
        assert first.error is None and second.error is None

    def test_fetch_isready_len_do_not_complete_rendezvous(self):
        ch = Channel(0)
        assert not ch.isready() and len(ch) == 0
        putter = Runner(ch.put, "v")
        ch.wait(timeout=DEADLINE)
        assert ch.isready() and len(ch) == 1 and ch.n_avail() == 1
        assert ch.fetch() == "v"
        assert ch.wait() is ch
        putter.assert_blocked()
        assert ch.take() == "v"
        putter.join()

    def test_put_timeout_withdraws_value(self):
        ch = Channel(0)
        with pytest.raises(TimeoutError):
            ch.put("gone", timeout=0.05)
        assert len(ch) == 0 and not ch.isready()
        with pytest.raises(TimeoutError):
            ch.take(timeout=0.05)


# ---------------------------------------------------------------- close


class TestClose:
    @pytest.mark.parametrize("size", [0, 1])
    def test_close_wakes_blocked_taker(self, size):
        ch = Channel(size)
        taker = Runner(ch.take)
        taker.assert_blocked()
        ch.close()
        assert isinstance(taker.join().error, ChannelClosedError)

    @pytest.mark.parametrize("size", [0, 1])
    def test_close_wakes_blocked_putter(self, size):
        ch = Channel(size)
        if size:
            ch.put("fill")
        putter = Runner(ch.put, "blocked")
        putter.assert_blocked()
        ch.close()
        assert isinstance(putter.join().error, ChannelClosedError)
        # The blocked putter's value never entered the channel.
        assert len(ch) == size
        if size:
            assert ch.take() == "fill"
        with pytest.raises(ChannelClosedError):
            ch.take()

    def test_close_wakes_fetcher_and_waiter(self):
        ch = Channel(1)
        fetcher = Runner(ch.fetch)
        waiter = Runner(ch.wait)
        fetcher.assert_blocked()
        ch.close()
        assert isinstance(fetcher.join().error, ChannelClosedError)
        assert isinstance(waiter.join().error, ChannelClosedError)

    def test_values_put_before_close_can_be_taken(self):
        ch = Channel(3)
        ch.put(1)
        ch.put(2)
        ch.close()
        assert not ch.isopen()
        with pytest.raises(ChannelClosedError):
            ch.put(3)
        assert ch.fetch() == 1
        assert ch.wait() is ch
        assert [ch.take(), ch.take()] == [1, 2]
        for op in (ch.take, ch.fetch, ch.wait):
            with pytest.raises(ChannelClosedError) as info:
                op()
            assert info.value.state == "closed"

    def test_close_is_idempotent(self):
        ch = Channel(1)
        ch.close()
        ch.close(RuntimeError("ignored: already closed"))
        with pytest.raises(ChannelClosedError):
            ch.take()

    def test_close_with_exception(self):
        boom = RuntimeError("boom")
        ch = Channel(2)
        ch.put("left")
        ch.close(boom)
        assert ch.take() == "left"
        with pytest.raises(RuntimeError) as info:
            ch.take()
        assert info.value is boom
        with pytest.raises(RuntimeError):
            ch.put("late")

    def test_close_with_exception_wakes_blocked_taker(self):
        boom = KeyError("boom")
        ch = Channel(0)
        taker = Runner(ch.take)
        taker.assert_blocked()
        ch.close(boom)
        assert taker.join().error is boom

    def test_close_rejects_non_exception(self):
        ch = Channel(1)
        with pytest.raises(TypeError):
            ch.close("not an exception")
        assert ch.isopen()

    @pytest.mark.parametrize("size", [0, 2, math.inf])
    def test_iteration_stops_cleanly_after_close(self, size):
        ch = Channel(size)
        got = []
        consumer = Runner(lambda: got.extend(ch))
        for i in range(5):
            ch.put(i)
        ch.close()
        consumer.join()
        assert consumer.error is None
        assert got == list(range(5))

    def test_iteration_over_closed_and_empty_channel_with_exception(self):
        ch = Channel(1)
        ch.put("only")
        ch.close(RuntimeError("boom"))
        assert list(ch) == ["only"]


# ---------------------------------------------------------------- timeouts


class TestTimeouts:
    def test_take_fetch_wait_timeout_on_empty(self):
        ch = Channel(1)
        for op in (ch.take, ch.fetch, ch.wait):
            with pytest.raises(TimeoutError):
                op(timeout=0.02)
        assert len(ch) == 0 and ch.isopen()

    def test_zero_timeout_is_non_blocking(self):
        ch = Channel(1)
        with pytest.raises(TimeoutError):
            ch.take(timeout=0)
        ch.put("a", timeout=0)
        assert ch.take(timeout=0) == "a"

    def test_put_timeout_when_full_leaves_channel_unchanged(self):
        ch = Channel(1)
        ch.put("a")
        with pytest.raises(TimeoutError):
            ch.put("b", timeout=0.02)
        assert len(ch) == 1
        assert ch.take() == "a"
        assert not ch.isready()

    def test_negative_timeout_raises(self):
        with pytest.raises(ValueError):
            Channel(1).take(timeout=-1)

    def test_timeout_then_success(self):
        ch = Channel(0)
        with pytest.raises(TimeoutError):
            ch.take(timeout=0.01)
        putter = Runner(ch.put, "late")
        assert ch.take(timeout=DEADLINE) == "late"
        putter.join()


# ---------------------------------------------------------------- concurrency


class TestConcurrency:
    @pytest.mark.parametrize("size", [0, 1, 16, math.inf])
    def test_many_producers_and_consumers(self, size):
        n_threads, n_items = 8, 1000
        ch = Channel(size)
        taken = collections.Counter()
        taken_lock = threading.Lock()

        def produce(start):
            for value in range(start, n_items, n_threads):
                ch.put(value)

        def consume():
            local = collections.Counter(ch)
            with taken_lock:
                taken.update(local)

        consumers = [Runner(consume) for _ in range(n_threads)]
        producers = [Runner(produce, start) for start in range(n_threads)]
        for runner in producers:
            assert runner.join().error is None
        ch.close()
        for runner in consumers:
            assert runner.join().error is None
        assert taken == collections.Counter(range(n_items))

    def test_per_producer_fifo_preserved(self):
        ch = Channel(4)
        got = []
        consumer = Runner(lambda: got.extend(ch))
        producers = [Runner(lambda p=p: [ch.put((p, i)) for i in range(200)]) for p in range(4)]
        for runner in producers:
            runner.join()
        ch.close()
        consumer.join()
        for p in range(4):
            assert [i for q, i in got if q == p] == list(range(200))

    def test_timeouts_racing_with_puts_lose_nothing(self):
        # Takers with tiny timeouts race producers; every value is taken exactly once.
        ch = Channel(2)
        n_items = 500
        taken = []
        taken_lock = threading.Lock()
        stop = threading.Event()

        def impatient_taker():
            while not stop.is_set() or ch.isready():
                try:
                    value = ch.take(timeout=0.001)
                except TimeoutError:
                    continue
                with taken_lock:
                    taken.append(value)

        takers = [Runner(impatient_taker) for _ in range(4)]
        producer = Runner(lambda: [ch.put(i, timeout=DEADLINE) for i in range(n_items)])
        assert producer.join().error is None
        stop.set()
        for runner in takers:
            assert runner.join().error is None
        assert sorted(taken) == list(range(n_items))
