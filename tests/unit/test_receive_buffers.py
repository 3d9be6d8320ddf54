"""Large receive buffers are reused only once nobody holds them (``transport.buffers``)."""

from __future__ import annotations

import pickle

import pytest

from distexec.transport import buffers
from distexec.transport.buffers import ReceiveBuffers

pytestmark = pytest.mark.timeout(30)

MiB = 1 << 20


def test_a_buffer_nobody_holds_is_received_into_again():
    pool = ReceiveBuffers()
    first = pool.take(2 * MiB)
    address = id(first)
    del first
    assert id(pool.take(2 * MiB)) == address


def test_a_buffer_still_held_is_never_reused():
    pool = ReceiveBuffers()
    held = pool.take(2 * MiB)
    held[:5] = b"value"
    again = pool.take(2 * MiB)
    assert again is not held
    again[:5] = b"other"
    assert held[:5] == b"value"


def test_a_value_built_on_a_buffer_keeps_it_from_reuse():
    np = pytest.importorskip("numpy")
    pool = ReceiveBuffers()
    array = np.arange(MiB // 8 * 2, dtype=np.float64)
    out_of_band: list = []
    payload = pickle.dumps(array, protocol=5, buffer_callback=out_of_band.append)
    received = pool.take(array.nbytes)
    received[:] = out_of_band[0].raw()
    value = pickle.loads(payload, buffers=[received])
    del received
    pool.take(array.nbytes)[:] = bytes(array.nbytes)  # a later message of the same size
    assert (value == array).all()
    del value
    assert len(pool) == 2


def test_small_buffers_are_not_kept():
    pool = ReceiveBuffers()
    pool.take(buffers.MIN_POOLED - 1)
    assert len(pool) == 0


def test_the_pool_is_bounded_in_count_and_bytes(monkeypatch):
    monkeypatch.setattr(buffers, "MAX_POOLED_BYTES", 5 * MiB)
    pool = ReceiveBuffers()
    held = [pool.take(2 * MiB) for _ in range(buffers.MAX_POOLED + 2)]
    assert len(pool) == 2  # 2 x 2 MiB fit in 5 MiB
    assert pool.take(6 * MiB) is not None and len(pool) == 2  # too large to keep
    del held


def test_idle_buffers_are_released(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(buffers.time, "monotonic", lambda: clock[0])
    pool = ReceiveBuffers()
    pool.take(2 * MiB)
    pool.trim()
    assert len(pool) == 1
    clock[0] += buffers.IDLE_SECONDS + 0.1
    pool.trim()
    assert len(pool) == 0
