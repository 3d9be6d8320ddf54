"""TLS for cluster connections: the ``Security`` settings and a full-duplex TLS channel.

Owns the certificates a cluster uses (:class:`Security`: a private CA, one certificate and its
key, and ``require_encryption``), the ``ssl.SSLContext`` each side builds from them, the
throwaway CA of :meth:`Security.temporary` (needs the optional ``cryptography`` package), the
one line of stdin that carries the material to a worker, and :class:`TLSChannel`, which lets
one reader thread and one writer thread share a TLS connection. Imports nothing from distexec.
``ssl`` is imported when certificates are given (it and OpenSSL take several milliseconds to
load, in every process and every worker, and a plaintext cluster never needs them); until
then nothing can raise its errors, which :func:`ssl_error` stands for in ``except`` clauses.

Policy (the dask one, spec/faults.md "TLS"): TLS 1.2 or later, a certificate required and
checked against the private CA on *both* sides, no host-name check (peers are IP addresses;
only the CA vouches for them), no renegotiation, no session tickets (links live long).

Why a channel. OpenSSL forbids using one ``SSL`` object from two threads at once, and a
blocking ``ssl.SSLSocket`` calls ``SSL_read`` and ``SSL_write`` with the GIL released, so a
reader blocked in ``recv_into`` while another thread sends is undefined behaviour (CPython
issue 76714; OpenSSL issues 20446, 20622). asyncio avoids it with one thread per connection;
distexec keeps its reader thread and makes the socket non-blocking instead, so that every
OpenSSL call runs under one lock and never waits for the network while holding it::

    reader thread ──► recv_into ──► [io lock] SSL_read ──► data, or "want read"
                                      └─ want read ──► poll(POLLIN), lock released ──► again
    sender (Connection's send lock) ──► sendmsg(parts) ──► small parts joined into one record
                  ──► [io lock] SSL_write(chunk) ──► "want write" ──► poll(POLLOUT) ──► same chunk
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import sys
import threading
from typing import TYPE_CHECKING, TypeGuard, cast

if TYPE_CHECKING:
    import ssl

__all__ = ["Security", "TLSChannel", "ssl_error", "is_tls_socket"]

_PEM_MARK = "-----BEGIN "
_CHUNK = 256 * 1024        # plaintext per SSL_write: bounds how long the reader waits for the lock
_JOIN_BELOW = 64 * 1024    # parts smaller than this are joined, so a small message is one record
_WANT_POLL_MS = 50         # a writer told "want read" (renegotiation) polls in short steps


class _NotRaised(Exception):
    """What :func:`ssl_error` gives while ``ssl`` is not imported: nothing raises it."""


def ssl_error() -> type[ssl.SSLError]:
    """``ssl.SSLError`` for an ``except`` clause, without importing ``ssl`` for it: while
    ``ssl`` is not imported, no TLS socket exists and no SSL error can come."""
    module = sys.modules.get("ssl")
    return module.SSLError if module is not None else cast("type[ssl.SSLError]", _NotRaised)


def is_tls_socket(sock: object) -> TypeGuard[ssl.SSLSocket]:
    """Whether ``sock`` is an ``ssl.SSLSocket`` (without importing ``ssl`` to ask)."""
    module = sys.modules.get("ssl")
    return module is not None and isinstance(sock, module.SSLSocket)


# ============================================================================================
# Security: the material and the contexts
# ============================================================================================
class Security:
    """TLS settings of a cluster: a private CA, a certificate signed by it, and its key.

    Every connection of the cluster (master to worker, worker to worker) then runs TLS first,
    with the peer's certificate checked against the CA on both sides, and the cookie
    challenge inside it. Each argument is a file path or the PEM text itself; files are read
    at once. ``tls_key`` may be left out when ``tls_cert`` holds the key too.
    ``Security()`` (no certificates) means plaintext; with ``require_encryption=True`` the
    master refuses to add workers without TLS.

    The key never appears in ``repr`` and a ``Security`` cannot be pickled. Workers receive
    the material on their stdin, never on a command line, in the environment or in a file.

    Args:
        tls_ca_file: the CA certificate(s) that peers' certificates must be signed by.
        tls_cert: this cluster's certificate (and chain), used by every process.
        tls_key: the certificate's private key (unencrypted PEM).
        require_encryption: refuse plaintext: adding workers without TLS raises.

    Raises:
        ValueError: only some of the three given, a path that cannot be read, or PEM text
            that ``ssl`` cannot load (with the reason).
    """

    def __init__(self, tls_ca_file: str | bytes | os.PathLike[str] | None = None,
                 tls_cert: str | bytes | os.PathLike[str] | None = None,
                 tls_key: str | bytes | os.PathLike[str] | None = None, *,
                 require_encryption: bool = False) -> None:
        if (tls_ca_file is None) != (tls_cert is None) or (tls_key and tls_cert is None):
            raise ValueError("Security: TLS needs tls_ca_file and tls_cert (and tls_key, unless "
                             "the certificate file also holds the key)")
        self.require_encryption = bool(require_encryption)
        self._sources = {"tls_ca_file": _source(tls_ca_file), "tls_cert": _source(tls_cert),
                         "tls_key": None if tls_key is None else "<redacted>"}
        self._ca = _read_pem("tls_ca_file", tls_ca_file)
        self._cert = _read_pem("tls_cert", tls_cert)
        self._key = _read_pem("tls_key", tls_key)
        self._server: ssl.SSLContext | None = None
        self._client: ssl.SSLContext | None = None
        if self.tls:
            self._server, self._client = _server_context(self), _client_context(self)

    @property
    def tls(self) -> bool:
        """Whether connections use TLS (certificates were given)."""
        return self._ca is not None

    def server_context(self) -> ssl.SSLContext:
        """The context of the accepting side (a worker's listener)."""
        if self._server is None:
            raise ValueError("Security without certificates has no TLS context")
        return self._server

    def client_context(self) -> ssl.SSLContext:
        """The context of the connecting side (the master, a worker opening a peer link)."""
        if self._client is None:
            raise ValueError("Security without certificates has no TLS context")
        return self._client

    def same_ca(self, other: Security | None) -> bool:
        """Whether ``other`` trusts the same CA (its processes can talk to ours)."""
        mine = self._ca if self.tls else None
        theirs = other._ca if other is not None and other.tls else None
        return (mine or "").strip() == (theirs or "").strip()

    @classmethod
    def temporary(cls, *, require_encryption: bool = False) -> Security:
        """A throwaway private CA and one certificate signed by it, valid for a year.

        Made in memory (ECDSA P-256 keys) for this cluster only: nothing is written to disk,
        and nothing outside the cluster can trust or be trusted by it. Needs the optional
        ``cryptography`` package (``pip install 'distexec[tls]'``). Dask: ``Security.temporary()``.

        Raises:
            ImportError: ``cryptography`` is not installed.
        """
        ca, cert, key = _temporary_material()
        made = cls(ca, cert, key, require_encryption=require_encryption)
        made._sources = {"tls_ca_file": "<temporary>", "tls_cert": "<temporary>",
                         "tls_key": "<redacted>"}
        return made

    # -- handing it to a worker (stdin) --------------------------------------------------------
    def stdin_line(self) -> bytes:
        """The line a launcher writes to a worker's stdin after the cookie (holds the key)."""
        if not self.tls:
            raise ValueError("Security without certificates has nothing to send")
        material = {"ca": self._ca, "cert": self._cert, "key": self._key,
                    "require_encryption": self.require_encryption}
        return json.dumps(material).encode("ascii") + b"\n"

    @classmethod
    def from_stdin_line(cls, line: bytes | str) -> Security:
        """The ``Security`` a worker rebuilds from :meth:`stdin_line`.

        Raises:
            ValueError: the line is empty or not what :meth:`stdin_line` writes (the message
                never quotes the line: it holds a key).
        """
        try:
            material = json.loads(line)
            made = cls(material["ca"], material["cert"], material["key"],
                       require_encryption=bool(material.get("require_encryption")))
        except (ValueError, TypeError, KeyError):
            raise ValueError("malformed TLS material on stdin (expected the line "
                             "Security.stdin_line() writes after the cookie)") from None
        made._sources = {"tls_ca_file": "<stdin>", "tls_cert": "<stdin>",
                         "tls_key": "<redacted>"}
        return made

    # -- never shown, never pickled ----------------------------------------------------------
    def __repr__(self) -> str:
        shown = {name: value if value is None or value.startswith("<") else repr(value)
                 for name, value in self._sources.items()}  # paths quoted, placeholders bare
        fields = "".join(f"{name}={value}, " for name, value in shown.items())
        return f"Security({fields}require_encryption={self.require_encryption})"

    def __reduce_ex__(self, protocol):
        raise TypeError("a Security holds a private key and cannot be pickled; workers get "
                        "it on their stdin")

    def __reduce__(self):
        return self.__reduce_ex__(2)

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


def _source(value) -> str | None:
    """What ``repr`` shows for an argument: its path, ``<PEM>`` for text, None."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    text = os.fspath(value) if isinstance(value, os.PathLike) else str(value)
    return "<PEM>" if _PEM_MARK in text else text


def _read_pem(name: str, value) -> str | None:
    """PEM text from PEM text (str or bytes) or from a file path."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if isinstance(value, str) and _PEM_MARK in value:
        return value
    if not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"Security: {name} must be a file path or PEM text, "
                         f"not {type(value).__name__}")
    path = os.fspath(value)
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError as exc:
        raise ValueError(f"Security: cannot read {name} {path!r}: "
                         f"{exc.strerror or exc}") from None
    if _PEM_MARK not in text:
        raise ValueError(f"Security: {name} {path!r} holds no PEM data")
    return text


