"""Unit tests of the sans-IO handshake in ``distexec.protocol.handshake``.

Each test drives ServerHandshake and ClientHandshake by passing bytes between them by hand, so
every attack (wrong secret, replay, reflection, truncation, garbage) is a plain byte string.
"""

from __future__ import annotations

import hashlib
import hmac
import pickle
import random
import struct

import pytest

from distexec.errors import AuthenticationError, InvalidStateError, ProtocolError
from distexec.protocol import handshake as hs
from distexec.protocol.handshake import (
    HELLO_SIZE,
    MAGIC,
    PROTOCOL_VERSION,
    REPLY_SIZE,
    VERDICT_SIZE,
    ClientHandshake,
    ServerHandshake,
    Status,
    derive_session_key,
)

pytestmark = pytest.mark.timeout(30)

SECRET = b"S3CRET-cluster-cookie-0123456789abcdef"
OTHER = b"not-the-cluster-cookie-9876543210fedcba"
N_S = bytes(range(32))
N_C = bytes(range(100, 132))


def _mac(key: bytes, label: bytes, n_s: bytes, n_c: bytes) -> bytes:
    return hmac.new(key, label + n_s + n_c, hashlib.sha256).digest()


def _run(server: ServerHandshake, client: ClientHandshake) -> tuple[bytes, bytes, bytes]:
    """Runs a full exchange; returns (hello, reply, verdict) and lets the client raise."""
    hello = server.hello()
    reply = client.receive_hello(hello)
    verdict = server.receive_reply(reply)
    client.receive_verdict(verdict)
    return hello, reply, verdict


def _reply_for(server: ServerHandshake, secret: bytes = SECRET) -> bytes:
    """A REPLY to ``server``'s HELLO from a fresh client holding ``secret``."""
    return ClientHandshake(secret).receive_hello(server.hello())


def _assert_rejected(
    server: ServerHandshake, verdict: bytes, status: Status, error_type: type
) -> None:
    assert len(verdict) == VERDICT_SIZE
    assert verdict[0] == status
    assert verdict[1:] == bytes(32)  # a reject never carries a MAC
    assert type(server.error) is error_type
    assert server.status is status
    assert not server.done
    with pytest.raises(InvalidStateError):
        server.session_key


def test_sizes_and_constants():
    assert (HELLO_SIZE, REPLY_SIZE, VERDICT_SIZE) == (42, 74, 33)
    assert MAGIC == b"DISTEXEC" and PROTOCOL_VERSION == 1


def test_good_pair_completes_with_matching_session_keys():
    server, client = ServerHandshake(SECRET), ClientHandshake(SECRET)
    _, _, verdict = _run(server, client)
    assert server.done and client.done
    assert server.error is None and server.status is Status.OK and verdict[0] == 0
    assert server.peer_version == client.peer_version == PROTOCOL_VERSION
    assert server.session_key == client.session_key
    assert len(server.session_key) == 32


def test_wire_format_known_answer():
    """Pins the exact bytes, so any other implementation can interoperate."""
    server, client = ServerHandshake(SECRET, nonce=N_S), ClientHandshake(SECRET, nonce=N_C)
    hello, reply, verdict = _run(server, client)
    assert hello == MAGIC + b"\x00\x01" + N_S
    assert reply == MAGIC + b"\x00\x01" + N_C + _mac(SECRET, b"distexec/1 client", N_S, N_C)
    assert verdict == b"\x00" + _mac(SECRET, b"distexec/1 server", N_S, N_C)
    key = _mac(SECRET, b"distexec/1 session", N_S, N_C)
    assert derive_session_key(SECRET, N_S, N_C) == key == client.session_key == server.session_key
    # Labels separate the three MACs over the same nonces.
    assert len({reply[-32:], verdict[1:], key}) == 3


def test_fresh_nonces_differ_between_sessions():
    assert ServerHandshake(SECRET).hello() != ServerHandshake(SECRET).hello()
    hello = ServerHandshake(SECRET).hello()
    first, second = ClientHandshake(SECRET), ClientHandshake(SECRET)
    assert first.receive_hello(hello) != second.receive_hello(hello)


