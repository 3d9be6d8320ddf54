"""Large NumPy buffers through shared memory on a Unix socket (``transport.shm``), in process.

Two ``Connection`` ends over a socket pair, as between the master and a local worker: a large
array's buffer arrives as a writable object over a memfd block (no copy), the block is reused
once the receiver lets go of its array, and only then. What must not take shared memory (small
buffers, bytearrays, TCP, ``DISTEXEC_SHM=0``) takes the socket, and a frame that claims a
shared buffer where none can be is the peer's protocol error. Real processes:
tests/integration/test_shared_memory.py.
"""

from __future__ import annotations

import array
import gc
import os
import pickle
import queue
import socket
import threading

import numpy as np
import pytest

from distexec.errors import ProtocolError
from distexec.protocol import frames
from distexec.protocol.frames import Kind
from distexec.transport import shm
from distexec.transport.connection import Connection

pytestmark = pytest.mark.timeout(60)

MIB = 1 << 20


class _End:
    """One end of a connection pair: its frames and its close, as queues."""

    def __init__(self, sock: socket.socket):
        self.frames: queue.Queue = queue.Queue()
        self.closed: queue.Queue = queue.Queue()
        self.conn = Connection(sock, on_frame=lambda c, f: self.frames.put(f),
                               on_close=lambda c, e: self.closed.put(e))
        self.conn.start()

    def receive(self):
        return self.frames.get(timeout=20)


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    ends = _End(a), _End(b)
    yield ends
    for end in ends:
        end.conn.close()
        end.conn.join(10)


def _send(end: _End, value) -> None:
    buffers: list = []
    payload = pickle.dumps(value, protocol=5,
                           buffer_callback=lambda b: buffers.append(b.raw()) is not None)
    end.conn.send(Kind.RESULT, payload, buffers)


def _value(frame):
    return pickle.loads(frame.payload, buffers=frame.buffers)


def test_a_large_array_arrives_writable_over_shared_memory_and_equal(pair):
    sender, receiver = pair
    array_ = np.random.default_rng(0).integers(0, 1000, (512, 1024))  # 4 MiB
    _send(sender, array_)
    frame = receiver.receive()
    assert frame.header.shared == 1
    view = frame.buffers[0]
    assert type(view) is memoryview and not view.readonly and view.nbytes == array_.nbytes
    got = _value(frame)
    np.testing.assert_array_equal(got, array_)
    assert got.dtype == array_.dtype and got.shape == array_.shape and got.flags.writeable
    got += 1  # the receiver's writes reach nobody else
    np.testing.assert_array_equal(got - 1, array_)
    assert array_.max() < 1000


def test_a_block_is_reused_only_after_the_receiver_let_go(pair):
    sender, receiver = pair
    first = np.full(MIB, 1.0)
    _send(sender, first)
    kept = _value(receiver.receive())
    _send(sender, np.full(MIB, 2.0))  # the first block is still held: a second one
    second = _value(receiver.receive())
    assert len(sender.conn._shm_out) == 2
    assert kept[0] == 1.0 and kept[-1] == 1.0 and second[0] == 2.0
    del second
    gc.collect()
    _send(sender, np.full(MIB, 3.0))  # the second block is free again: reused, no new one
    third = _value(receiver.receive())
    assert len(sender.conn._shm_out) == 2
    assert third[0] == 3.0 and (kept == 1.0).all()


def test_a_value_keeps_its_memory_after_the_connection_is_gone(pair):
    sender, receiver = pair
    _send(sender, np.arange(MIB, dtype=np.int64))
    kept = _value(receiver.receive())
    sender.conn.close()
    assert receiver.closed.get(timeout=20) is None
    gc.collect()
    assert kept[12345] == 12345 and int(kept.sum()) == MIB * (MIB - 1) // 2


