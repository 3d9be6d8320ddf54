"""SSH machine specs and command lines: the pure part of SSHManager (no processes, no I/O).

Owns the machine-spec grammar (``[user@]host[:port] [bind_addr[:bind_port]]``, counts and
their merging), the remote worker command for POSIX shells and csh, the forwarded
environment, and the ``ssh`` command line. Imports ``distexec.transport`` (bind-address
parsing) and ``cluster.security`` (the worker's TLS flag). Julia: ``parse_machine``,
``SSHManager``'s constructor, ``launch_on_machine``.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Iterable, Sequence

from ..transport import sockets
from .security import worker_flags
from .thread_limits import HOST_WORKERS_ENV, LIMITED_ENV

SHELLS = ("posix", "csh")
CONNECT_TIMEOUT = 10
"""Seconds ``ssh`` may take to reach a host (``ConnectTimeout``); sshflags can override it."""
KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT = 3
"""ssh declares a host lost after ``KEEPALIVE_COUNT`` unanswered keepalives sent every
``KEEPALIVE_INTERVAL`` s (``ServerAlive*``; sshflags can override both)."""
_ENV_KEY = re.compile(r"^[a-zA-Z_][a-zA-Z_0-9]*\Z")


# --------------------------------------------------------------------------------------------
# machine specs
# --------------------------------------------------------------------------------------------
def parse_machine(spec: str) -> tuple[str, int | None]:
    """Split ``[user@]host[:port]`` into ``(host, port or None)``; IPv6 hosts in brackets.

    The returned host keeps its ``user@`` prefix (it is what ssh is given).

    Raises:
        ValueError: an unterminated bracket, more than one port separator, a port that is not
            an integer or is outside 1..65535, or an empty host.

    Julia: ``parse_machine`` (which raises ``ArgumentError``).
    """
    user, at, rest = spec.rpartition("@") if "@" in spec else ("", "", spec)
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0:
            raise ValueError(f"invalid machine definition format string: unterminated '[' "
                             f"in {spec!r}")
        host, tail = rest[1:end], rest[end + 1:]
        if tail and not tail.startswith(":"):
            raise ValueError(f"invalid machine definition format string: {spec!r}")
        parts = [host] + (tail[1:].split(":") if tail else [])
    else:
        parts = rest.split(":")
        host = parts[0]
    if len(parts) > 2:
        raise ValueError(f"invalid machine definition format string: invalid port format "
                         f"{spec!r}")
    if not host:
        raise ValueError(f"invalid machine definition format string: no host in {spec!r}")
    port = None
    if len(parts) == 2:
        if not re.fullmatch(r"\d+", parts[1]):
            raise ValueError(f"invalid machine definition format string: invalid port format "
                             f"{spec!r}")
        port = int(parts[1])
        if not 1 <= port <= 65535:
            raise ValueError(f"invalid machine definition format string: invalid port number "
                             f"{spec!r}")
    return user + at + host, port


def split_machine(spec: str) -> tuple[str, int | None, str | None]:
    """``"[user@]host[:port] [bind_addr[:bind_port]]"`` → ``(host, ssh_port, bind_to)``."""
    tokens = spec.split()
    if not 1 <= len(tokens) <= 2:
        raise ValueError(f"invalid machine definition format string: {spec!r} (expected "
                         "'[user@]host[:port] [bind_addr[:bind_port]]')")
    host, port = parse_machine(tokens[0])
    bind_to = tokens[1] if len(tokens) == 2 else None
    if bind_to is not None:
        sockets.parse_bind_to(bind_to)  # a malformed bind address fails here, not remotely
    return host, port, bind_to


def merge_machines(machines: Iterable) -> dict[str, int | str]:
    """Machine entries → ``{spec: count}``: integer counts add up, ``"auto"`` replaces.

    Julia: the ``SSHManager`` constructor.
    """
    if isinstance(machines, (str, bytes)):
        raise TypeError("machines must be a list of machine specs, not one string")
    merged: dict[str, int | str] = {}
    for entry in machines:
        spec, count = (entry, 1) if isinstance(entry, str) else _spec_and_count(entry)
        split_machine(spec)
        spec = " ".join(spec.split())
        current = merged.get(spec, 0)
        if isinstance(count, str):  # "auto", the only string _spec_and_count returns
            merged[spec] = "auto"
        else:
            merged[spec] = current + count if isinstance(current, int) else count
    return merged


def _spec_and_count(entry) -> tuple[str, int | str]:
    try:
        spec, count = entry
    except (TypeError, ValueError):
        raise TypeError(f"a machine is 'host' or ('host', count), not {entry!r}") from None
    if not isinstance(spec, str):
        raise TypeError(f"a machine spec is a string, not {spec!r}")
    if count == "auto" or getattr(count, "name", None) == "auto":
        return spec, "auto"
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"a machine's count is a positive int or 'auto', not {count!r}")
    return spec, count


# --------------------------------------------------------------------------------------------
# command lines
# --------------------------------------------------------------------------------------------
def words(value) -> list[str]:
    """A command or flags given as one string (one word) or a sequence of words."""
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [os.fspath(value)]
    return [os.fspath(v) for v in value]


def remote_environment(params: dict, host_workers: int | str = 1) -> dict[str, str]:
    """Variables the remote worker gets: the master's ``DISTEXEC_*``, the number of workers
    on its host (``host_workers``, a machine's count), then ``env``.

    The host's cores are known only there: the worker sets the thread limits of numeric
    libraries itself, at start, to its share of them (``thread_limits``); not with
    ``enable_threaded_blas``.

    Raises:
        ValueError: ``invalid env key``, for a name a shell cannot export.
    """
    env = {k: v for k, v in os.environ.items() if k.startswith("DISTEXEC_") and _ENV_KEY.match(k)}
    env.pop(HOST_WORKERS_ENV, None)
    env.pop(LIMITED_ENV, None)  # this process's limits, which the host does not share
    env["PYTHONUNBUFFERED"] = "1"  # the worker's prints reach the master as they happen
    if not params.get("enable_threaded_blas"):
        env[HOST_WORKERS_ENV] = str(host_workers)
    user_env = params.get("env") or {}
    for key, value in (user_env.items() if isinstance(user_env, dict) else user_env):
        if not isinstance(key, str) or not _ENV_KEY.match(key):
            raise ValueError(f"invalid env key {key!r}")
        env[key] = str(value)
    return env


def worker_argv(params: dict, bind_to: str | None) -> list[str]:
    """``EXENAME EXEFLAGS -m distexec worker --die-with-stdin --separate-stderr [--tls]
    [--bind-to B]``: ssh carries the worker's stderr apart, and the master relays it to its
    own stderr."""
    argv = [*words(params["exename"]), *words(params.get("exeflags")),
            "-m", "distexec", "worker", "--die-with-stdin", "--separate-stderr",
            *worker_flags(params.get("security"))]
    return argv + (["--bind-to", bind_to] if bind_to else [])


def remote_command(params: dict, bind_to: str | None, host_workers: int | str = 1) -> str:
    """The command ssh runs on the remote host, fully quoted for its ``shell``.

    Without a bind address the worker binds the address the ssh connection arrived on
    (``$SSH_CONNECTION``'s third field): the one interface the master is known to reach.
    ``host_workers`` is the host's count of workers (``remote_environment``).
    """
    shell = params.get("shell", "posix")
    env = remote_environment(params, host_workers)
    argv = worker_argv(params, bind_to)
    if shell == "posix":
        steps = [f"cd -- {shlex.quote(str(params['dir']))}"]
        steps += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
        exec_line = "exec " + shlex.join(argv)
        if bind_to is None:
            steps.append('set -- $SSH_CONNECTION "" "" ""')
            steps.append('case $3 in *:*) b="[$3]" ;; *) b=$3 ;; esac')
            exec_line += ' --bind-to "$b"'
        return "sh -l -c " + shlex.quote(" && ".join(steps + [exec_line]))
    if shell == "csh":
        lines = [f"cd {csh_quote(str(params['dir']))}"]
        lines += [f"setenv {k} {csh_quote(v)}" for k, v in env.items()]
        exec_line = "exec " + " ".join(csh_quote(a) for a in argv)
        if bind_to is None:  # an IPv6 server address needs an explicit bind address under csh
            lines.append("set dx_c = ($SSH_CONNECTION)")
            exec_line += " --bind-to $dx_c[3]"
        return "\n".join(lines + [exec_line])
    raise ValueError(f"invalid shell {shell!r} (expected one of {SHELLS})")


def csh_quote(text: str) -> str:
    """Quote for (t)csh: single quotes, and ``!`` and newlines escaped (Julia: shell_escape_csh)."""
    out = text.replace("'", "'\\''").replace("!", "'\\!'").replace("\n", "'\\\n'")
    return f"'{out}'"


def ssh_command(params: dict, host: str, port: int | None, remote: str | None,
                extra: Sequence[str] = ()) -> list[str]:
    """``ssh SSHFLAGS -T -a -x -o ... [EXTRA] [-p PORT] HOST [REMOTE]``.

    The user's sshflags come first: ssh keeps the first value it sees for an option, so they
    override the defaults that follow.
    """
    cmd = [*words(params.get("ssh", "ssh")), *words(params.get("sshflags")),
           "-T", "-a", "-x", "-o", "ClearAllForwardings=yes", "-o", "BatchMode=yes",
           "-o", f"ConnectTimeout={CONNECT_TIMEOUT}",
           "-o", f"ServerAliveInterval={KEEPALIVE_INTERVAL}",
           "-o", f"ServerAliveCountMax={KEEPALIVE_COUNT}", *extra]
    if port is not None:
        cmd += ["-p", str(port)]
    return cmd + [host] + ([remote] if remote is not None else [])


def bracketed(addr: str) -> str:
    return f"[{addr}]" if ":" in addr else addr


def bind_hint(bind_to: str | None, first_bind_addr: str) -> str:
    """The extra workers' ``--bind-to``: a fixed port becomes a hint so they do not collide."""
    if bind_to is None:
        return bracketed(first_bind_addr)
    host, port, _hint = sockets.parse_bind_to(bind_to)
    return bracketed(host) + (f":[{port}]" if port else "")