def test_client_with_wrong_secret_is_rejected_by_server():
    server, client = ServerHandshake(SECRET), ClientHandshake(OTHER)
    verdict = server.receive_reply(client.receive_hello(server.hello()))
    _assert_rejected(server, verdict, Status.BAD_CREDENTIALS, AuthenticationError)
    assert str(server.error) == "invalid connection credentials sent by remote"
    expected = r"peer rejected our credentials \(wrong cluster cookie\?\)"
    with pytest.raises(AuthenticationError, match=expected):
        client.receive_verdict(verdict)
    assert not client.done


def test_server_with_wrong_secret_rejects_client_and_client_learns_why():
    server, client = ServerHandshake(OTHER), ClientHandshake(SECRET)
    verdict = server.receive_reply(client.receive_hello(server.hello()))
    _assert_rejected(server, verdict, Status.BAD_CREDENTIALS, AuthenticationError)
    with pytest.raises(AuthenticationError, match="peer rejected our credentials"):
        client.receive_verdict(verdict)


@pytest.mark.parametrize("forged", ["wrong-key", "zeros", "client-mac"])
def test_impostor_server_claiming_ok_fails_on_client(forged):
    """An acceptor that does not know K cannot make the initiator accept it."""
    client = ClientHandshake(SECRET, nonce=N_C)
    reply = client.receive_hello(MAGIC + b"\x00\x01" + N_S)
    mac = {
        "wrong-key": _mac(OTHER, b"distexec/1 server", N_S, N_C),
        "zeros": bytes(32),
        # Reflection: the initiator's own MAC sent back as the acceptor's proof.
        "client-mac": reply[-32:],
    }[forged]
    expected = "peer failed to prove it knows the cluster cookie"
    with pytest.raises(AuthenticationError, match=expected):
        client.receive_verdict(b"\x00" + mac)
    assert not client.done
    with pytest.raises(InvalidStateError):
        client.session_key


def test_replayed_reply_fails_against_a_fresh_server():
    first = ServerHandshake(SECRET)
    recorded = _reply_for(first)
    assert first.receive_reply(recorded)[0] == Status.OK
    second = ServerHandshake(SECRET)
    verdict = second.receive_reply(recorded)
    _assert_rejected(second, verdict, Status.BAD_CREDENTIALS, AuthenticationError)


def test_reflected_server_mac_does_not_authenticate_a_client():
    """A server-labelled MAC over the very same nonces is not a client proof."""
    server, client = ServerHandshake(SECRET, nonce=N_S), ClientHandshake(SECRET, nonce=N_C)
    _, _, verdict = _run(server, client)
    # Worst case for the victim: a new acceptor that happens to reuse N_s.
    victim = ServerHandshake(SECRET, nonce=N_S)
    forged = MAGIC + b"\x00\x01" + N_C + verdict[1:]
    verdict = victim.receive_reply(forged)
    _assert_rejected(victim, verdict, Status.BAD_CREDENTIALS, AuthenticationError)


def test_reflected_hello_does_not_authenticate():
    server = ServerHandshake(SECRET)
    hello = server.hello()
    _assert_rejected(server, server.receive_reply(hello), Status.MALFORMED, ProtocolError)
    # Padded to REPLY length, echoing N_s as both nonce and MAC.
    padded = ServerHandshake(SECRET, nonce=N_S)
    verdict = padded.receive_reply(padded.hello() + N_S)
    _assert_rejected(padded, verdict, Status.BAD_CREDENTIALS, AuthenticationError)


def test_version_mismatch_server_newer():
    server, client = ServerHandshake(SECRET, version=2), ClientHandshake(SECRET, version=1)
    reply = client.receive_hello(server.hello())
    assert isinstance(client.pending_error, ProtocolError)
    verdict = server.receive_reply(reply)
    _assert_rejected(server, verdict, Status.VERSION_MISMATCH, ProtocolError)
    assert str(server.error) == "peer protocol 1, local 2"
    with pytest.raises(ProtocolError, match=r"^peer protocol 2, local 1$"):
        client.receive_verdict(verdict)