@pytest.mark.parametrize("value", [
    np.zeros(1000),                       # below SHM_MIN: in band or out of band, socket
    bytearray(2 * MIB),                   # a bytearray: the receiver expects one back
], ids=["small array", "bytearray"])
def test_what_is_not_a_large_numpy_buffer_takes_the_socket(pair, value):
    sender, receiver = pair
    buffers = [pickle.PickleBuffer(value).raw()]
    sender.conn.send(Kind.RESULT, b"", buffers)
    frame = receiver.receive()
    assert frame.header.shared == 0 and type(frame.buffers[0]) is bytearray


def test_distexec_shm_0_sends_through_the_socket_and_still_receives(monkeypatch):
    monkeypatch.setenv("DISTEXEC_SHM", "0")
    a, b = socket.socketpair()
    off = _End(a)
    monkeypatch.delenv("DISTEXEC_SHM")
    on = _End(b)
    try:
        assert off.conn._shm_out is None
        _send(off, np.ones(MIB))
        frame = on.receive()
        assert frame.header.shared == 0 and type(frame.buffers[0]) is bytearray
        _send(on, np.ones(MIB))  # the other side still sends shared buffers, and they arrive
        assert off.receive().header.shared == 1
    finally:
        for end in (off, on):
            end.conn.close()
            end.conn.join(10)


def test_tcp_connections_never_share_memory_and_refuse_a_shared_frame():
    listener = socket.create_server(("127.0.0.1", 0))
    peer = socket.create_connection(listener.getsockname())
    ours, _ = listener.accept()
    listener.close()
    end = _End(ours)
    try:
        assert end.conn._shm_out is None and end.conn._shm_in is None
        head = frames.encode_header(Kind.RESULT, 0, [2 * MIB], shared=1)
        peer.sendall(head + frames.SHARED_REF.pack(1, 0, 1))
        error = end.closed.get(timeout=20)
        assert isinstance(error, ProtocolError) and "Unix socket" in str(error)
    finally:
        peer.close()
        end.conn.close()
        end.conn.join(10)


def _send_raw(sock: socket.socket, data: bytes, fd: int | None) -> None:
    anc = [] if fd is None else [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                  array.array("i", [fd]).tobytes())]
    sock.sendmsg([data], anc)


@pytest.mark.parametrize("case", ["no descriptor", "unknown block", "unsealed", "too small"])
def test_a_bad_shared_frame_is_the_peers_protocol_error(case):
    raw, theirs = socket.socketpair()
    end = _End(theirs)
    fd = None
    try:
        n = 2 * MIB
        if case in ("unsealed", "too small"):
            fd = os.memfd_create("test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            os.ftruncate(fd, shm.HEADER + (n if case == "unsealed" else MIB))
            if case == "too small":
                import fcntl
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        record = frames.SHARED_REF.pack(7, int(fd is not None or case == "no descriptor"), 1)
        _send_raw(raw, frames.encode_header(Kind.RESULT, 0, [n], shared=1) + record, fd)
        error = end.closed.get(timeout=20)
        assert isinstance(error, ProtocolError)
    finally:
        if fd is not None:
            os.close(fd)
        raw.close()
        end.conn.close()
        end.conn.join(10)


def test_shared_bits_survive_the_header_both_ways():
    lens = [5, 2 * MIB, 3 * MIB]
    head = frames.encode_header(Kind.CALL, 0, lens, shared=0b110)
    nbufs = frames.decode_fixed_header(head[:frames.HEADER.size])[2]
    raw = frames.decode_buffer_lens(head[frames.HEADER.size:], nbufs)
    assert frames.split_shared(raw) == (tuple(lens), 0b110)
    assert frames.split_shared((1, 2)) == ((1, 2), 0)


def test_the_pool_is_bounded_and_then_the_socket_carries_the_rest(pair, monkeypatch):
    monkeypatch.setattr(shm, "MAX_BLOCKS", 2)
    sender, receiver = pair
    kept = []
    for i in range(4):
        _send(sender, np.full(MIB // 8, float(i)))
        frame = receiver.receive()
        kept.append((frame.header.shared, _value(frame)))
    assert [s for s, _ in kept] == [1, 1, 0, 0]
    assert [float(v[0]) for _, v in kept] == [0.0, 1.0, 2.0, 3.0]


def test_no_name_appears_in_dev_shm(pair):
    before = set(os.listdir("/dev/shm"))
    sender, receiver = pair
    for _ in range(3):
        _send(sender, np.ones(2 * MIB))
        _value(receiver.receive())
    assert set(os.listdir("/dev/shm")) == before


def test_a_send_that_fails_frees_its_block(pair):
    sender, receiver = pair
    sender.conn.max_message_size = MIB  # the frame is refused before anything is sent
    with pytest.raises(Exception, match="max_message_size"):
        _send(sender, np.ones(MIB))
    assert len(sender.conn._shm_out) == 0  # the new block was given up, never announced
    sender.conn.max_message_size = 1 << 40
    _send(sender, np.ones(MIB))
    assert _value(receiver.receive())[0] == 1.0


def test_many_threads_send_at_once(pair):
    sender, receiver = pair
    values = [np.full(MIB // 4 + i, float(i)) for i in range(8)]
    threads = [threading.Thread(target=_send, args=(sender, v)) for v in values]
    for t in threads:
        t.start()
    got = sorted((_value(receiver.receive()) for _ in values), key=len)
    for t in threads:
        t.join(20)
    for i, v in enumerate(got):
        np.testing.assert_array_equal(v, values[i])


def test_idle_blocks_are_given_up_on_both_sides(pair, monkeypatch):
    monkeypatch.setattr(shm, "IDLE_SECONDS", 0.0)
    monkeypatch.setattr(shm, "_TRIM_EVERY", 0.0)
    sender, receiver = pair
    _send(sender, np.ones(MIB))
    del_me = _value(receiver.receive())
    assert len(sender.conn._shm_out) == 1 and len(receiver.conn._shm_in) == 1
    del del_me
    gc.collect()
    # small messages only from now on: every frame the sender reads trims its pool, and
    # every frame the receiver reads drops the blocks the sender gave up
    receiver.conn.send(Kind.PING)
    sender.receive()
    assert len(sender.conn._shm_out) == 0
    sender.conn.send(Kind.PING)
    receiver.receive()
    assert len(receiver.conn._shm_in) == 0


def test_a_block_is_owner_only_sealed_and_nameless():
    out = shm.SharedOut()
    placed = out.place([pickle.PickleBuffer(np.ones(MIB)).raw()])
    try:
        (fd,) = placed.fds
        assert os.fstat(fd).st_mode & 0o777 == 0o600
        import fcntl
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW
        assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:distexec")
    finally:
        placed.finish(False)
        out.close()
    assert len(out) == 0


def test_a_value_held_across_a_fork_is_never_released(pair):
    sender, receiver = pair
    _send(sender, np.full(MIB, 1.0))
    held = _value(receiver.receive())
    pid = os.fork()
    if pid == 0:  # the child: drops its copy at once (its release must not count either)
        del held
        gc.collect()
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    del held  # the parent's too
    gc.collect()
    _send(sender, np.full(MIB, 2.0))  # the first block stays taken: a second one
    assert _value(receiver.receive())[0] == 2.0
    assert len(sender.conn._shm_out) == 2


def test_free_blocks_beyond_the_idle_budget_are_given_up_oldest_first(pair, monkeypatch):
    monkeypatch.setattr(shm, "MAX_IDLE_BYTES", 3 * MIB)
    monkeypatch.setattr(shm, "_TRIM_EVERY", 0.0)
    sender, receiver = pair
    held = []
    for i in range(3):  # three blocks of 2 MiB, all in use: no budget applies to those
        _send(sender, np.full(MIB // 4, float(i)))
        held.append(_value(receiver.receive()))
    assert len(sender.conn._shm_out) == 3
    del held[:]
    gc.collect()
    receiver.conn.send(Kind.PING)  # the sender reads a frame: trims to 1 block (2 MiB <= 3)
    sender.receive()
    assert len(sender.conn._shm_out) == 1
