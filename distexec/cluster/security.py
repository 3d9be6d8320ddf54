"""The cluster's TLS policy: which ``Security`` new workers get, and how they get it.

Owns the ``security=`` keyword of ``addprocs`` (``resolve``: inherited while workers exist,
refused when it cannot talk to them, ``require_encryption`` enforced), what a launcher hands a
worker (``worker_flags`` on its command line; ``worker_stdin``: the cookie line, then with TLS
the certificate line, so nothing secret is on a command line, in the environment or in a
file), the worker's side of reading it (``read_tls_line``), and the ``SecurityWarning``
for workers that listen beyond loopback without TLS (``warn_if_exposed``). Imports
``distexec.errors``, ``distexec.transport`` and ``distexec.runtime``.

    addprocs(security=S) ──► resolve ──► ctx.security ──► params["security"] ──► manager.launch
        launcher ──► argv: distexec worker ... --tls       stdin: cookie \\n  S.stdin_line()
        master ──► connect ──► TLS (client context of S) ──► cookie challenge inside TLS
    after the join ──► a worker bound beyond loopback, no TLS, no ssh tunnel ──► SecurityWarning
"""

from __future__ import annotations

import ipaddress
import warnings

from ..errors import DistributedError, SecurityWarning
from ..runtime.context import ClusterContext
from ..transport.tls import Security

TLS_FLAG = "--tls"
"""The worker option saying that the TLS line follows the cookie line on stdin."""


def resolve(ctx: ClusterContext, given) -> Security | None:
    """The ``Security`` of the workers an ``addprocs`` is about to add; records it in ``ctx``.

    Without ``security=``, new workers join the existing workers' configuration (a master that
    required encryption keeps its ``Security`` even after its last worker left). With one, it
    must trust the same CA as the workers already there.

    Raises:
        TypeError: ``given`` is not a :class:`~distexec.Security`.
        ValueError: ``require_encryption=True`` without certificates.
        DistributedError: plaintext where encryption is required, or a configuration the
            existing workers cannot talk to.
    """
    if given is not None and not isinstance(given, Security):
        raise TypeError(f"security must be a distexec.Security, not {type(given).__name__}")
    current = ctx.security
    has_workers = any(pid != 1 for pid in ctx.live_pids())
    if given is None:
        keep = current is not None and (has_workers or current.require_encryption)
        chosen = current if keep else None
    else:
        chosen = given
    if chosen is not None and chosen.require_encryption and not chosen.tls:
        raise ValueError("Security(require_encryption=True) needs TLS certificates: pass "
                         "tls_ca_file, tls_cert and tls_key, or use "
                         "Security.temporary(require_encryption=True)")
    if current is not None and current.require_encryption and not (
            chosen is not None and chosen.tls and chosen.require_encryption):
        raise DistributedError("this master requires encryption (require_encryption=True): "
                               "workers without TLS are refused; pass a Security with "
                               "certificates and require_encryption=True")
    if has_workers and not _compatible(current, chosen):
        raise DistributedError("the cluster's workers use another TLS configuration (another "
                               "CA, or none); new workers could not connect to them")
    ctx.security = chosen
    return chosen


def _compatible(current: Security | None, chosen: Security | None) -> bool:
    if current is None or not current.tls:
        return chosen is None or not chosen.tls
    return chosen is not None and current.same_ca(chosen)


def uses_tls(security) -> bool:
    return security is not None and security.tls


def worker_flags(security) -> list[str]:
    """Options for ``distexec worker`` (``["--tls"]`` with TLS)."""
    return [TLS_FLAG] if uses_tls(security) else []


def worker_stdin(cookie, security) -> bytes:
    """What a launcher writes to a worker's stdin: the cookie line, then the TLS line."""
    data = str(cookie).encode() + b"\n"
    if uses_tls(security):
        data += security.stdin_line()
    return data


def read_tls_line(stream) -> Security:
    """The worker's side: the TLS line that follows the cookie line on its stdin.

    Raises:
        ValueError: the line is missing or malformed (the message never quotes it).
    """
    return Security.from_stdin_line(stream.readline())


# --------------------------------------------------------------------------------------------
# the warning
# --------------------------------------------------------------------------------------------
def warn_if_exposed(ctx: ClusterContext, pids, security, stacklevel: int = 4) -> None:
    """Warn once when new workers listen beyond loopback and their links are not encrypted.

    Not for ssh-tunnelled workers (``tunnel=True``): the master's links go through ssh.
    """
    if uses_tls(security):
        return
    exposed = {}
    for pid in pids:
        record = ctx.record(pid)
        config = getattr(record, "config", None)
        if record is None or getattr(config, "tunnel", False):
            continue
        host = getattr(config, "bind_addr", None) or (record.connect_at or (None,))[0]
        if host and not is_loopback(host):
            exposed[pid] = host
    if exposed:
        where = ", ".join(sorted(set(exposed.values())))
        warnings.warn(f"workers {sorted(exposed)} listen on {where}, beyond loopback, without "
                      "TLS: connections are authenticated by the cookie but not encrypted; "
                      "pass security=distexec.Security(...) (see docs/security.md)",
                      SecurityWarning, stacklevel=stacklevel)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (``0.0.0.0`` and names other than localhost
    are not)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False