def _base_context(protocol: int) -> ssl.SSLContext:
    import ssl

    context = ssl.SSLContext(protocol)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    return context


def _server_context(security: Security) -> ssl.SSLContext:
    import ssl

    context = _base_context(ssl.PROTOCOL_TLS_SERVER)
    context.num_tickets = 0  # no resumption: links are few and long-lived
    _load(context, security)
    context.verify_mode = ssl.CERT_REQUIRED  # the connecting peer must show a CA-signed cert
    return context


def _client_context(security: Security) -> ssl.SSLContext:
    import ssl

    context = _base_context(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # peers are IP addresses; the private CA vouches for them
    context.verify_mode = ssl.CERT_REQUIRED
    _load(context, security)
    return context


def _load(context: ssl.SSLContext, security: Security) -> None:
    import ssl

    try:
        context.load_verify_locations(cadata=security._ca)
    except (ssl.SSLError, ValueError) as exc:
        raise ValueError(f"Security: tls_ca_file could not be loaded: "
                         f"{getattr(exc, 'reason', None) or exc}") from None
    try:
        with _pem_path(security._cert) as cert, _pem_path(security._key) as key:
            context.load_cert_chain(cert, key)
    except (ssl.SSLError, ValueError, OSError) as exc:
        raise ValueError(f"Security: tls_cert/tls_key could not be loaded (does the key match "
                         f"the certificate?): {getattr(exc, 'reason', None) or exc}") from None


@contextlib.contextmanager
def _pem_path(text: str | None):
    """A path ``ssl`` can read ``text`` from, without writing it to disk where possible.

    ``SSLContext.load_cert_chain`` only takes file names. On Linux an anonymous memory file
    (``memfd``) serves; elsewhere a private temporary file, removed at once.
    """
    if text is None:
        yield None
        return
    data = text.encode("ascii", "replace")
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create("distexec-tls", os.MFD_CLOEXEC)
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="distexec-tls-") as directory:
        path = os.path.join(directory, "pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        yield path


def _temporary_material() -> tuple[str, str, str]:
    """(CA certificate, certificate, key) as PEM text, made with ``cryptography``."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError as exc:
        raise ImportError("Security.temporary() needs the optional 'cryptography' package: "
                          "pip install 'distexec[tls]' (or pass your own CA, certificate and "
                          "key to Security(...))") from exc
    import datetime

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=365)

    def name(common: str):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def builder(subject, issuer, public_key):
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
                .public_key(public_key).serial_number(x509.random_serial_number())
                .not_valid_before(start).not_valid_after(end)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("distexec temporary CA")
    ca = (builder(ca_name, ca_name, ca_key.public_key())
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(_key_usage(x509, cert_sign=True), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (builder(name("distexec"), ca_name, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(x509, cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return (ca.public_bytes(pem).decode(), cert.public_bytes(pem).decode(), key_pem.decode())


def _key_usage(x509, *, cert_sign: bool):
    return x509.KeyUsage(digital_signature=not cert_sign, content_commitment=False,
                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                         key_cert_sign=cert_sign, crl_sign=cert_sign, encipher_only=False,
                         decipher_only=False)


# ============================================================================================
# TLSChannel: one reader thread and one writer thread on one TLS connection
# ============================================================================================
class TLSChannel:
    """An authenticated ``ssl.SSLSocket`` made safe for a reader and a writer thread.

    Offers what :class:`~distexec.transport.connection.Connection` uses of a socket
    (``recv_into``, ``sendmsg``, ``sendall``, ``shutdown``, ``close``), all blocking from the
    caller's view. Several writers must still serialize among themselves (the connection's
    send lock does); one reader and one writer may run at once.
    """

    def __init__(self, sock: ssl.SSLSocket):
        import ssl  # (imported already: the socket is one of its)

        # What a non-blocking OpenSSL call raises when it must wait for the socket.
        self._want_read, self._want_write = ssl.SSLWantReadError, ssl.SSLWantWriteError
        self._sock = sock
        self._io = threading.Lock()   # held only around an OpenSSL call, never while waiting
        self._shut = False            # shutdown() or close() was called: no more I/O
        self.family = sock.family
        sock.setblocking(False)
        self._fd = sock.fileno()
        self._read_poll = _poller(self._fd, select.POLLIN)     # the reader's own
        self._write_poll = _poller(self._fd, select.POLLOUT)   # the writer's own

    def __repr__(self) -> str:
        return f"<TLSChannel fd={self._fd} {self.version()}{' shut' if self._shut else ''}>"

    @property
    def ssl_socket(self) -> ssl.SSLSocket:
        """The underlying socket (for ``version()``, ``getpeercert()``; do not read or write)."""
        return self._sock

    def version(self) -> str | None:
        """The negotiated protocol, e.g. ``"TLSv1.3"``."""
        return self._sock.version()

    def fileno(self) -> int:
        return self._fd

    def getpeername(self):
        return self._sock.getpeername()

    def getsockname(self):
        return self._sock.getsockname()

    def setsockopt(self, *args) -> None:
        self._sock.setsockopt(*args)

    def settimeout(self, _timeout) -> None:
        """The channel blocks its callers until done; the socket itself stays non-blocking."""

    # -- reading -------------------------------------------------------------------------------
    def recv_into(self, buffer, nbytes: int = 0) -> int:
        """Read decrypted bytes into ``buffer``; 0 at EOF (or once the channel is shut)."""
        while True:
            with self._io:
                if self._shut:
                    return 0
                try:
                    return self._sock.recv_into(buffer, nbytes)
                except self._want_read:
                    poller = self._read_poll
                except self._want_write:  # a read that must send first (a key update)
                    poller = _poller(self._fd, select.POLLOUT)
            poller.poll()

    def recv(self, n: int) -> bytes:
        buffer = bytearray(n)
        return bytes(buffer[:self.recv_into(memoryview(buffer))])

    # -- writing -------------------------------------------------------------------------------
    def sendall(self, data) -> None:
        self._write(memoryview(data).cast("B"))

    def sendmsg(self, buffers) -> int:
        """Write every buffer, in order; returns the total (never a partial count).

        ``SSLSocket`` has no ``sendmsg``. Small buffers (a frame header and a small payload)
        are joined so that one message is one TLS record; large ones are encrypted straight
        from their memory.
        """
        total, small = 0, []
        for buffer in buffers:
            view = memoryview(buffer).cast("B")
            total += len(view)
            if len(view) < _JOIN_BELOW:
                small.append(view)
                continue
            if small:
                self._write(memoryview(b"".join(small)))
                small = []
            self._write(view)
        if small:
            self._write(memoryview(b"".join(small)) if len(small) > 1 else small[0])
        return total

    def _write(self, view: memoryview) -> None:
        for start in range(0, len(view), _CHUNK):
            chunk = view[start:start + _CHUNK]
            while chunk:
                chunk = self._write_some(chunk)

    def _write_some(self, chunk: memoryview) -> memoryview:
        """One SSL_write attempt; returns what is left (the same chunk after "want write":
        OpenSSL must be called again with the same bytes)."""
        timeout = None
        with self._io:
            if self._shut:
                raise BrokenPipeError("TLS connection is closed")
            try:
                sent = self._sock.send(chunk)
                return chunk[sent:]
            except self._want_write:
                poller = self._write_poll
            except self._want_read:  # the reader thread consumes the input: poll briefly
                poller, timeout = _poller(self._fd, select.POLLIN), _WANT_POLL_MS
        poller.poll(timeout)
        return chunk

    # -- lifetime ------------------------------------------------------------------------------
    def shutdown(self, how: int = socket.SHUT_RDWR) -> None:
        """Stop all I/O; wakes a reader or writer waiting in poll.

        The plain socket's shutdown, not ``SSLSocket.shutdown`` (which drops the TLS state
        under a thread that may be using it).
        """
        self._shut = True
        try:
            socket.socket.shutdown(self._sock, how)
        except OSError:
            pass

    def close(self) -> None:
        with self._io:
            self._shut = True
            self._sock.close()


def _poller(fd: int, events: int):
    poller = select.poll()
    poller.register(fd, events)
    return poller
