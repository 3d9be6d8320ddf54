"""DistributedExecutor.map with CPython 3.14 semantics on every Python (spec §2.1).

Without ``buffersize`` every input is consumed and submitted when ``map()`` is called; results
come back in input order; ``chunksize`` items travel as one task; ``timeout`` counts from the
call. ``buffersize`` is validated by ``map()`` itself, keeps exactly ``buffersize`` tasks
ahead (so infinite iterables work and master memory stays flat), and closing the iterator
cancels what has not started.
"""

from __future__ import annotations

import gc
import itertools
import os
import time

import psutil
import pytest

from distexec import DistributedExecutor
from tests.executor.helpers import add, sleep_and_return, square, started, touch_and_sleep
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(60)


def counting(consumed: list, stop: int | None = None):
    """Yields 0, 1, ... (forever when ``stop`` is None), recording each item pulled."""
    for i in itertools.count() if stop is None else range(stop):
        consumed.append(i)
        yield i


def note_in_shared(x, shared: list):
    """Runs on a worker. ``shared`` is one object per unpickled message, so its length tells
    how many items of the same message ran before this one."""
    shared.append(x)
    return os.getpid(), len(shared)


# --------------------------------------------------------------------------------------------
# eager submission and order
# --------------------------------------------------------------------------------------------
def test_map_submits_every_input_when_called(executor, tmp_path):
    consumed: list[int] = []
    results = executor.map(touch_and_sleep, itertools.repeat(str(tmp_path)), counting(consumed, 6))
    assert consumed == list(range(6))  # before the first next()
    wait_until(lambda: started(tmp_path) == {str(i) for i in range(6)}, 10,
               message="every task to run without anyone iterating")
    assert list(results) == list(range(6))


def test_results_come_in_input_order(executor):
    delays = [0.4, 0.3, 0.2, 0.1, 0.0]  # later items finish first
    assert list(executor.map(sleep_and_return, delays, range(5))) == [0, 1, 2, 3, 4]


def test_map_over_several_iterables_stops_at_the_shortest(executor):
    assert list(executor.map(add, range(5), range(100, 103))) == [100, 102, 104]
    assert list(executor.map(square, [])) == []


# --------------------------------------------------------------------------------------------
# chunksize
# --------------------------------------------------------------------------------------------
def test_chunksize_sends_each_chunk_as_one_task(executor):
    shared: list = []
    out = list(executor.map(note_in_shared, range(100), itertools.repeat(shared), chunksize=10))
    positions = [position for _, position in out]
    assert positions == list(range(1, 11)) * 10  # ten messages of ten items
    for start in range(0, 100, 10):  # each chunk ran in one process
        assert len({os_pid for os_pid, _ in out[start:start + 10]}) == 1
    assert shared == []  # the master's object was only copied


def test_chunksize_one_sends_each_item_alone(executor):
    out = list(executor.map(note_in_shared, range(20), itertools.repeat([])))
    assert [position for _, position in out] == [1] * 20


def test_a_last_short_chunk_is_sent_too(executor):
    out = list(executor.map(note_in_shared, range(25), itertools.repeat([]), chunksize=10))
    assert [position for _, position in out] == [*range(1, 11), *range(1, 11), *range(1, 6)]


def test_chunksize_must_be_positive(executor):
    with pytest.raises(ValueError):
        executor.map(square, range(3), chunksize=0)


# --------------------------------------------------------------------------------------------
# timeout
# --------------------------------------------------------------------------------------------
def test_timeout_counts_from_the_map_call(executor):
    called = time.monotonic()
    # A per-next() timeout would wait until 0.6 + 1.0 s and get "second" (done at 1.5 s).
    results = executor.map(sleep_and_return, [0.6, 1.5], ["first", "second"], timeout=1.0)
    assert next(results) == "first"
    with pytest.raises(TimeoutError):
        next(results)
    assert time.monotonic() - called >= 1.0


# --------------------------------------------------------------------------------------------
# buffersize
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["4", 4.0, [4]])
def test_buffersize_of_the_wrong_type_is_refused_by_map_itself(executor, bad):
    consumed: list[int] = []
    with pytest.raises(TypeError, match=r"^buffersize must be an integer or None$"):
        executor.map(square, counting(consumed), buffersize=bad)
    assert consumed == []


@pytest.mark.parametrize("bad", [0, -1])
def test_buffersize_below_one_is_refused_by_map_itself(executor, bad):
    consumed: list[int] = []
    with pytest.raises(ValueError, match=r"^buffersize must be None or > 0$"):
        executor.map(square, counting(consumed), buffersize=bad)
    assert consumed == []


def test_buffersize_over_an_infinite_iterable(executor):
    counter = itertools.count()
    results = executor.map(square, counter, buffersize=8)
    assert [next(results) for _ in range(5)] == [0, 1, 4, 9, 16]
    results.close()
    assert next(counter) == 8 + 5  # exactly buffersize ahead, one more per result taken


def test_buffersize_pulls_one_input_per_result(executor):
    consumed: list[int] = []
    results = executor.map(square, counting(consumed), buffersize=3)
    assert consumed == [0, 1, 2]
    for k in range(1, 6):
        assert next(results) == (k - 1) ** 2
        assert len(consumed) == 3 + k
    results.close()


def test_buffersize_counts_chunks(executor):
    consumed: list[int] = []
    results = executor.map(square, counting(consumed), chunksize=4, buffersize=2)
    assert len(consumed) == 8  # two chunks ahead
    assert [next(results) for _ in range(4)] == [0, 1, 4, 9]
    assert len(consumed) == 12  # the first chunk was taken: one more chunk was sent
    results.close()


def test_closing_the_iterator_cancels_what_has_not_started(tmp_path):
    with DistributedExecutor(1) as ex:
        results = ex.map(touch_and_sleep, itertools.repeat(str(tmp_path)), range(40),
                         itertools.repeat(0.2))
        assert next(results) == 0
        results.close()
    # Shutdown waited for the tasks still running; the 30+ queued ones never started.
    ran = started(tmp_path)
    assert "0" in ran and len(ran) < 10, sorted(ran)


def test_closing_a_buffered_iterator_cancels_its_buffer(tmp_path):
    with DistributedExecutor(1) as ex:
        results = ex.map(touch_and_sleep, itertools.repeat(str(tmp_path)), itertools.count(),
                         itertools.repeat(0.2), buffersize=20)
        assert next(results) == 0
        results.close()
    ran = started(tmp_path)
    assert "0" in ran and len(ran) < 10, sorted(ran)


def test_a_million_items_with_buffersize_keep_master_memory_flat(executor):
    # Submitting everything at once would hold a million argument tuples (about 80 MB).
    process = psutil.Process()
    gc.collect()
    before = peak = process.memory_info().rss
    count = total = 0
    for value in executor.map(abs, range(1_000_000), chunksize=1000, buffersize=4):
        count += 1
        total += value
        if count % 10_000 == 0:
            peak = max(peak, process.memory_info().rss)
    assert count == 1_000_000
    assert total == sum(range(1_000_000))
    assert peak - before < 50 * 2**20, f"master RSS grew by {(peak - before) / 2**20:.0f} MB"
