"""``distexec.Security``: loading certificates, the contexts it builds, and keeping the key hidden.

No processes and no sockets: the TLS handshakes themselves run in tests/faults/test_tls.py.
"""

from __future__ import annotations

import copy
import pickle
import ssl
import sys

import pytest

from distexec import AuthenticationError, ProtocolError, Security
from distexec.cluster.security import is_loopback, worker_flags, worker_stdin
from distexec.protocol import handshake
from distexec.transport.tls import _temporary_material

pytestmark = pytest.mark.timeout(30)

CA, CERT, KEY = _temporary_material()
KEY_BODY = KEY.splitlines()[1]  # a line of the key's base64: must never show


@pytest.fixture
def pem_files(tmp_path):
    paths = {}
    for name, text in (("ca.pem", CA), ("cert.pem", CERT), ("key.pem", KEY)):
        path = tmp_path / name
        path.write_text(text)
        paths[name] = path
    return paths["ca.pem"], paths["cert.pem"], paths["key.pem"]


# --------------------------------------------------------------------------------------------
# the contexts: TLS >= 1.2, certificates required both ways, no host names
# --------------------------------------------------------------------------------------------
def test_temporary_makes_contexts_that_require_certificates_on_both_sides():
    security = Security.temporary()
    assert security.tls and not security.require_encryption
    server, client = security.server_context(), security.client_context()
    assert server.verify_mode == client.verify_mode == ssl.CERT_REQUIRED
    assert client.check_hostname is False
    assert server.minimum_version == client.minimum_version == ssl.TLSVersion.TLSv1_2
    assert not security.same_ca(Security.temporary())  # a throwaway CA per call


def test_without_certificates_there_is_no_tls():
    security = Security()
    assert not security.tls
    with pytest.raises(ValueError, match="no TLS context"):
        security.client_context()
    assert worker_flags(security) == [] and worker_stdin("c" * 32, security) == b"c" * 32 + b"\n"


# --------------------------------------------------------------------------------------------
# PEM text or files
# --------------------------------------------------------------------------------------------
def test_pem_text_files_paths_and_bytes_are_equivalent(pem_files):
    ca, cert, key = pem_files
    variants = [Security(CA, CERT, KEY), Security(str(ca), str(cert), str(key)),
                Security(ca, cert, key), Security(CA.encode(), CERT.encode(), KEY.encode())]
    for security in variants:
        assert security.tls and security.same_ca(variants[0])


def test_the_key_may_come_inside_the_certificate_file(tmp_path):
    combined = tmp_path / "both.pem"
    combined.write_text(CERT + KEY)
    assert Security(CA, combined).tls


@pytest.mark.parametrize(("arguments", "message"), [
    ((CA, None, None), "needs tls_ca_file and tls_cert"),
    ((None, CERT, KEY), "needs tls_ca_file and tls_cert"),
    ((None, None, KEY), "needs tls_ca_file and tls_cert"),
    ((CA, "/nonexistent/cert.pem", KEY), "cannot read tls_cert '/nonexistent/cert.pem'"),
    ((CA, CERT, 42), "tls_key must be a file path or PEM text"),
    ((CA, CERT, _temporary_material()[2]), "does the key match the certificate"),
    ((CERT.replace("CERTIFICATE", "GARBAGE"), CERT, KEY), "tls_ca_file could not be loaded"),
], ids=["ca-only", "no-ca", "key-only", "missing-file", "not-a-path", "wrong-key", "bad-ca"])
def test_bad_material_is_a_clear_error(arguments, message):
    with pytest.raises(ValueError, match=message):
        Security(*arguments)


def test_a_file_without_pem_is_a_clear_error(tmp_path):
    empty = tmp_path / "cert.pem"
    empty.write_text("not a certificate\n")
    with pytest.raises(ValueError, match=f"tls_cert '{empty}' holds no PEM data"):
        Security(CA, empty, KEY)


def test_temporary_without_cryptography_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "cryptography", None)
    with pytest.raises(ImportError, match=r"pip install 'distexec\[tls\]'"):
        Security.temporary()


# --------------------------------------------------------------------------------------------
# the key stays hidden
# --------------------------------------------------------------------------------------------
def test_repr_shows_sources_never_material(pem_files):
    ca, cert, key = pem_files
    from_files = repr(Security(ca, cert, key, require_encryption=True))
    assert from_files == (f"Security(tls_ca_file={str(ca)!r}, tls_cert={str(cert)!r}, "
                          "tls_key=<redacted>, require_encryption=True)")
    for security in (Security(CA, CERT, KEY), Security.temporary()):
        text = repr(security) + str(security)
        assert "BEGIN" not in text and KEY_BODY not in text
        assert "tls_key=<redacted>" in text


def test_a_security_cannot_be_pickled_and_copies_are_itself():
    security = Security(CA, CERT, KEY)
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        with pytest.raises(TypeError, match="cannot be pickled"):
            pickle.dumps(security, protocol)
    assert copy.copy(security) is security and copy.deepcopy(security) is security


def test_the_stdin_line_round_trips_and_a_bad_one_is_not_quoted():
    security = Security(CA, CERT, KEY, require_encryption=True)
    line = worker_stdin("k" * 32, security)
    cookie, tls_line = line.split(b"\n", 1)
    assert cookie == b"k" * 32 and tls_line.count(b"\n") == 1
    again = Security.from_stdin_line(tls_line)
    assert again.same_ca(security) and again.require_encryption and again.tls
    assert "<stdin>" in repr(again) and KEY_BODY not in repr(again)
    assert worker_flags(security) == ["--tls"]
    damaged = tls_line[:-40] + b"\n"
    with pytest.raises(ValueError, match="malformed TLS material") as info:
        Security.from_stdin_line(damaged)
    assert KEY_BODY not in str(info.value) and info.value.__cause__ is None
    with pytest.raises(ValueError, match="malformed TLS material"):
        Security.from_stdin_line(b"")


# --------------------------------------------------------------------------------------------
# the plaintext banner of a TLS acceptor (protocol/handshake.py)
# --------------------------------------------------------------------------------------------
def test_a_plaintext_initiator_recognizes_a_tls_acceptor():
    client = handshake.ClientHandshake(b"k" * 32)
    with pytest.raises(AuthenticationError, match="peer requires TLS"):
        client.receive_hello(handshake.TLS_HELLO)


def test_a_tls_initiator_recognizes_a_plaintext_acceptor_or_a_stranger():
    handshake.check_tls_hello(handshake.TLS_HELLO)
    with pytest.raises(AuthenticationError, match="does not use TLS"):
        handshake.check_tls_hello(handshake.ServerHandshake(b"k" * 32).hello())
    with pytest.raises(ProtocolError, match="bad magic"):
        handshake.check_tls_hello(b"\x16\x03\x01" + bytes(handshake.HELLO_SIZE - 3))
    with pytest.raises(ProtocolError, match="must be 42 bytes"):
        handshake.check_tls_hello(handshake.TLS_HELLO[:-1])


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.3.2.1", True), ("::1", True), ("[::1]", True),
    ("localhost", True), ("0.0.0.0", False), ("::", False), ("10.213.1.2", False),
    ("node7", False),
])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback
