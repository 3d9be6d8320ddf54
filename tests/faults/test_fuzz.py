"""Fuzzing the pre-authentication path (spec/faults.md G6; rows N2, N5, N8).

Hypothesis feeds a real :class:`~distexec.transport.sockets.Listener` (real sockets, its real
accept loop and handshake threads) and a real worker's port with random bytes, with mutations
of real handshakes (a fresh REPLY for the connection's own HELLO, one recorded from an earlier
session, one made with the wrong key; bytes flipped, set, inserted, deleted, truncated or
appended), and with frames -- mutated, with huge lengths, with pickles that name globals --
sent straight after the HELLO, ahead of or instead of the REPLY, before any verdict.

What must hold for every example: nothing is unpickled (no ``loads`` call and no
``pickle.find_class`` audit event: :class:`~tests.faults.helpers.UnpicklingCounter`), at most
``REPLY_SIZE`` bytes are read, and the connection is authenticated exactly when its first
``REPLY_SIZE`` bytes are the valid REPLY for its HELLO. Afterwards the listener still
authenticates a legitimate client and the file descriptors are back to their count before.

The default group runs 10,000 examples (``derandomize=True``: the same ones on every run);
the ``slow`` group sweeps 50,000.
"""

from __future__ import annotations

import pickle
import random
import secrets
import socket
import struct

import cloudpickle
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import distexec
from distexec.protocol import handshake, serialization
from distexec.protocol.frames import HEADER, Kind
from distexec.runtime.context import default_context
from distexec.transport import sockets
from tests.faults.helpers import (
    UnpicklingCounter,
    connect_at,
    count_preauth_unpickling,
    counting_listen_socket,
    preauth_unpickling_seen,
)
from tests.helpers import os_pid, wait_until

pytestmark = pytest.mark.timeout(180)  # the slow sweeps take ~40 s each here

KEY = secrets.token_bytes(32)
READ_LIMIT = handshake.REPLY_SIZE
"""What the acceptor may read from a peer before it has authenticated."""


def _fuzz_settings(examples: int):
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.large_base_example])


def _examples(default: int, sweep: int):
    """The default run, and the bigger sweep of the slow group."""
    return pytest.mark.parametrize("examples", [
        pytest.param(default, id="default"),
        pytest.param(sweep, id="sweep", marks=pytest.mark.slow),
    ])


# --------------------------------------------------------------------------------------------
# Talking to a listener
# --------------------------------------------------------------------------------------------
class _Probe:
    """One connection: read the HELLO, send, half-close, read what the server says until it
    closes. The half-close lets the server see EOF at once instead of at its deadline."""

    def __init__(self, address):
        self.sock = socket.create_connection(address, timeout=5)
        self.hello = _recv_exact(self.sock, handshake.HELLO_SIZE)

    def finish(self, data: bytes) -> tuple[bytes, bool]:
        """Send ``data``, then read until the server closes; returns (answer, reset)."""
        with self.sock:
            try:
                self.sock.sendall(data)
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the server closed first: it rejected a prefix of the data
            answer, reset = b"", False
            try:
                while chunk := self.sock.recv(4096):
                    answer += chunk
            except ConnectionResetError:
                reset = True  # closed with our bytes unread: the kernel resets
            return answer, reset


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "the listener closed before its HELLO was complete"
        data += chunk
    return data


class _InProcessListener:
    """A Listener in this process; authenticated sockets are counted and closed at once."""

    def __init__(self):
        self.authenticated = 0
        self.sock = counting_listen_socket()
        self.listener = sockets.Listener(self.sock, KEY, self._on_authenticated)
        self.listener.start()
        self.address = self.listener.address
        self.counter: UnpicklingCounter | None = None

    def _on_authenticated(self, sock, _version) -> None:
        self.authenticated += 1
        sock.close()

    def probe(self, make_data) -> None:
        """One example: connect, send ``make_data(hello, valid_reply)``, check every invariant."""
        attempt = _Probe(self.address)
        valid = _valid_reply(KEY, attempt.hello)
        data = make_data(attempt.hello, valid)
        before = self.authenticated
        answer, reset = attempt.finish(data)
        should_authenticate = data[:handshake.REPLY_SIZE] == valid
        _check_verdict(answer, reset, should_authenticate)
        # The handshake thread hands a socket on (here: counted, then closed) before anything
        # closes it, so once the probe has seen the close the count is final.
        assert self.authenticated - before == should_authenticate
        assert self.sock.accepted[-1].bytes_read <= READ_LIMIT
        assert self.counter.total == 0, "unpickled before authentication"

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def listener():
    target = _InProcessListener()
    fds_before = psutil.Process().num_fds()
    with UnpicklingCounter() as counter:
        target.counter = counter
        yield target
    # The listener still serves a legitimate client, and nothing was left open.
    authenticated = target.authenticated
    sockets.connect(*target.address, KEY, timeout=5).close()
    wait_until(lambda: target.authenticated == authenticated + 1, 5,
               message="a legitimate client to be accepted after the fuzzing")
    wait_until(lambda: psutil.Process().num_fds() <= fds_before, 10,
               message="the file descriptors to return to their count before the fuzzing")
    target.close()


