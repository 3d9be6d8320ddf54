"""Sans-IO connection handshake: mutual HMAC-SHA256 challenge-response over fresh nonces.

Owns the byte layout and the checks of the three messages that open every connection, before
any frame is exchanged, and the per-connection session key derived from them. Imports only
``distexec.errors`` and the standard library: no sockets, threads or clocks. The caller reads
exactly ``HELLO_SIZE``, ``REPLY_SIZE`` or ``VERDICT_SIZE`` bytes (with its own deadline), hands
them in, and writes out whatever bytes come back; the acceptor may first hand in the REPLY's
opening bytes (``receive_magic``) to turn away a stranger before the rest arrives.

Theory of operation::

    acceptor (ServerHandshake)                           initiator (ClientHandshake)
      |                                                                     |
      | HELLO   (42 B) = MAGIC(8) | version u16 BE | N_s(32)                |
      |-------------------------------------------------------------------->|
      |                                                                     |
      | REPLY   (74 B) = MAGIC(8) | version u16 BE | N_c(32)                |
      |                  | HMAC-SHA256(K, "distexec/1 client" | N_s | N_c)  |
      |<--------------------------------------------------------------------|
      |                                                                     |
      | VERDICT (33 B) = status u8                                          |
      |                  | HMAC-SHA256(K, "distexec/1 server" | N_s | N_c)  |
      |                    (32 zero bytes unless status == OK)              |
      |-------------------------------------------------------------------->|

    status: 0 OK, 1 bad credentials, 2 version mismatch, 3 malformed
    session key = HMAC-SHA256(K, "distexec/1 session" | N_s | N_c)

With TLS the acceptor first sends ``TLS_HELLO`` (a HELLO whose nonce field is a fixed marker),
in plaintext; the initiator checks it (``check_tls_hello``), both run the TLS handshake, and
the exchange above then runs inside TLS. The marker lets each side fail at once, with a clear
error, when only one of them uses TLS: a plaintext initiator recognizes ``TLS_HELLO`` in
``receive_hello``; a TLS initiator recognizes a plaintext HELLO in ``check_tls_hello``.

The secret ``K`` never crosses the wire. Both nonces come from ``os.urandom``, so a recorded
REPLY is useless against a new HELLO (replay). The role labels make a client MAC different from a
server MAC over the same nonces, so neither side can be fed its own MAC back (reflection). The
acceptor always answers with an explicit VERDICT so that a rejected initiator raises a clear
:class:`~distexec.errors.AuthenticationError` or :class:`~distexec.errors.ProtocolError` rather
than seeing a bare EOF. MACs are compared only with :func:`hmac.compare_digest`.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import struct

from ..errors import AuthenticationError, InvalidStateError, ProtocolError

__all__ = [
    "PROTOCOL_VERSION",
    "MAGIC",
    "NONCE_SIZE",
    "MAC_SIZE",
    "HELLO_SIZE",
    "REPLY_SIZE",
    "VERDICT_SIZE",
    "Status",
    "ServerHandshake",
    "ClientHandshake",
    "derive_session_key",
    "TLS_HELLO",
    "check_tls_hello",
]

PROTOCOL_VERSION = 1
MAGIC = b"DISTEXEC"
NONCE_SIZE = 32
MAC_SIZE = 32

_HELLO = struct.Struct(f">{len(MAGIC)}sH{NONCE_SIZE}s")
_REPLY = struct.Struct(f">{len(MAGIC)}sH{NONCE_SIZE}s{MAC_SIZE}s")
_VERDICT = struct.Struct(f">B{MAC_SIZE}s")

HELLO_SIZE = _HELLO.size      # 42
REPLY_SIZE = _REPLY.size      # 74
VERDICT_SIZE = _VERDICT.size  # 33

# Role labels: distinct per direction so a MAC made by one role never verifies as the other's.
_CLIENT_LABEL = b"distexec/1 client"
_SERVER_LABEL = b"distexec/1 server"
_SESSION_LABEL = b"distexec/1 session"
_NO_MAC = bytes(MAC_SIZE)

TLS_HELLO = _HELLO.pack(MAGIC, PROTOCOL_VERSION, b"distexec: TLS first".ljust(NONCE_SIZE, b"\0"))
"""What a TLS acceptor sends before the TLS handshake (plaintext, ``HELLO_SIZE`` bytes)."""


def check_tls_hello(data: bytes) -> None:
    """Checks the first bytes a TLS initiator reads; returns if the acceptor speaks TLS.

    Raises:
        AuthenticationError: the acceptor sent a plaintext HELLO (it was started without TLS).
        ProtocolError: not a distexec peer.
    """
    data = _as_bytes(data, HELLO_SIZE, "handshake HELLO")
    if data == TLS_HELLO:
        return
    if data.startswith(MAGIC):
        raise AuthenticationError("peer does not use TLS, but this process requires it "
                                  "(was the worker started without --tls?)")
    raise ProtocolError("not a distexec peer (bad magic)")


class Status(enum.IntEnum):
    """The status byte of a VERDICT."""

    OK = 0
    BAD_CREDENTIALS = 1
    VERSION_MISMATCH = 2
    MALFORMED = 3


def derive_session_key(secret: bytes, n_s: bytes, n_c: bytes) -> bytes:
    """Derives the per-connection key both sides share after a successful handshake.

    Args:
        secret: the cluster secret ``K``.
        n_s: the acceptor's nonce.
        n_c: the initiator's nonce.

    Returns:
        ``HMAC-SHA256(K, b"distexec/1 session" + N_s + N_c)``, 32 bytes.
    """
    return _mac(secret, _SESSION_LABEL, n_s, n_c)


def _mac(secret: bytes, label: bytes, n_s: bytes, n_c: bytes) -> bytes:
    return hmac.new(secret, label + n_s + n_c, hashlib.sha256).digest()


def _version_error(peer: int, mine: int) -> ProtocolError:
    return ProtocolError(f"peer protocol {peer}, local {mine}")


def _check_secret(secret) -> bytes:
    """Copies the secret to plain bytes; rejects what cannot be a secret (caller's error)."""
    if not isinstance(secret, (bytes, bytearray, memoryview)):
        raise TypeError(f"secret must be bytes, not {type(secret).__name__}")
    if len(secret) == 0:
        # An empty key still yields valid-looking HMACs; refuse it rather than authenticate anyone.
        raise ValueError("secret must not be empty")
    return bytes(secret)


def _check_version(version) -> int:
    if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version <= 0xFFFF:
        raise ValueError(f"version must be an int in 0..65535, got {version!r}")
    return version


def _make_nonce(nonce) -> bytes:
    if nonce is None:
        return os.urandom(NONCE_SIZE)
    if not isinstance(nonce, (bytes, bytearray, memoryview)) or len(nonce) != NONCE_SIZE:
        raise ValueError(f"nonce must be {NONCE_SIZE} bytes")
    return bytes(nonce)


def _as_bytes(data, expected: int, what: str) -> bytes:
    """Returns ``data`` as bytes of exactly ``expected`` length, or raises ProtocolError."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what} must be bytes, not {type(data).__name__}")
    data = bytes(data)
    if len(data) != expected:
        raise ProtocolError(f"{what} must be {expected} bytes, got {len(data)}")
    return data


class _Handshake:
    """State shared by both roles. Holds the secret, so it never reprs or pickles it."""

    _role = "handshake"

    def __init__(self, secret: bytes, version: int, nonce: bytes | None):
        self._secret = _check_secret(secret)
        self.version = _check_version(version)
        self._nonce = _make_nonce(nonce)
        self._session_key: bytes | None = None
        self.done = False
        self.peer_version: int | None = None

    @property
    def session_key(self) -> bytes:
        """The key from :func:`derive_session_key`, available once the handshake succeeded.

        Raises:
            InvalidStateError: the handshake has not (yet) succeeded.
        """
        if self._session_key is None:
            raise InvalidStateError(
                "handshake has not succeeded; no session key", "unauthenticated"
            )
        return self._session_key

    def __repr__(self) -> str:
        state = "done" if self.done else "pending"
        return (
            f"<{type(self).__name__} {state} version={self.version} "
            f"peer_version={self.peer_version}>"
        )

    def __reduce__(self):
        # Pickling would carry the secret to wherever the pickle goes.
        raise TypeError(f"{type(self).__name__} holds the cluster secret and cannot be pickled")


class ServerHandshake(_Handshake):
    """The acceptor's side: sends HELLO, checks the REPLY, answers with a VERDICT.

    Never raises on bytes from the peer: a failure is recorded in :attr:`error` and a reject
    VERDICT is still returned, so the caller can tell the peer why before closing.

    Attributes:
        done: True once the peer has proved it knows the secret.
        error: the AuthenticationError or ProtocolError that failed the handshake, else None.
        peer_version: the protocol version the peer announced, once its REPLY could be parsed.
        status: the :class:`Status` sent in the VERDICT, once there is one.
    """

    def __init__(
        self, secret: bytes, *, version: int = PROTOCOL_VERSION, nonce: bytes | None = None
    ):
        """Creates the acceptor's state.

        Args:
            secret: the cluster secret ``K``.
            version: the protocol version to announce (tests use other values).
            nonce: ``N_s``; a fresh ``os.urandom`` nonce unless given (deterministic tests).
        """
        super().__init__(secret, version, nonce)
        self.error: Exception | None = None
        self.status: Status | None = None

    def hello(self) -> bytes:
        """Returns the HELLO to send first (the same bytes on every call)."""
        return _HELLO.pack(MAGIC, self.version, self._nonce)

    def receive_magic(self, prefix: bytes) -> bytes | None:
        """Checks the first bytes of the REPLY as they arrive, before the rest of it.

        A peer that does not speak distexec (a scanner, an HTTP or TLS client, random bytes)
        is then rejected at its first wrong byte instead of holding its connection open until
        the handshake deadline while the acceptor waits for a full REPLY.

        Args:
            prefix: the REPLY bytes received so far, at most ``len(MAGIC)`` of them.

        Returns:
            None while ``prefix`` can still start a REPLY (read on); otherwise the reject
            VERDICT to send, with :attr:`error` set as :meth:`receive_reply` would set it.

        Raises:
            InvalidStateError: a REPLY was already processed.
            TypeError: ``prefix`` is not bytes-like.
        """
        if self.status is not None:
            raise InvalidStateError("handshake already answered a REPLY", "finished")
        if not isinstance(prefix, (bytes, bytearray, memoryview)):
            raise TypeError(f"handshake REPLY must be bytes, not {type(prefix).__name__}")
        if MAGIC.startswith(bytes(prefix[:len(MAGIC)])):
            return None
        self.status = Status.MALFORMED
        self.error = ProtocolError("not a distexec peer (bad magic)")
        return _VERDICT.pack(Status.MALFORMED, _NO_MAC)

    def receive_reply(self, data: bytes) -> bytes:
        """Checks the initiator's REPLY and returns the VERDICT to send back.

        Args:
            data: the bytes read from the peer; must be exactly ``REPLY_SIZE`` long.

        Returns:
            The VERDICT bytes. On success :attr:`done` is True and :attr:`error` None; on failure
            :attr:`error` is set and the VERDICT carries the reject status and no MAC.

        Raises:
            InvalidStateError: a REPLY was already processed.
            TypeError: ``data`` is not bytes-like.
        """
        if self.status is not None:
            raise InvalidStateError("handshake already answered a REPLY", "finished")
        status, error, n_c = self._check_reply(data)
        self.status, self.error = status, error
        if status is not Status.OK:
            return _VERDICT.pack(status, _NO_MAC)
        self.done = True
        self._session_key = derive_session_key(self._secret, self._nonce, n_c)
        return _VERDICT.pack(Status.OK, _mac(self._secret, _SERVER_LABEL, self._nonce, n_c))

    def _check_reply(self, data) -> tuple[Status, Exception | None, bytes]:
        """Returns (status, error, N_c) for a REPLY, in the order cheapest check first."""
        try:
            data = _as_bytes(data, REPLY_SIZE, "handshake REPLY")
        except ProtocolError as e:
            return Status.MALFORMED, e, b""
        magic, peer_version, n_c, peer_mac = _REPLY.unpack(data)
        if magic != MAGIC:
            return Status.MALFORMED, ProtocolError("not a distexec peer (bad magic)"), b""
        self.peer_version = peer_version
        # The version comes before the MAC: another version may compute its MAC differently.
        if peer_version != self.version:
            return Status.VERSION_MISMATCH, _version_error(peer_version, self.version), b""
        expected = _mac(self._secret, _CLIENT_LABEL, self._nonce, n_c)
        if not hmac.compare_digest(peer_mac, expected):
            error = AuthenticationError("invalid connection credentials sent by remote")
            return Status.BAD_CREDENTIALS, error, b""
        return Status.OK, None, n_c


class ClientHandshake(_Handshake):
    """The initiator's side: answers the HELLO with a REPLY, then checks the VERDICT.

    Raises on every failure, since the initiator is the side that reports to the user.

    Attributes:
        done: True once the acceptor accepted us and proved it knows the secret.
        peer_version: the protocol version the acceptor announced in its HELLO.
        pending_error: a version mismatch seen in the HELLO, raised by :meth:`receive_verdict`.
    """

    def __init__(
        self, secret: bytes, *, version: int = PROTOCOL_VERSION, nonce: bytes | None = None
    ):
        """Creates the initiator's state.

        Args:
            secret: the cluster secret ``K``.
            version: the protocol version to announce (tests use other values).
            nonce: ``N_c``; a fresh ``os.urandom`` nonce unless given (deterministic tests).
        """
        super().__init__(secret, version, nonce)
        self.pending_error: ProtocolError | None = None
        self._peer_nonce: bytes | None = None
        self._finished = False

    def receive_hello(self, data: bytes) -> bytes:
        """Checks the acceptor's HELLO and returns the REPLY to send.

        A version mismatch still yields a REPLY, so that the acceptor learns of it too; the
        mismatch is kept in :attr:`pending_error` and raised by :meth:`receive_verdict`.

        Args:
            data: the bytes read from the peer; must be exactly ``HELLO_SIZE`` long.

        Returns:
            The REPLY bytes.

        Raises:
            ProtocolError: wrong length or bad magic; there is nothing to send.
            AuthenticationError: the acceptor requires TLS (it sent ``TLS_HELLO``).
            InvalidStateError: a HELLO was already processed.
            TypeError: ``data`` is not bytes-like.
        """
        if self._peer_nonce is not None or self._finished:
            raise InvalidStateError("handshake already received a HELLO", "replied")
        try:
            data = _as_bytes(data, HELLO_SIZE, "handshake HELLO")
            magic, peer_version, n_s = _HELLO.unpack(data)
            if magic != MAGIC:
                raise ProtocolError("not a distexec peer (bad magic)")
            if data == TLS_HELLO:
                raise AuthenticationError("peer requires TLS, and this process has no TLS "
                                          "certificates (pass security=... to addprocs)")
        except (ProtocolError, AuthenticationError):
            self._finished = True
            raise
        self.peer_version = peer_version
        if peer_version != self.version:
            self.pending_error = _version_error(peer_version, self.version)
        self._peer_nonce = n_s
        mac = _mac(self._secret, _CLIENT_LABEL, n_s, self._nonce)
        return _REPLY.pack(MAGIC, self.version, self._nonce, mac)

    def receive_verdict(self, data: bytes) -> None:
        """Checks the acceptor's VERDICT; returns only if both sides are authenticated.

        Args:
            data: the bytes read from the peer; must be exactly ``VERDICT_SIZE`` long.

        Raises:
            AuthenticationError: the acceptor rejected our MAC, or failed to prove it knows the
                secret.
            ProtocolError: wrong length, version mismatch, a malformed exchange or unknown status.
            InvalidStateError: called before :meth:`receive_hello` or twice.
            TypeError: ``data`` is not bytes-like.
        """
        if self._peer_nonce is None or self._finished:
            raise InvalidStateError("handshake is not waiting for a VERDICT", "not-waiting")
        self._finished = True
        data = _as_bytes(data, VERDICT_SIZE, "handshake VERDICT")
        if self.pending_error is not None:
            # The version mismatch is the root cause whatever the acceptor answered.
            raise self.pending_error
        status, server_mac = _VERDICT.unpack(data)
        if status != Status.OK:
            raise self._reject_error(status)
        expected = _mac(self._secret, _SERVER_LABEL, self._peer_nonce, self._nonce)
        if not hmac.compare_digest(server_mac, expected):
            raise AuthenticationError("peer failed to prove it knows the cluster cookie")
        self.done = True
        self._session_key = derive_session_key(self._secret, self._peer_nonce, self._nonce)

    def _reject_error(self, status: int) -> Exception:
        """Maps a non-OK status byte to the exception the initiator raises."""
        if status == Status.BAD_CREDENTIALS:
            return AuthenticationError("peer rejected our credentials (wrong cluster cookie?)")
        if status == Status.VERSION_MISMATCH:
            return ProtocolError(
                f"peer rejected our protocol version (peer protocol {self.peer_version}, "
                f"local {self.version})"
            )
        if status == Status.MALFORMED:
            return ProtocolError("peer reported our handshake REPLY as malformed")
        return ProtocolError(f"unknown handshake verdict status {status}")
