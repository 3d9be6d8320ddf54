"""pmap: order, inputs, pools, and each option (spec/distributednext.md §7).

Real workers on loopback. The tests that need a particular cluster come first: they remove any
workers they find (``no_workers``) and start their own; the rest share the module's two
``shared_workers``.

Which elements ran how often is counted in a master-owned RemoteChannel holding one dict
(``Attempts``), so functions running on workers can count too. A computation that must not
finish yet waits on a *gate*, a master-owned RemoteChannel the test feeds.
"""

from __future__ import annotations

import itertools
import sys
import threading

import cloudpickle
import pytest

import distexec
from distexec import (
    BatchProcessingError,
    CompositeException,
    ExponentialBackOff,
    ProcessExitedException,
    RemoteChannel,
    RemoteException,
    WorkerPool,
    pmap,
)
from tests.helpers import kill_worker, wait_until

pytestmark = pytest.mark.timeout(60)

# Functions defined here travel by value, so workers never import this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

DEADLINE = 10.0  # seconds for something that must happen


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
class Attempts:
    """Counts calls per key from any process: a master-owned channel holding one dict."""

    def __init__(self):
        self.chan = RemoteChannel()
        self.chan.put({})

    def bump(self, key) -> int:
        counts = self.chan.take()  # the take is the lock
        counts[key] = counts.get(key, 0) + 1
        self.chan.put(counts)
        return counts[key]

    def counts(self) -> dict:
        return self.chan.fetch()


@pytest.fixture
def attempts():
    return Attempts()


def flaky(attempts: Attempts, failing, times: float = float("inf"), exc_type=ValueError):
    """``x -> 10 * x``, raising ``exc_type(x)`` on the first ``times`` attempts of ``failing``."""
    def fn(x):
        if attempts.bump(x) <= times and x in failing:
            raise exc_type(x)
        return 10 * x
    return fn


class CountingPool(WorkerPool):
    """A WorkerPool that counts its ``take`` calls: one per remote call pmap makes."""

    def __init__(self, workers):
        super().__init__(workers)
        self.takes = 0
        self._count_lock = threading.Lock()

    def take(self) -> int:
        with self._count_lock:
            self.takes += 1
        return super().take()


def blocks_on(victim: int, gate: RemoteChannel, started: RemoteChannel):
    """``x -> x * x``, except that on ``victim`` it reports ``x`` and waits on ``gate``."""
    def fn(x):
        if distexec.myid() == victim:
            started.put(x)
            gate.take()
        return x * x
    return fn


# --------------------------------------------------------------------------------------------
# particular clusters (first: these remove workers)
# --------------------------------------------------------------------------------------------
def test_pmap_without_workers_runs_on_the_master(no_workers):
    assert pmap(lambda x: (x, distexec.myid()), range(5)) == [(x, 1) for x in range(5)]
    assert pmap(lambda x: x + 1, range(7), batch_size=3) == list(range(1, 8))
    handled = pmap(lambda x: 1 / x, [1, 0], on_error=lambda e: type(e).__name__)
    assert handled == [1.0, "ZeroDivisionError"]
    with pytest.raises(ZeroDivisionError):  # local: nothing to wrap in a RemoteException
        pmap(lambda x: 1 / x, [1, 0])


def test_retry_after_a_worker_is_killed_mid_pmap_gives_the_sequential_result(no_workers,
                                                                           add_workers):
    pids = add_workers(4)
    victim = pids[1]
    gate, started = RemoteChannel(), RemoteChannel()
    fn = blocks_on(victim, gate, started)
    outcome: dict = {}
    runner = threading.Thread(
        target=lambda: outcome.update(value=pmap(fn, range(200), retry_delays=[0.1] * 3)),
        daemon=True)
    runner.start()
    started.take()  # the victim holds an element...
    kill_worker(victim)  # ...and dies with it
    runner.join(DEADLINE * 3)
    assert not runner.is_alive(), "pmap did not return"
    assert outcome["value"] == [x * x for x in range(200)]
    assert victim not in distexec.workers()


def test_a_worker_killed_mid_pmap_without_retries_fails_the_map(no_workers, add_workers):
    a, b = add_workers(2)
    gate, started = RemoteChannel(), RemoteChannel()
    outcome: dict = {}

    def run():
        try:
            pmap(blocks_on(b, gate, started), range(50))
        except BaseException as exc:
            outcome["error"] = exc

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    started.take()
    kill_worker(b)
    runner.join(DEADLINE)
    assert not runner.is_alive(), "pmap did not return"
    assert isinstance(outcome["error"], ProcessExitedException)
    assert outcome["error"].worker_id == b