def _check_verdict(answer: bytes, reset: bool, should_authenticate: bool) -> None:
    """OK exactly for a valid REPLY; otherwise a reject status, or a bare close."""
    if reset:
        return  # a reset (our bytes left unread) may discard the verdict before we read it
    if should_authenticate:
        assert answer[:1] == bytes([handshake.Status.OK]), answer
    else:
        assert answer == b"" or (len(answer) == handshake.VERDICT_SIZE
                                 and answer[0] != handshake.Status.OK), answer


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------
def _blob(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


# Random bytes, 1 B to 64 KiB. Large ones come from a seeded generator (hypothesis' own buffer
# is small); a prefix of the magic is often prepended so that the bytes get past the first check.
large_junk = st.builds(_blob, st.integers(0, 2**32), st.integers(1, 64 * 1024))
small_junk = st.binary(min_size=1, max_size=256)
random_bytes = st.builds(lambda k, tail: handshake.MAGIC[:k] + tail,
                         st.sampled_from([0, 0, 3, 8, 8]), st.one_of(small_junk, large_junk))

_position = st.integers(0, 255)
_mutation = st.one_of(
    st.tuples(st.just("flip"), _position, st.integers(0, 7)),
    st.tuples(st.just("set"), _position, st.integers(0, 255)),
    st.tuples(st.just("insert"), _position, st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), _position, st.integers(1, 16)),
    st.tuples(st.just("truncate"), _position),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
)
mutations = st.lists(_mutation, min_size=1, max_size=4)


def mutate(data: bytes, ops) -> bytes:
    """Apply hypothesis' mutations; positions wrap around the current length."""
    out = bytearray(data)
    for op, *args in ops:
        at = args[0] % (len(out) + 1) if op != "append" else 0
        if op == "flip" and at < len(out):
            out[at] ^= 1 << args[1]
        elif op == "set" and at < len(out):
            out[at] = args[1]
        elif op == "insert":
            out[at:at] = args[1]
        elif op == "delete":
            del out[at:at + args[1]]
        elif op == "truncate":
            del out[at:]
        elif op == "append":
            out += args[0]
    return bytes(out)


class _RecordingSocket(socket.socket):
    """A client socket that keeps a copy of everything sent through it."""

    sent = b""

    def sendall(self, data, *args):
        self.sent += bytes(data)
        return super().sendall(data, *args)


def record_real_reply(address, key: bytes) -> bytes:
    """The REPLY a real client (``sockets.initiate_handshake``) sent in one good session."""
    sock = _RecordingSocket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(address)
    with sock:
        sockets.initiate_handshake(sock, key, 5, "recording")
    assert len(sock.sent) == handshake.REPLY_SIZE
    return sock.sent


def _pickled_globals() -> list[bytes]:
    """Payloads whose unpickling would resolve globals (a find_class event each)."""
    call = (print, ("never printed",), {})
    return [pickle.dumps(call), cloudpickle.dumps(lambda: "never run"),
            serialization.dumps(call, 2)[0]]


PAYLOADS = _pickled_globals()
_kinds = st.one_of(st.sampled_from(list(Kind)), st.integers(0, 255))
_lengths = st.one_of(st.none(), st.sampled_from([2**31 - 1, 2**63, 2**64 - 1]),
                     st.integers(0, 2**64 - 1))


@st.composite
def frames(draw) -> bytes:
    """One frame as an authenticated peer would send it, possibly lying about its length."""
    payload = mutate(draw(st.sampled_from(PAYLOADS)), draw(st.lists(_mutation, max_size=2)))
    length = draw(_lengths)
    nbufs = draw(st.sampled_from([0, 0, 1, 65535]))
    head = HEADER.pack(draw(_kinds), 0, nbufs, 0, 0, 0, 1, 1,
                       len(payload) if length is None else length)
    table = b"".join(struct.pack("<Q", len(payload)) for _ in range(min(nbufs, 1)))
    return head + table + payload


