"""The pieces of pmap that need no cluster: splitrange, batchsplit, ExponentialBackOff, retry.

Examples come from spec/distributednext.md §7 and §8 (Julia's results, in Python ranges).
``retry`` is exercised with local functions that fail a chosen number of times.
"""

from __future__ import annotations

import time

import pytest

from distexec import ExponentialBackOff, splitrange
from distexec.pmap import batchsplit, retry

pytestmark = pytest.mark.timeout(30)


# --------------------------------------------------------------------------------------------
# splitrange
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("first", "last", "np", "expected"),
    [
        (1, 11, 2, [range(1, 7), range(7, 12)]),
        (1, 11, 3, [range(1, 5), range(5, 9), range(9, 12)]),
        (-1, 9, 3, [range(-1, 3), range(3, 7), range(7, 10)]),
        (1, 3, 4, [range(1, 2), range(2, 3), range(3, 4)]),
        (0, 5, 1, [range(0, 6)]),
        (5, 5, 3, [range(5, 6)]),
    ],
)
def test_splitrange_matches_julia(first, last, np, expected):
    assert splitrange(first, last, np) == expected


@pytest.mark.parametrize("length", [1, 2, 7, 10, 33])
@pytest.mark.parametrize("np", [1, 2, 3, 4, 8])
def test_splitrange_covers_the_range_in_balanced_contiguous_chunks(length, np):
    chunks = splitrange(10, 10 + length - 1, np)
    assert [i for c in chunks for i in c] == list(range(10, 10 + length))
    assert len(chunks) == min(np, length)
    sizes = [len(c) for c in chunks]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the bigger chunks come first


def test_splitrange_of_an_empty_range_has_no_chunks():
    assert splitrange(1, 0, 3) == []


@pytest.mark.parametrize("np", [0, -1])
def test_splitrange_needs_at_least_one_chunk(np):
    with pytest.raises(ValueError):
        splitrange(1, 10, np)


# --------------------------------------------------------------------------------------------
# batchsplit
# --------------------------------------------------------------------------------------------
def test_batchsplit_partitions_by_max_batch_size():
    batches = batchsplit(range(250))
    assert [len(b) for b in batches] == [100, 100, 50]
    assert [x for b in batches for x in b] == list(range(250))


def test_batchsplit_makes_smaller_batches_to_reach_min_batch_count():
    # 20 items, at least 6 batches: chunks of max(1, 20 // 6) = 3
    batches = batchsplit(range(20), min_batch_count=6, max_batch_size=100)
    assert [len(b) for b in batches] == [3, 3, 3, 3, 3, 3, 2]
    assert [x for b in batches for x in b] == list(range(20))


def test_batchsplit_never_makes_empty_batches():
    assert batchsplit(range(2), min_batch_count=5) == [[0], [1]]
    assert batchsplit([], min_batch_count=3) == []


def test_batchsplit_consumes_a_generator():
    assert batchsplit((x for x in range(5)), max_batch_size=2) == [[0, 1], [2, 3], [4]]


@pytest.mark.parametrize("kwargs", [{"min_batch_count": 0}, {"max_batch_size": 0}])
def test_batchsplit_rejects_non_positive_sizes(kwargs):
    with pytest.raises(ValueError):
        batchsplit(range(5), **kwargs)


# --------------------------------------------------------------------------------------------
# ExponentialBackOff
# --------------------------------------------------------------------------------------------
def test_exponential_backoff_defaults_are_julias():
    ebo = ExponentialBackOff()
    assert (ebo.n, ebo.first_delay, ebo.max_delay, ebo.factor, ebo.jitter) == (1, 0.05, 10.0, 5.0,
                                                                             0.1)
    assert len(ebo) == 1
    assert list(ebo) == [0.05]


def test_exponential_backoff_without_jitter_grows_by_factor_and_is_capped():
    assert list(ExponentialBackOff(n=4, first_delay=1.0, factor=2.0, jitter=0.0)) == [1, 2, 4, 8]
    capped = ExponentialBackOff(n=5, first_delay=1.0, max_delay=50.0, factor=10.0, jitter=0.0)
    assert list(capped) == [1, 10, 50, 50, 50]


