"""The cluster secret (cookie): generated from ``secrets``, never shown, never pickled.

Owns the cookie's type and its validation. Imports nothing from distexec but ``errors``.
The cookie only ever keys HMACs; it reaches workers on their stdin and never crosses a
cluster connection.
"""

from __future__ import annotations

import hmac
import secrets
import string

MIN_LENGTH = 16
MAX_LENGTH = 256
_ALLOWED = set(string.ascii_letters + string.digits + string.punctuation)


class ClusterSecret(str):
    """A cookie string whose ``repr`` is redacted and which refuses to be pickled."""

    def __repr__(self) -> str:
        return "ClusterSecret('<redacted>')"

    def __reduce__(self):
        raise TypeError("the cluster cookie cannot be pickled")

    def __reduce_ex__(self, protocol):
        raise TypeError("the cluster cookie cannot be pickled")

    @property
    def key(self) -> bytes:
        """The HMAC key: the cookie's bytes."""
        return self.encode("ascii")


def same(a: str, b: str) -> bool:
    """Whether two cookies are equal, compared in constant time (as every secret is)."""
    return hmac.compare_digest(a.encode("ascii"), b.encode("ascii"))


def generate() -> ClusterSecret:
    """A fresh 256-bit cookie (64 hex characters)."""
    return ClusterSecret(secrets.token_hex(32))


def validate(cookie: str) -> ClusterSecret:
    """Check a user-chosen cookie: printable ASCII without spaces, 16 to 256 characters.

    Julia pads short cookies with spaces; distexec refuses them instead, because a short
    cookie is a weak key (spec/faults.md §1.2).
    """
    if not isinstance(cookie, str):
        raise TypeError(f"cookie must be a str, not {type(cookie).__name__}")
    if not MIN_LENGTH <= len(cookie) <= MAX_LENGTH:
        raise ValueError(f"cookie must have {MIN_LENGTH} to {MAX_LENGTH} characters")
    if not set(cookie) <= _ALLOWED:
        raise ValueError("cookie must be printable ASCII without whitespace")
    return ClusterSecret(cookie)
