"""SSHManager: workers on other machines, started through the system ``ssh`` client (OpenSSH).

Owns the ssh processes: one session per host, ``count > 1`` (the first worker on a host
starts the others), interrupts over ssh, tunnels, and treating a dead ssh session as a lost
worker. Machine specs and command lines are in ``ssh_commands``. Imports the other cluster
modules, ``distexec.runtime`` and ``distexec.errors``. Julia: ``SSHManager``.

    launch ─► per host, in parallel: ssh -T ... host 'sh -l -c "cd DIR && export .. && exec
              PYTHON -m distexec worker --die-with-stdin --bind-to ADDR"' ◄─ cookie on ssh's stdin
           ─► WorkerConfig(io=ssh stdout) ─► connect: address line, TCP (or through ssh -L)
    first worker joined, count > 1 ─► remotecall_fetch(launch_additional) on it ─► it starts
              count-1 workers on its host ─► their addresses ─► more WorkerConfigs, same launch
    ssh exits while its worker still looks alive (link cut, keepalives unanswered)
           ─► the session's worker connections are closed: calls fail, the workers are removed

Lifelines of a remote worker: its master connection, and its stdin, which is ssh's stdin (the
master keeps it open; ``ssh -T`` passes EOF through when the master dies). Workers started by
``launch_additional`` have only the master connection: they outlive the first worker, as
Julia's do.
"""

from __future__ import annotations

import copy
import logging
import socket
import subprocess
import threading
import time
from collections.abc import Iterable
from typing import Any

from ..errors import LaunchWorkerError
from ..runtime.calls import remote_do, remotecall_fetch
from ..runtime.context import DEAD_STATES, WorkerState, current_context
from .console import DEFAULT_PREFIX
from .launch import STDERR_KEY, OutputRelay, read_worker_host_port, worker_timeout
from .manager import ClusterManager, WorkerConfig, default_addprocs_params
from .security import worker_flags, worker_stdin
from .ssh_commands import (
    CONNECT_TIMEOUT,
    SHELLS,
    bind_hint,
    bracketed,
    merge_machines,
    parse_machine,
    remote_command,
    remote_environment,
    split_machine,
    ssh_command,
    words,
)

__all__ = ["SSHManager", "parse_machine", "launch_additional", "start_additional_workers"]

log = logging.getLogger("distexec")

LOST_GRACE = 2.0
"""Seconds a worker's own connection gets to report its exit after its ssh session ended.
With ssh's keepalives (``ssh_commands.KEEPALIVE_*``, 5 s x 3 by default) a cut link fails
the calls to the workers behind it within about 15 s + ``LOST_GRACE`` instead of hanging."""


# --------------------------------------------------------------------------------------------
# the manager
# --------------------------------------------------------------------------------------------
class _Session:
    """One ssh process (one host entry) and the workers reached through it."""

    def __init__(self, ctx, spec: str, count, host: str, port: int | None,
                 bind_to: str | None, params: dict, queue):
        self.ctx, self.spec, self.count = ctx, spec, count
        self.host, self.port, self.bind_to, self.params = host, port, bind_to, params
        self.queue = queue                        # (launched, launch_ntfy) of this addprocs
        self.process: subprocess.Popen | None = None
        self.first_pid: int | None = None
        self.pids: set[int] = set()
        self.closing = False                      # the first worker is being removed on purpose
        self.extra_done = threading.Event()       # count > 1: extra workers queued (or failed)
        self.extra_error: BaseException | None = None
        self.tunnel_slots = threading.Semaphore(max(1, int(params.get("max_parallel") or 10)))
        self.tunnels: dict[int, subprocess.Popen] = {}
        self.lock = threading.Lock()

    def enqueue(self, configs: list[WorkerConfig]) -> None:
        launched, notify = self.queue
        with notify:
            launched.extend(configs)
            notify.notify()