def test_retries_come_before_on_error_for_a_killed_worker(no_workers, add_workers):
    a, b = add_workers(2)
    gate, started = RemoteChannel(), RemoteChannel()
    outcome: dict = {}
    fn = blocks_on(b, gate, started)
    runner = threading.Thread(target=lambda: outcome.update(value=pmap(
        fn, range(20), on_error=lambda e: "handled", retry_delays=[0.05] * 3)), daemon=True)
    runner.start()
    started.take()
    kill_worker(b)
    runner.join(DEADLINE)
    assert not runner.is_alive(), "pmap did not return"
    assert outcome["value"] == [x * x for x in range(20)]


# --------------------------------------------------------------------------------------------
# order and inputs
# --------------------------------------------------------------------------------------------
def test_results_come_in_input_order_and_use_every_worker(shared_workers):
    gate = RemoteChannel()

    def fn(x):
        if x == 0:
            gate.take()  # element 0 can finish only after element 1 did
        if x == 1:
            gate.put("go")
        return x * x, distexec.myid()

    results = pmap(fn, range(30))
    assert [r[0] for r in results] == [x * x for x in range(30)]
    assert {r[1] for r in results} == set(shared_workers)


def test_several_iterables_are_zipped_and_the_shortest_wins(shared_workers):
    assert pmap(lambda x, y: x * y, range(10), [1, 2, 3]) == [0, 2, 6]
    assert pmap(lambda a, b, c: a + b + c, "abcd", "xyz", ["1", "2", "3", "4"]) == \
        ["ax1", "by2", "cz3"]


def test_a_generator_and_an_infinite_iterator_are_consumed_lazily(shared_workers):
    assert pmap(lambda x: x + 1, (x for x in range(20))) == list(range(1, 21))
    assert pmap(lambda x, s: s * x, itertools.count(), ["a", "b", "c"]) == ["", "b", "cc"]


def test_an_empty_input_gives_an_empty_list(shared_workers):
    assert pmap(lambda x: x, []) == []
    assert pmap(lambda x: x, iter(())) == []
    assert pmap(lambda x: x, [], batch_size=3) == []
    assert pmap(lambda x: x, [], batch_size="auto") == []
    assert pmap(lambda x, y: x, range(5), []) == []


def test_a_failing_input_iterator_raises_its_error(shared_workers):
    def source():
        yield 1
        raise KeyError("input")

    with pytest.raises(KeyError):
        pmap(lambda x: x, source())


def test_pmap_needs_an_iterable(shared_workers):
    with pytest.raises(TypeError):
        pmap(lambda: 1)


# --------------------------------------------------------------------------------------------
# pools and distributed=False
# --------------------------------------------------------------------------------------------
def test_a_pool_as_first_positional_or_keyword(shared_workers):
    a, b = shared_workers
    assert pmap(lambda x: (x, distexec.myid()), WorkerPool([b]), range(4)) == \
        [(x, b) for x in range(4)]
    assert pmap(lambda x: distexec.myid(), range(4), pool=WorkerPool([a])) == [a] * 4


def test_distributed_false_runs_on_the_caller(shared_workers):
    assert pmap(lambda x: (x, distexec.myid()), range(6), distributed=False) == \
        [(x, 1) for x in range(6)]
    assert pmap(lambda x: distexec.myid(), range(6), distributed=False, batch_size=4) == [1] * 6


def test_pmap_on_a_worker_spreads_over_the_workers(shared_workers):
    a, _b = shared_workers
    results = distexec.remotecall_fetch(
        lambda: pmap(lambda x: (x * 2, distexec.myid()), range(12)), a)
    assert [r[0] for r in results] == [x * 2 for x in range(12)]
    assert {r[1] for r in results} <= set(shared_workers)


def test_pmap_on_a_worker_through_the_masters_default_pool(shared_workers):
    a, _b = shared_workers
    for batch_size in (1, 3):
        results = distexec.remotecall_fetch(
            lambda n: pmap(lambda x: (x - 1, distexec.myid()), distexec.default_worker_pool(),
                           range(9), batch_size=n), a, batch_size)
        assert [r[0] for r in results] == [i - 1 for i in range(9)]
        assert {r[1] for r in results} <= set(shared_workers)
    pool = distexec.default_worker_pool()
    assert sorted([pool.take(), pool.take()]) == shared_workers  # every worker was put back
    for pid in shared_workers:
        pool.put(pid)