# --------------------------------------------------------------------------------------------
# G6, N2: random bytes
# --------------------------------------------------------------------------------------------
@pytest.mark.fault("N2")
@_examples(default=4000, sweep=16000)
def test_random_bytes_are_never_unpickled(listener, examples):
    ran = []

    @_fuzz_settings(examples)
    @given(junk=random_bytes)
    def probe(junk):
        listener.probe(lambda hello, valid: junk)
        ran.append(1)

    probe()
    assert len(ran) >= examples


def _valid_reply(key: bytes, hello: bytes) -> bytes:
    return handshake.ClientHandshake(key).receive_hello(hello)


# --------------------------------------------------------------------------------------------
# G6, N8: mutated handshakes
# --------------------------------------------------------------------------------------------
BASES = ("fresh", "recorded", "wrong-key")


def _base_reply(base: str, valid: bytes, hello: bytes, recorded: bytes) -> bytes:
    """The real REPLY to mutate: this session's, an earlier session's, or a wrong key's."""
    if base == "fresh":
        return valid
    if base == "recorded":
        return recorded
    return _valid_reply(secrets.token_bytes(32), hello)


@pytest.mark.fault("N8")
@_examples(default=4000, sweep=16000)
def test_mutated_handshakes_are_never_unpickled(listener, examples):
    recorded = record_real_reply(listener.address, KEY)
    ran = []

    @_fuzz_settings(examples)
    @given(base=st.sampled_from(BASES), ops=mutations)
    def probe(base, ops):
        listener.probe(lambda hello, valid: mutate(_base_reply(base, valid, hello, recorded), ops))
        ran.append(1)

    probe()
    assert len(ran) >= examples


# --------------------------------------------------------------------------------------------
# G6, N5: frames sent after the HELLO, before the verdict
# --------------------------------------------------------------------------------------------
PREFIXES = ("none", "wrong-key", "wrong-version", "bad-mac", "cut")


def _reply_prefix(kind: str, cut: int, hello: bytes, valid: bytes) -> bytes:
    """What comes before the frames: nothing, a rejected REPLY, or part of the valid one."""
    if kind == "none":
        return b""
    if kind == "wrong-key":
        return _valid_reply(secrets.token_bytes(32), hello)
    if kind == "wrong-version":
        return handshake.ClientHandshake(KEY, version=handshake.PROTOCOL_VERSION + 1) \
            .receive_hello(hello)
    if kind == "bad-mac":
        return valid[:-1] + bytes([valid[-1] ^ 1])
    return valid[:cut]


@pytest.mark.fault("N5")
@_examples(default=2000, sweep=12000)
def test_frames_before_the_verdict_are_never_read(listener, examples):
    ran = []

    @_fuzz_settings(examples)
    @given(prefix=st.sampled_from(PREFIXES), cut=st.integers(0, handshake.REPLY_SIZE - 1),
           sent=st.lists(frames(), min_size=1, max_size=3))
    def probe(prefix, cut, sent):
        listener.probe(lambda hello, valid: _reply_prefix(prefix, cut, hello, valid)
                       + b"".join(sent))
        ran.append(1)

    probe()
    assert len(ran) >= examples


# --------------------------------------------------------------------------------------------
# G6 against a worker: its real listener, while it keeps serving its master
# --------------------------------------------------------------------------------------------
@pytest.mark.fault("N2", "N8")
@_examples(default=1000, sweep=6000)
def test_a_workers_port_never_unpickles_fuzz(add_workers, examples):
    (pid,) = add_workers(1)
    key = default_context().cookie.key
    address = connect_at(pid)
    worker = psutil.Process(os_pid(pid))
    distexec.remotecall_fetch(count_preauth_unpickling, pid)
    recorded = record_real_reply(address, key)
    fds_before = worker.num_fds()
    ran = []

    @_fuzz_settings(examples)
    @given(base=st.sampled_from(("junk", *BASES)), junk=random_bytes, ops=mutations)
    def probe(base, junk, ops):
        attempt = _Probe(address)
        valid = _valid_reply(key, attempt.hello)
        data = junk if base == "junk" else mutate(
            _base_reply(base, valid, attempt.hello, recorded), ops)
        answer, reset = attempt.finish(data)
        # From outside, the verdict is what shows whether the worker authenticated us.
        _check_verdict(answer, reset, data[:handshake.REPLY_SIZE] == valid)
        ran.append(1)

    probe()
    assert len(ran) >= examples
    assert distexec.remotecall_fetch(preauth_unpickling_seen, pid) == (0, 0)
    sockets.connect(*address, key, timeout=5).close()
    wait_until(lambda: worker.num_fds() <= fds_before, 15,
               message="the worker's file descriptors to return to their count before")
    assert distexec.workers() == [pid]
    assert distexec.remotecall_fetch(lambda: 6 * 7, pid) == 42