class SSHManager(ClusterManager):
    """Launches workers on other hosts through ``ssh``; one ssh session per machine entry.

    ``machines`` holds ``"[user@]host[:ssh_port] [bind_addr[:bind_port]]"`` strings and
    ``(spec, count)`` pairs, ``count`` an int or ``"auto"`` (the host's CPU count). Repeated
    specs merge: counts add, ``"auto"`` replaces. Julia: ``SSHManager``.
    """

    is_local = False

    def __init__(self, machines: Iterable[str | tuple[str, int | str]]) -> None:
        self.machines = merge_machines(machines)

    def __repr__(self) -> str:
        return f"SSHManager(machines={self.machines!r})"

    def default_addprocs_params(self) -> dict:
        return {**default_addprocs_params(), "ssh": "ssh", "sshflags": [], "shell": "posix",
                "tunnel": False, "multiplex": False, "max_parallel": 10, "env": {}}

    def start_additional_workers(self, ctx, pid: int, config: WorkerConfig) -> None:
        """``count > 1``: the first worker on a host starts the others (see the function)."""
        start_additional_workers(ctx, self, pid, config)

    # -- launch ----------------------------------------------------------------------------
    def launch(self, params: dict, launched: list[WorkerConfig],
               launch_ntfy: threading.Condition) -> None:
        _check_params(params)
        ctx = current_context()
        sessions = []
        for spec, count in self.machines.items():
            host, port, bind_to = split_machine(spec)
            sessions.append(_Session(ctx, spec, count, host, port, bind_to, params,
                                     (launched, launch_ntfy)))
        threads = [threading.Thread(target=_launch_session, args=(s,), daemon=True,
                                    name=f"distexec-ssh-{s.host}") for s in sessions]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        _await_extra_workers(sessions)

    # -- connect ---------------------------------------------------------------------------
    def connect(self, pid: int, config: WorkerConfig) -> tuple[Any, Any]:
        session = _session_of(config)
        if config.connect_at is not None or session is None:
            return super().connect(pid, config)
        if config.io is not None:
            bind_addr, port = read_worker_host_port(config.io, config)
        else:  # an extra worker: its first worker read the address for us
            # _additional_config filled both in
            assert config.bind_addr is not None and config.port is not None
            bind_addr, port = config.bind_addr, config.port
        config.bind_addr, config.port = bind_addr, port
        config.connect_at = (bind_addr, port)
        if config.tunnel:
            sock = _connect_tunnel(session, pid, config)
        else:
            sock = socket.create_connection((bind_addr, int(port)), timeout=worker_timeout())
        return sock, sock  # the master authenticates over it

    # -- manage ----------------------------------------------------------------------------
    def manage(self, pid: int, config: WorkerConfig, op: str) -> None:
        session = _session_of(config)
        if session is None:
            return
        if op == "register":
            with session.lock:
                session.pids.add(pid)
                if config.process is not None and config.process is session.process:
                    session.first_pid = pid
            first = (config.userdata or {}).get("first_pid")
            if first is not None:  # its output reaches us through the first worker
                _quietly(remote_do, session.ctx, name_additional_output, first,
                         (config.port, pid), {})
        elif op == "deregister":
            with session.lock:
                session.pids.discard(pid)
            _close_tunnel(session, pid)
        elif op == "interrupt":
            _interrupt(session, pid, config)

    # -- replacement -----------------------------------------------------------------------
    def replacement(self, config: WorkerConfig) -> SSHManager | None:
        """A copy of this manager that starts one worker on the machine ``config`` ran on.

        The same machine spec (user, host, ssh port, bind address), count 1; a fixed bind
        port becomes a hint (``ADDR:[PORT]``), as for the extra workers of ``count > 1``:
        that port may still be held by the worker being replaced or by its host's others.
        None for a config that no SSHManager launched.
        """
        session = _session_of(config)
        if session is None:
            return None
        machine = session.spec.split()[0]
        if session.bind_to is not None:
            machine += " " + bind_hint(session.bind_to, "")
        clone = copy.copy(self)
        clone.machines = merge_machines([machine])
        return clone

    # -- kill ------------------------------------------------------------------------------
    def kill(self, pid: int, config: WorkerConfig) -> None:
        """Ask the worker to exit; end its ssh session after ``exit_timeout`` if it lingers."""
        session = _session_of(config)
        # The ssh session of this worker's own (an extra worker's belongs to its first worker).
        owned = session if session is not None and config.process is session.process else None
        if owned is not None:
            owned.closing = True
            owned.extra_done.set()  # a first worker that never joined starts no others
        super().kill(pid, config)  # never joined: kills the ssh process at once
        if owned is not None and config.os_pid is not None:
            timeout = _exit_timeout(owned.params)
            threading.Thread(target=_end_session_later, args=(pid, owned, timeout),
                             daemon=True, name=f"distexec-kill-{pid}").start()