def test_pmap_on_a_worker_whose_pool_is_only_itself_runs_there_even_if_taken(shared_workers):
    a, _b = shared_workers
    pool = WorkerPool([a])
    assert pool.take() == a  # busy: a distributed map would wait for it forever
    result = distexec.remotecall(
        lambda p: pmap(lambda x: (x + 1, distexec.myid()), p, range(3)), a, pool)
    assert result.fetch(timeout=DEADLINE) == [(1, a), (2, a), (3, a)]


@pytest.mark.parametrize("batch_size", [1, 5])
def test_pmap_ships_the_function_once_per_worker_and_frees_it(shared_workers, batch_size):
    from distexec.runtime.channel import Channel
    from distexec.runtime.context import default_context

    def channels():
        return sum(isinstance(rv.store, Channel) for rv in dict(default_context().refs).values())

    before = {p: distexec.remotecall_fetch(channels, p) for p in shared_workers}
    shipped = Attempts()

    class Counted:
        def __reduce__(self):
            shipped.bump("pickled")  # on the master, each time fn is sent
            return (Counted, ())

    counted = Counted()
    results = pmap(lambda x: (counted is not None, distexec.myid()), range(40),
                   batch_size=batch_size)
    assert shipped.counts()["pickled"] == len({pid for _, pid in results}) == 2
    wait_until(lambda: {p: distexec.remotecall_fetch(channels, p) for p in shared_workers}
               == before, DEADLINE, message="the workers to drop pmap's cached function")


# --------------------------------------------------------------------------------------------
# batch_size
# --------------------------------------------------------------------------------------------
def test_batch_size_sends_consecutive_elements_in_one_call(shared_workers):
    pool = CountingPool(shared_workers)
    results = pmap(lambda x: (x * 3, distexec.myid()), pool, range(40), batch_size=5)
    assert [r[0] for r in results] == [x * 3 for x in range(40)]
    assert pool.takes == 8
    for start in range(0, 40, 5):
        assert len({pid for _, pid in results[start:start + 5]}) == 1


def test_batch_size_auto_batches(shared_workers):
    pool = CountingPool(shared_workers)
    assert pmap(lambda x: -x, pool, range(120), batch_size="auto") == [-x for x in range(120)]
    assert 1 < pool.takes < 120


@pytest.mark.parametrize("bad", [0, -1, 1.5, "big"])
def test_batch_size_must_be_positive_or_auto(shared_workers, bad):
    with pytest.raises(ValueError):
        pmap(lambda x: x, range(3), batch_size=bad)


# --------------------------------------------------------------------------------------------
# errors and on_error
# --------------------------------------------------------------------------------------------
def test_without_handlers_a_remote_failure_raises_remote_exception(shared_workers):
    with pytest.raises(RemoteException) as info:
        pmap(lambda x: 1 / (x - 3), range(6))
    assert info.value.pid in shared_workers
    assert isinstance(info.value.captured.ex, ZeroDivisionError)


def test_an_unhandled_error_stops_the_remaining_elements(shared_workers, attempts):
    fn = flaky(attempts, failing={3})
    with pytest.raises(RemoteException):
        pmap(fn, WorkerPool(shared_workers[:1]), range(50))
    assert sorted(attempts.counts()) == [0, 1, 2, 3]  # one worker: elements run in order


def test_on_error_runs_on_the_worker_with_the_raw_exception(shared_workers):
    results = pmap(lambda x: 1 / (x % 3), range(6),
                   on_error=lambda e: (distexec.myid(), type(e).__name__, str(e)))
    for x, result in enumerate(results):
        if x % 3:
            assert result == 1 / (x % 3)
        else:
            pid, kind, text = result
            assert pid in shared_workers
            assert (kind, text) == ("ZeroDivisionError", "division by zero")


def test_on_error_that_raises_fails_the_map(shared_workers):
    def reraise(e):
        raise KeyError(f"handled {e}")

    with pytest.raises(RemoteException) as info:
        pmap(lambda x: 1 / x, [1, 0], on_error=reraise)
    assert isinstance(info.value.captured.ex, KeyError)