def test_version_mismatch_client_newer():
    server, client = ServerHandshake(SECRET, version=1), ClientHandshake(SECRET, version=2)
    verdict = server.receive_reply(client.receive_hello(server.hello()))
    _assert_rejected(server, verdict, Status.VERSION_MISMATCH, ProtocolError)
    assert str(server.error) == "peer protocol 2, local 1"
    assert server.peer_version == 2
    with pytest.raises(ProtocolError, match=r"peer protocol 1, local 2"):
        client.receive_verdict(verdict)


def test_version_mismatch_status_without_local_mismatch():
    client = ClientHandshake(SECRET)
    client.receive_hello(ServerHandshake(SECRET).hello())
    with pytest.raises(ProtocolError, match="peer protocol 1, local 1"):
        client.receive_verdict(b"\x02" + bytes(32))


@pytest.mark.parametrize(
    "status, message",
    [(3, "malformed"), (4, "unknown handshake verdict status 4"), (255, "status 255")],
)
def test_other_reject_statuses(status, message):
    client = ClientHandshake(SECRET)
    client.receive_hello(ServerHandshake(SECRET).hello())
    with pytest.raises(ProtocolError, match=message):
        client.receive_verdict(bytes([status]) + bytes(32))


def test_bad_magic_on_hello():
    hello = bytearray(ServerHandshake(SECRET).hello())
    hello[0] ^= 0xFF
    client = ClientHandshake(SECRET)
    with pytest.raises(ProtocolError, match=r"not a distexec peer \(bad magic\)"):
        client.receive_hello(bytes(hello))
    with pytest.raises(InvalidStateError):
        client.receive_verdict(b"\x00" + bytes(32))


def test_bad_magic_on_reply():
    server = ServerHandshake(SECRET)
    reply = bytearray(_reply_for(server))
    reply[7] ^= 0x01
    verdict = server.receive_reply(bytes(reply))
    _assert_rejected(server, verdict, Status.MALFORMED, ProtocolError)
    assert "bad magic" in str(server.error)


@pytest.mark.parametrize("length", [*range(HELLO_SIZE), HELLO_SIZE + 1, 2 * HELLO_SIZE])
def test_wrong_length_hello_raises_protocol_error(length):
    hello = (ServerHandshake(SECRET).hello() * 2)[:length]
    with pytest.raises(ProtocolError):
        ClientHandshake(SECRET).receive_hello(hello)


@pytest.mark.parametrize("length", [*range(REPLY_SIZE), REPLY_SIZE + 1, 2 * REPLY_SIZE])
def test_wrong_length_reply_flags_protocol_error(length):
    server = ServerHandshake(SECRET)
    reply = (_reply_for(server) * 2)[:length]
    verdict = server.receive_reply(reply)  # never raises on peer bytes
    _assert_rejected(server, verdict, Status.MALFORMED, ProtocolError)


@pytest.mark.parametrize("length", [*range(VERDICT_SIZE), VERDICT_SIZE + 1])
def test_wrong_length_verdict_raises_protocol_error(length):
    server, client = ServerHandshake(SECRET), ClientHandshake(SECRET)
    verdict = server.receive_reply(client.receive_hello(server.hello()))
    with pytest.raises(ProtocolError):
        client.receive_verdict((verdict * 2)[:length])
    assert not client.done


def test_random_replies_never_authenticate():
    rng = random.Random(20240611)
    server_nonce = bytes(rng.randrange(256) for _ in range(32))
    prefix = MAGIC + struct.pack(">H", PROTOCOL_VERSION)
    seen = set()
    for i in range(2000):
        kind = i % 4
        if kind == 0:  # any length, any bytes
            data = rng.randbytes(rng.randrange(0, 2 * REPLY_SIZE))
        elif kind == 1:  # right length, random bytes
            data = rng.randbytes(REPLY_SIZE)
        else:  # valid-looking header so the MAC check itself is exercised
            data = prefix + rng.randbytes(REPLY_SIZE - len(prefix))
        server = ServerHandshake(SECRET, nonce=server_nonce)
        verdict = server.receive_reply(data)
        assert type(server.error) in (ProtocolError, AuthenticationError)
        assert not server.done and server.status is not Status.OK
        assert len(verdict) == VERDICT_SIZE and verdict[0] != 0 and verdict[1:] == bytes(32)
        seen.add(server.status)
    assert Status.MALFORMED in seen and Status.BAD_CREDENTIALS in seen