def _exit_timeout(params: dict) -> float:
    return float(params.get("exit_timeout", 15.0))


def _check_params(params: dict) -> None:
    """Reject bad parameters before any ssh starts."""
    if params.get("shell", "posix") not in SHELLS:
        raise ValueError(f"invalid shell {params.get('shell')!r} (expected one of {SHELLS})")
    if params.get("multiplex"):
        raise NotImplementedError("SSHManager does not support multiplex=True (ssh ControlMaster "
                                  "tunnels) yet; use tunnel=True without multiplex")
    remote_environment(params)  # invalid env keys


def _session_of(config: WorkerConfig) -> _Session | None:
    userdata = config.userdata
    return userdata.get("ssh") if isinstance(userdata, dict) else None


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except Exception:
        log.debug("%s failed", getattr(fn, "__name__", fn), exc_info=True)


def _launch_session(session: _Session) -> None:
    """Start one host's ssh and queue its WorkerConfig; failures are logged (Julia does too)."""
    try:
        config = _start_ssh(session)
    except Exception:
        log.exception("Exception launching on machine %s", session.spec)
        session.extra_done.set()
        return
    session.enqueue([config])


def _start_ssh(session: _Session) -> WorkerConfig:
    params = session.params
    cmd = ssh_command(params, session.host, session.port,
                      remote_command(params, session.bind_to, session.count))
    try:
        # Its own session: a Ctrl-C at the master's terminal does not reach the ssh client.
        process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, start_new_session=True)
    except OSError as exc:
        raise LaunchWorkerError(f"Unable to start ssh ({cmd[0]!r}): {exc}") from exc
    # The cookie (and the TLS line) go through ssh's stdin, never argv; stdin stays open as
    # the worker's lifeline.
    assert process.stdin is not None  # stdin=PIPE
    try:
        process.stdin.write(worker_stdin(session.ctx.cookie, params.get("security")))
        process.stdin.flush()
    except BrokenPipeError:
        pass  # ssh already gave up: reading the worker's address reports how
    session.process = process
    threading.Thread(target=_watch_session, args=(session,), daemon=True,
                     name=f"distexec-ssh-watch-{session.host}").start()
    return WorkerConfig(io=process.stdout, host=session.host, process=process,
                        count=session.count, exename=params["exename"],
                        exeflags=params.get("exeflags"), tunnel=bool(params.get("tunnel")),
                        multiplex=bool(params.get("multiplex")), sshflags=params.get("sshflags"),
                        max_parallel=params.get("max_parallel"),
                        enable_threaded_blas=params["enable_threaded_blas"],
                        environ={"exit_timeout": params.get("exit_timeout", 15.0),
                                 STDERR_KEY: process.stderr},
                        userdata={"ssh": session})


def _await_extra_workers(sessions: list[_Session]) -> None:
    """``launch`` returns once every count > 1 host queued its extra workers (or failed)."""
    deadline = time.monotonic() + 3 * worker_timeout()
    errors = []
    for session in sessions:
        if session.count != 1:
            session.extra_done.wait(max(deadline - time.monotonic(), 0))
            if session.extra_error is not None:
                errors.append(session.extra_error)
    if errors:
        raise LaunchWorkerError("; ".join(str(e) for e in errors)) from errors[0]


# --------------------------------------------------------------------------------------------
# count > 1
# --------------------------------------------------------------------------------------------
def start_additional_workers(ctx, manager, pid: int, config: WorkerConfig) -> None:
    """Master side of ``count > 1``: worker ``pid`` starts the rest of its host's workers.

    Called by ``create_worker`` once the first worker has joined. Their configs go to the
    running ``launch`` (so ``addprocs`` returns their pids too); errors are raised from it.
    Julia: ``launch_n_additional_processes``.
    """
    session = _session_of(config)
    if session is None:
        log.warning("worker %d: count=%r is only supported by SSHManager; ignored", pid,
                    config.count)
        return
    try:
        n = _additional_count(config)
        if n > 0:
            assert config.bind_addr is not None  # connect() recorded the first worker's address
            hint = bind_hint(session.bind_to, config.bind_addr)
            addresses = remotecall_fetch(ctx, launch_additional, pid,
                                         (n, config.exename, config.exeflags, hint), {})
            session.enqueue([_additional_config(session, config, pid, a) for a in addresses])
    except BaseException as exc:
        session.extra_error = LaunchWorkerError(
            f"worker {pid} on {session.host} could not start its additional workers: {exc}")
    finally:
        session.extra_done.set()