def test_exponential_backoff_jitter_stays_within_bounds():
    ebo = ExponentialBackOff(n=6, first_delay=0.01, max_delay=1e9, factor=3.0, jitter=0.2)
    for _ in range(20):
        delays = list(ebo)
        assert len(delays) == 6 and delays[0] == 0.01
        for before, after in zip(delays, delays[1:], strict=False):
            assert 3.0 * 0.8 - 1e-9 <= after / before <= 3.0 * 1.2 + 1e-9


def test_exponential_backoff_can_be_iterated_again_and_has_a_length():
    ebo = ExponentialBackOff(n=3, jitter=0.0)
    assert len(ebo) == 3
    assert list(ebo) == list(ebo)
    assert list(ExponentialBackOff(n=0)) == []


@pytest.mark.parametrize("kwargs", [{"n": -1}, {"first_delay": -1}, {"max_delay": -1},
                                    {"factor": 0}, {"jitter": -0.1}])
def test_exponential_backoff_rejects_bad_parameters(kwargs):
    with pytest.raises(ValueError):
        ExponentialBackOff(**kwargs)


# --------------------------------------------------------------------------------------------
# retry
# --------------------------------------------------------------------------------------------
class Flaky:
    """Fails ``failures`` times with ``exc_type``, then returns its arguments."""

    def __init__(self, failures: int, exc_type: type[Exception] = ValueError):
        self.failures, self.exc_type, self.calls = failures, exc_type, 0
        self.raised: list[Exception] = []

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls <= self.failures:
            exc = self.exc_type(f"attempt {self.calls}")
            self.raised.append(exc)
            raise exc
        return args, kwargs


def test_retry_returns_the_first_success_with_args_and_kwargs():
    fn = Flaky(2)
    assert retry(fn, [0.0, 0.0, 0.0])(1, 2, k=3) == ((1, 2), {"k": 3})
    assert fn.calls == 3


def test_retry_makes_one_attempt_per_delay_plus_one_then_raises_the_last_error():
    fn = Flaky(10)
    with pytest.raises(ValueError) as info:
        retry(fn, [0.0, 0.0])()
    assert fn.calls == 3
    assert info.value is fn.raised[-1]


def test_retry_without_delays_is_a_single_attempt():
    fn = Flaky(1)
    with pytest.raises(ValueError):
        retry(fn)()
    assert fn.calls == 1


def test_retry_sleeps_each_delay_between_attempts():
    fn = Flaky(2)
    start = time.monotonic()
    retry(fn, [0.1, 0.15])()
    assert time.monotonic() - start >= 0.25


def test_retry_check_false_reraises_at_once():
    fn = Flaky(5, KeyError)
    seen = []

    def check(state, exc):
        seen.append(exc)
        return isinstance(exc, ValueError)

    with pytest.raises(KeyError) as info:
        retry(fn, [0.0, 0.0, 0.0], check)()
    assert fn.calls == 1
    assert seen == [info.value]


def test_retry_check_true_retries():
    fn = Flaky(2)
    seen = []
    assert retry(fn, [0.0, 0.0], lambda s, e: seen.append(e) or True)() == ((), {})
    assert seen == fn.raised


def test_retry_check_state_is_threaded_through_tuples():
    fn = Flaky(10)
    states = []

    def check(state, exc):
        states.append(state)
        count = (state or 0) + 1
        return count, count < 3  # allow two retries, then give up

    with pytest.raises(ValueError) as info:
        retry(fn, [0.0] * 5, check)()
    assert states == [None, 1, 2]
    assert fn.calls == 3
    assert info.value is fn.raised[-1]


def test_retry_accepts_an_exponential_backoff():
    fn = Flaky(3)
    assert retry(fn, ExponentialBackOff(n=3, first_delay=0.001, factor=2.0))() == ((), {})
    assert fn.calls == 4