def test_random_verdicts_never_authenticate():
    rng = random.Random(7)
    for _ in range(500):
        client = ClientHandshake(SECRET)
        client.receive_hello(ServerHandshake(SECRET).hello())
        data = bytes([rng.choice([0, 0, 1, 2, 3, rng.randrange(256)])]) + rng.randbytes(32)
        with pytest.raises((ProtocolError, AuthenticationError)):
            client.receive_verdict(data)
        assert not client.done


def test_secret_never_appears_in_bytes_or_messages():
    produced: list[bytes] = []
    texts: list[str] = []
    macs: list[bytes] = []
    scenarios = [(SECRET, SECRET, 1, 1), (SECRET, OTHER, 1, 1), (OTHER, SECRET, 1, 1),
                 (SECRET, SECRET, 2, 1), (SECRET, SECRET, 1, 2)]
    for server_key, client_key, sv, cv in scenarios:
        server = ServerHandshake(server_key, version=sv, nonce=N_S)
        client = ClientHandshake(client_key, version=cv, nonce=N_C)
        hello = server.hello()
        reply = client.receive_hello(hello)
        verdict = server.receive_reply(reply)
        produced += [hello, reply, verdict]
        macs += [reply[-32:], verdict[1:], _mac(SECRET, b"distexec/1 client", N_S, N_C),
                 _mac(SECRET, b"distexec/1 server", N_S, N_C)]
        texts += [repr(server), repr(client), str(server.error), repr(server.error)]
        try:
            client.receive_verdict(verdict)
        except (ProtocolError, AuthenticationError) as e:
            texts += [str(e), repr(e)]
    for secret in (SECRET, OTHER):
        assert not any(secret in b for b in produced)
        assert not any(secret.decode() in t or secret.hex() in t for t in texts)
    for mac in macs:
        assert not any(mac.hex() in t or repr(mac) in t for t in texts)


def test_handshakes_refuse_to_pickle():
    for obj in (ServerHandshake(SECRET), ClientHandshake(SECRET)):
        with pytest.raises(TypeError):
            pickle.dumps(obj)


def test_out_of_order_calls_are_invalid_state():
    client = ClientHandshake(SECRET)
    with pytest.raises(InvalidStateError):
        client.receive_verdict(b"\x00" + bytes(32))
    server, client = ServerHandshake(SECRET), ClientHandshake(SECRET)
    _run(server, client)
    with pytest.raises(InvalidStateError):
        client.receive_hello(server.hello())
    with pytest.raises(InvalidStateError):
        client.receive_verdict(b"\x00" + bytes(32))
    with pytest.raises(InvalidStateError):
        server.receive_reply(bytes(REPLY_SIZE))


def test_caller_errors_are_value_and_type_errors():
    with pytest.raises(ValueError):
        ServerHandshake(SECRET, nonce=b"short")
    with pytest.raises(ValueError):
        ClientHandshake(SECRET, version=70000)
    with pytest.raises(ValueError):
        ServerHandshake(b"")
    with pytest.raises(TypeError):
        ClientHandshake("a str secret")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ServerHandshake(SECRET).receive_reply("x" * REPLY_SIZE)  # type: ignore[arg-type]


def test_bytes_like_inputs_are_accepted():
    server, client = ServerHandshake(bytearray(SECRET)), ClientHandshake(memoryview(SECRET))
    reply = client.receive_hello(memoryview(server.hello()))
    client.receive_verdict(bytearray(server.receive_reply(bytearray(reply))))
    assert client.done and server.done


def test_module_imports_only_errors_and_stdlib():
    import ast
    import pathlib
    import sys

    tree = ast.parse(pathlib.Path(hs.__file__).read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            assert node.module == "errors"
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            for name in names:
                root = name.split(".")[0]
                assert root in sys.stdlib_module_names or root == "__future__", name