def _additional_count(config: WorkerConfig) -> int:
    count = config.count
    if count == "auto":
        count = int((config.environ or {}).get("cpu_threads") or 1)
    return int(count) - 1


def _additional_config(session: _Session, first: WorkerConfig, first_pid: int,
                       address) -> WorkerConfig:
    bind_addr, port = address
    return WorkerConfig(host=first.host, bind_addr=bind_addr, port=port, tunnel=first.tunnel,
                        multiplex=first.multiplex, sshflags=first.sshflags,
                        exeflags=first.exeflags, exename=first.exename,
                        max_parallel=first.max_parallel,
                        enable_threaded_blas=first.enable_threaded_blas,
                        environ={"exit_timeout": _exit_timeout(session.params)},
                        userdata={"ssh": session, "first_pid": first_pid})


_additional: dict[int, tuple[subprocess.Popen, OutputRelay]] = {}
"""On a first worker: the workers it started, by port, with the relays of their output."""


def launch_additional(n: int, exename, exeflags, bind_to: str) -> list[tuple[str, int]]:
    """Worker side of ``count > 1``: start ``n`` workers on this host; returns their addresses.

    Each gets this worker's cookie (and TLS line) on stdin; their output is relayed to this
    worker's stdout (which the master relays in turn). Julia: ``launch_additional``.
    """
    ctx = current_context()
    cookie = worker_stdin(ctx.cookie, ctx.security)  # this worker's own TLS line, if any
    argv = [*words(exename), *words(exeflags), "-m", "distexec", "worker", "--bind-to", bind_to,
            "--separate-stderr", *worker_flags(ctx.security)]
    started: list[subprocess.Popen] = []
    try:
        for _ in range(n):
            process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, start_new_session=True)
            started.append(process)
            assert process.stdin is not None  # stdin=PIPE
            process.stdin.write(cookie)
            process.stdin.close()
        addresses = []
        for process in started:
            config = WorkerConfig(process=process, environ={STDERR_KEY: process.stderr})
            address = read_worker_host_port(process.stdout, config)
            relay = config.userdata["relay"]
            relay.prefix = DEFAULT_PREFIX  # what the master recognizes and labels its own way
            _additional[address[1]] = (process, relay)
            threading.Thread(target=process.wait, daemon=True, name="distexec-reap").start()
            addresses.append(address)
        return addresses
    except BaseException:
        for process in started:
            process.kill()
        raise


def name_additional_output(port: int, pid: int) -> None:
    """Label the relayed output of the worker listening on ``port`` as worker ``pid``'s."""
    entry = _additional.get(port)
    if entry is not None:
        entry[1].pid = pid


# --------------------------------------------------------------------------------------------
# interrupt, kill, lost sessions
# --------------------------------------------------------------------------------------------
def _interrupt(session: _Session, pid: int, config: WorkerConfig) -> None:
    """SIGINT the remote worker through a second ssh connection. Julia: ``manage(:interrupt)``."""
    if config.os_pid is None:
        log.error("Worker %d cannot be presently interrupted.", pid)
        return
    cmd = ssh_command(session.params, session.host, session.port, f"kill -2 {int(config.os_pid)}")
    try:
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=CONNECT_TIMEOUT + 5)
        failed = done.returncode != 0
        detail = done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
    except (OSError, subprocess.TimeoutExpired) as exc:
        failed, detail = True, str(exc)
    if failed:
        log.error("Error sending a Ctrl-C to worker %d on %s: %s", pid, session.host,
                  detail.strip())