def test_batched_on_error_runs_on_the_caller_with_the_raw_exception(shared_workers):
    results = pmap(lambda x: 10 // (x % 4), range(12), batch_size=3,
                   on_error=lambda e: ("handled", distexec.myid(), type(e).__name__))
    for x, result in enumerate(results):
        assert result == (10 // (x % 4) if x % 4 else ("handled", 1, "ZeroDivisionError"))


def test_batched_errors_without_handlers_raise_the_first_failure(shared_workers):
    def fn(x):
        if x in (4, 7):
            raise ValueError(x)
        return x

    with pytest.raises(RemoteException) as info:
        pmap(fn, range(10), batch_size=10)
    assert isinstance(info.value.captured.ex, ValueError)
    assert info.value.captured.ex.args == (4,)


def test_batch_processing_error_carries_the_element_and_its_error():
    err = BatchProcessingError((3,), ValueError("x"))
    assert err.data == (3,) and isinstance(err.ex, ValueError)


# --------------------------------------------------------------------------------------------
# retries
# --------------------------------------------------------------------------------------------
def test_retry_delays_with_exponential_backoff_recover_transient_failures(shared_workers,
                                                                           attempts):
    fn = flaky(attempts, failing={3, 7}, times=2)
    delays = ExponentialBackOff(n=3, first_delay=0.01, factor=2.0)
    assert pmap(fn, range(10), retry_delays=delays) == [10 * x for x in range(10)]
    counts = attempts.counts()
    assert counts == {x: (3 if x in (3, 7) else 1) for x in range(10)}


def test_exhausted_retries_raise_the_unwrapped_original_exception(shared_workers, attempts):
    fn = flaky(attempts, failing={4})
    with pytest.raises(ValueError) as info:
        pmap(fn, range(6), retry_delays=[0.01, 0.01])
    assert type(info.value) is ValueError and info.value.args == (4,)
    assert attempts.counts()[4] == 3


def _gave_up_on(exc: BaseException, prefix: str) -> list[int]:
    """The workers a "pmap gave up" note names after ``prefix`` (checked to be its start)."""
    (note,) = exc.__notes__
    assert note.startswith(prefix), note
    rest = note[len(prefix):]
    if not rest:
        return []
    assert rest.startswith((", on worker ", ", on workers ")), note
    return [int(pid) for pid in rest.split(" ", 3)[3].split(", ")]


def test_exhausted_retries_note_the_item_the_attempts_and_the_workers(shared_workers,
                                                                     attempts):
    fn = flaky(attempts, failing={4})
    with pytest.raises(ValueError) as info:
        pmap(fn, range(6), retry_delays=[0.01, 0.01])
    workers = _gave_up_on(info.value, "pmap gave up on the item at index 4, arguments (4,), "
                                      "after 3 attempts")
    assert workers and set(workers) <= set(shared_workers)
    assert len(workers) == len(set(workers))  # each named once


def test_a_retry_check_that_refuses_notes_the_single_attempt(shared_workers, attempts):
    fn = flaky(attempts, failing={2}, exc_type=KeyError)
    with pytest.raises(KeyError) as info:
        pmap(fn, range(4), retry_delays=[0.01] * 3, retry_check=lambda s, e: False)
    (worker,) = _gave_up_on(info.value, "pmap gave up on the item at index 2, arguments (2,), "
                                        "after 1 attempt")
    assert worker in shared_workers


def test_local_retries_note_the_item_and_the_attempts(shared_workers, attempts):
    fn = flaky(attempts, failing={1})
    with pytest.raises(ValueError) as info:
        pmap(fn, range(3), distributed=False, retry_delays=[0.01])
    assert _gave_up_on(info.value, "pmap gave up on the item at index 1, arguments (1,), "
                                   "after 2 attempts") == []


def test_retry_check_returning_bool_sees_the_unwrapped_error(shared_workers, attempts):
    seen = []

    def check(state, exc):
        seen.append(type(exc).__name__)
        return isinstance(exc, ValueError)

    fn = flaky(attempts, failing={2}, times=1)
    assert pmap(fn, range(4), retry_delays=[0.01] * 3, retry_check=check) == [0, 10, 20, 30]
    assert seen == ["ValueError"]


def test_retry_check_false_stops_retrying(shared_workers, attempts):
    fn = flaky(attempts, failing={2}, exc_type=KeyError)
    with pytest.raises(KeyError):
        pmap(fn, range(4), retry_delays=[0.01] * 3,
             retry_check=lambda s, e: isinstance(e, ValueError))
    assert attempts.counts()[2] == 1


def test_retry_check_returning_state_and_bool(shared_workers, attempts):
    states = []

    def check(state, exc):
        states.append(state)
        tries = (state or 0) + 1
        return tries, tries < 2  # one retry, then give up

    fn = flaky(attempts, failing={1})
    with pytest.raises(ValueError):
        pmap(fn, range(3), retry_delays=[0.01] * 5, retry_check=check)
    assert states == [None, 1]
    assert attempts.counts()[1] == 2


def test_on_error_comes_before_retries(shared_workers, attempts):
    fn = flaky(attempts, failing={2})
    assert pmap(fn, range(4), on_error=lambda e: "handled", retry_delays=[0.01] * 3) == \
        [0, 10, "handled", 30]
    assert attempts.counts()[2] == 1


def test_batched_retries_rerun_only_the_failed_elements(shared_workers, attempts):
    fn = flaky(attempts, failing={3, 11}, times=1)
    assert pmap(fn, range(20), batch_size=5, retry_delays=[0.01, 0.01]) == \
        [10 * x for x in range(20)]
    assert attempts.counts() == {x: (2 if x in (3, 11) else 1) for x in range(20)}


def test_batched_exhausted_retries_raise_the_unwrapped_original(shared_workers, attempts):
    fn = flaky(attempts, failing={6})
    with pytest.raises(ValueError) as info:
        pmap(fn, range(10), batch_size=4, retry_delays=[0.01, 0.01])
    assert info.value.args == (6,)
    assert attempts.counts()[6] == 3  # the batch, then one retry per remaining delay
    # its index in the whole input (not among the failed ones), the batch's attempt counted
    workers = _gave_up_on(info.value, "pmap gave up on the item at index 6, arguments (6,), "
                                      "after 3 attempts")
    assert set(workers) <= set(shared_workers)


def test_batched_items_retried_once_raise_the_original_with_a_note(shared_workers, attempts):
    fn = flaky(attempts, failing={5})
    with pytest.raises(ValueError) as info:
        pmap(fn, range(10), batch_size=4, retry_delays=[0.01])
    assert type(info.value) is ValueError and info.value.args == (5,)
    _gave_up_on(info.value, "pmap gave up on the item at index 5, arguments (5,), after 2 "
                            "attempts")


def test_batched_retry_check_false_without_on_error_raises_composite(shared_workers):
    def fn(x):
        if x in (1, 5):
            raise KeyError(x)
        return x

    with pytest.raises(CompositeException) as info:
        pmap(fn, range(8), batch_size=4, retry_delays=[0.01],
             retry_check=lambda s, e: (s, isinstance(e, ValueError)))
    assert sorted(e.args[0] for e in info.value.exceptions) == [1, 5]
    assert all(type(e) is KeyError for e in info.value.exceptions)


@pytest.mark.parametrize("verdict", [lambda s, e: True, lambda s, e: (s, True)])
def test_batched_retry_check_may_return_bool_or_tuple(shared_workers, attempts, verdict):
    fn = flaky(attempts, failing={2}, times=1)
    assert pmap(fn, range(6), batch_size=3, retry_delays=[0.01], retry_check=verdict) == \
        [10 * x for x in range(6)]


def test_batched_on_error_handles_what_retries_did_not(shared_workers, attempts):
    fn = flaky(attempts, failing={3})
    results = pmap(fn, range(10), batch_size=5, retry_delays=[0.01],
                   on_error=lambda e: ("handled", type(e).__name__))
    assert results == [("handled", "ValueError") if x == 3 else 10 * x for x in range(10)]
    assert attempts.counts()[3] == 2  # once in its batch, once retried (on_error ends it)


# --------------------------------------------------------------------------------------------
# progress
# --------------------------------------------------------------------------------------------
def test_progress_without_tqdm_is_silent(shared_workers, monkeypatch, capfd):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # makes `import tqdm...` fail
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    assert pmap(lambda x: x + 1, range(10), progress=True) == list(range(1, 11))
    out, err = capfd.readouterr()
    assert "it/s" not in err and "10/10" not in err


@pytest.mark.parametrize("batch_size", [1, 4])
def test_progress_draws_a_bar_with_tqdm(shared_workers, capfd, batch_size):
    pytest.importorskip("tqdm", reason="tqdm is in the test extra")
    assert pmap(lambda x: x + 1, range(10), progress=True, batch_size=batch_size) == \
        list(range(1, 11))
    _out, err = capfd.readouterr()
    assert "10/10" in err


@pytest.mark.parametrize("env, drawn", [("1", True), ("", False)])
def test_progress_by_default_follows_distexec_progress(shared_workers, monkeypatch, capfd, env,
                                                        drawn):
    pytest.importorskip("tqdm", reason="tqdm is in the test extra")
    monkeypatch.setenv("DISTEXEC_PROGRESS", env)
    assert pmap(lambda x: x + 1, range(10)) == list(range(1, 11))
    assert pmap(lambda x: x + 1, range(10), progress=False) == list(range(1, 11))
    _out, err = capfd.readouterr()
    assert err.count("10/10") == (1 if drawn else 0)  # progress=False always wins