def _end_session_later(pid: int, session: _Session, timeout: float) -> None:
    process = session.process
    assert process is not None  # kill() found this worker's process to be the session's
    try:
        process.wait(timeout)
        return
    except subprocess.TimeoutExpired:
        log.warning("Failed to gracefully kill worker %d, ending its ssh session", pid)
    process.terminate()  # the remote worker's stdin reaches EOF and it exits
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        log.warning("ssh session of worker %d ignored SIGTERM, sending SIGKILL", pid)
        process.kill()
        process.wait()


def _watch_session(session: _Session) -> None:
    """When ssh exits on its own, the workers behind it are lost unless they said goodbye.

    A worker that exits ends its ssh session too, and its own connection reports that; if the
    first worker's connection is still open ``LOST_GRACE`` after ssh ended, the host is
    unreachable (ssh's keepalives went unanswered): close every connection of the session so
    pending calls fail instead of waiting for TCP to give up.
    """
    process = session.process
    assert process is not None  # _start_ssh set it before starting this thread
    process.wait()
    first = session.first_pid
    if session.closing or first is None:
        return
    ctx = session.ctx
    deadline = time.monotonic() + LOST_GRACE
    with ctx.lock:
        # A closing connection flips ``conn.closed`` before it notifies: wait in short steps.
        while _alive(ctx, first) and time.monotonic() < deadline:
            ctx.changed.wait(0.05)
        if not _alive(ctx, first) or session.closing:
            return
        with session.lock:
            pids = sorted(session.pids)
    log.warning("ssh session to %s ended (status %s): workers %s are unreachable",
                session.host, process.returncode, pids)
    for pid in pids:
        record = ctx.record(pid)
        if record is not None and record.conn is not None:
            record.conn.close()


def _alive(ctx, pid: int) -> bool:
    record = ctx.peers.get(pid)
    return (record is not None and record.state not in DEAD_STATES
            and record.state != WorkerState.TERMINATING
            and record.conn is not None and not record.conn.closed)


# --------------------------------------------------------------------------------------------
# tunnels
# --------------------------------------------------------------------------------------------
def _connect_tunnel(session: _Session, pid: int, config: WorkerConfig):
    """Reach the worker through ``ssh -L 127.0.0.1:LOCAL:bind_addr:port``; returns the socket.

    ssh prints a line through ``LocalCommand`` once its forward listens, so nothing is polled.
    The remote ``sleep 60`` lets ssh end by itself once the tunnel carries no connection.
    """
    assert config.bind_addr is not None  # connect() set it
    target = f"{bracketed(config.bind_addr)}:{config.port}"
    with session.tunnel_slots:
        for _attempt in range(100):
            local_port = _free_local_port()
            forward = f"127.0.0.1:{local_port}:{target}"
            process = _start_tunnel(session, forward)
            if process is None:
                continue  # someone took the port meanwhile
            session.tunnels[pid] = process
            config.forward = forward
            return socket.create_connection(("127.0.0.1", local_port), timeout=worker_timeout())
    raise LaunchWorkerError("unable to create SSH tunnel after 100 tries. No free port?")


def _start_tunnel(session: _Session, forward: str) -> subprocess.Popen | None:
    extra = ["-o", "ExitOnForwardFailure=yes", "-o", "PermitLocalCommand=yes",
             "-o", "LocalCommand=echo distexec-tunnel-ready", "-L", forward]
    cmd = ssh_command(session.params, session.host, session.port, "sleep 60", extra)
    cmd[cmd.index("ClearAllForwardings=yes")] = "ClearAllForwardings=no"
    process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, start_new_session=True)
    assert process.stdout is not None and process.stderr is not None  # both PIPE
    line = process.stdout.readline()
    if b"distexec-tunnel-ready" in line:
        return process
    process.wait()
    error = process.stderr.read().decode(errors="replace").strip()
    process.stdout.close()
    process.stderr.close()
    if "forward" in error.lower() and "port" in error.lower():
        return None
    raise LaunchWorkerError(f"ssh tunnel {forward} to {session.host} failed: {error}")


def _free_local_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _close_tunnel(session: _Session, pid: int) -> None:
    process = session.tunnels.pop(pid, None)
    if process is None:
        return
    if process.poll() is None:
        process.terminate()
    process.wait()
    for stream in (process.stdout, process.stderr):
        if stream is not None:  # always: both are pipes (_start_tunnel)
            stream.close()
