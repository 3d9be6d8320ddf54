"""The cluster-manager interface: how workers are launched, reached, interrupted and killed.

Owns ``ClusterManager`` (the abstract base users subclass for new launch mechanisms),
``WorkerConfig`` (what a manager learns about each launched worker), the default TCP
``connect``/``kill``, and the exit helpers every manager shares (``exit_worker``, the
function ``kill`` sends a worker; ``terminate_then_kill``). Imports ``distexec.errors``,
``distexec.protocol``, ``distexec.transport``, ``distexec.runtime`` and ``cluster.launch``:
no particular manager (local, ssh, slurm) and no worker-side module, so a new launch
mechanism is one new module beside them (tests/unit/test_layers.py checks it).
Julia: ``ClusterManager``, ``WorkerConfig``.
"""

from __future__ import annotations

import abc
import logging
import socket
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Any, NoReturn

from ..errors import LaunchWorkerError
from ..runtime.context import current_context
from .launch import read_worker_host_port, worker_timeout

log = logging.getLogger("distexec")


@dataclass
class WorkerConfig:
    """What a manager knows about one launched worker (every field optional).

    ``launch`` fills in how to reach the worker (``io`` to read its address from, or
    ``host``/``port``) and whatever it needs later (``process``, ``userdata``); ``connect``
    fills in ``host``, ``port``, ``bind_addr`` and ``connect_at``; the master fills in
    ``os_pid`` once the worker has joined. Julia: ``WorkerConfig``.
    """

    io: Any = None
    host: str | None = None
    port: int | None = None
    count: Any = None
    exename: Any = None
    exeflags: Any = None
    userdata: Any = None
    tunnel: bool | None = None
    multiplex: bool | None = None
    forward: str | None = None
    bind_addr: str | None = None
    sshflags: Any = None
    max_parallel: int | None = None
    connect_at: tuple[str, int] | None = None
    process: Any = None
    os_pid: int | None = None
    environ: dict | None = None
    ident: Any = None
    connect_idents: Any = None
    enable_threaded_blas: bool | None = None


def default_addprocs_params(manager: "ClusterManager | None" = None) -> dict:
    """Keyword defaults of ``addprocs`` (for ``manager`` when given). Julia: same name."""
    if manager is not None:
        return manager.default_addprocs_params()
    return {
        "topology": "all_to_all",
        "dir": os.getcwd(),
        "exename": sys.executable,
        "exeflags": [],
        "env": {},
        "enable_threaded_blas": False,
        "lazy": True,
        "callback_warning_interval": 10.0,
        "exit_timeout": 15.0,
        "security": None,  # a distexec.Security: TLS for every link (cluster/security.py)
        "output_prefix": None,  # label of workers' output lines; None: env or Julia's (console)
    }


class ClusterManager(abc.ABC):
    """Base class of launch mechanisms (local processes, SSH, Slurm, your own).

    Subclasses implement ``launch`` and ``manage``; ``connect`` and ``kill`` have TCP
    defaults that suit any worker started with ``distexec worker``. Julia: ``ClusterManager``.
    """

    @abc.abstractmethod
    def launch(self, params: dict, launched: list[WorkerConfig],
               launch_ntfy: threading.Condition) -> None:
        """Start workers; append a WorkerConfig per worker and notify ``launch_ntfy``.

        Return once every requested worker has been launched; exceptions propagate out of
        ``addprocs`` after the workers already appended have been set up.
        """

    @abc.abstractmethod
    def manage(self, pid: int, config: WorkerConfig, op: str) -> None:
        """Hear about worker ``pid``: op is "register", "deregister", "interrupt" or "finalize"."""

    def kill(self, pid: int, config: WorkerConfig) -> None:
        """Make worker ``pid`` exit. Default: ask it to exit over its connection.

        A worker that never joined has no connection to ask over; if ``launch`` left its
        process in ``config.process``, that process is killed instead, so a failed start
        (no address printed, junk output, a failed join) leaves nothing running.
        """
        from ..runtime.calls import remote_do
        if config.os_pid is None and isinstance(config.process, subprocess.Popen):
            _kill_unjoined(config.process)
            return
        try:
            remote_do(current_context(), exit_worker, pid, (), {}, background=True)
        except Exception:  # already gone or unreachable: nothing to ask
            pass

    def connect(self, pid: int, config: WorkerConfig) -> tuple[Any, Any]:
        """Open a connection to worker ``pid``; returns ``(reader, writer)``.

        The master then authenticates over it (the cookie challenge) before anything else.
        Return a connected socket twice, or any pair of binary streams (a custom transport;
        the worker serves it with ``init_worker`` and ``process_messages``). Default: TCP to
        ``config.connect_at``, else to the address the worker printed on ``config.io``, else
        to ``config.host``/``config.port``.
        """
        host, port = self._worker_address(pid, config)
        sock = socket.create_connection((host, port), timeout=worker_timeout())
        return sock, sock

    def _worker_address(self, pid: int, config: WorkerConfig) -> tuple[str, int]:
        """Where worker ``pid`` listens, found as ``connect`` describes; sets
        ``config.connect_at``, where its peers reach it."""
        host: str | None
        port: int | None
        if config.connect_at is not None:
            host, port = config.connect_at
        else:
            if config.io is not None:
                bind_addr, port = read_worker_host_port(config.io, config)
                host = bind_addr if config.host is None or config.tunnel else bind_addr
            else:
                host, port = config.host or config.bind_addr, config.port
            if host is None or port is None:
                raise LaunchWorkerError(f"cannot connect to worker {pid}: its WorkerConfig has "
                                        "no connect_at, io, or host and port")
            config.host, config.port = host, port
            config.bind_addr = config.bind_addr or host
            config.connect_at = (config.bind_addr, port)
        return host, int(port)

    def default_addprocs_params(self) -> dict:
        return default_addprocs_params()

    def start_additional_workers(self, ctx, pid: int, config: WorkerConfig) -> None:
        """``config.count > 1``: worker ``pid`` has joined; start the rest of its host's workers.

        Called by ``addprocs`` with the cluster's context. Only ``SSHManager`` supports it
        (its first worker on a host starts the others); the default ignores the count and
        says so. Julia: ``launch_n_additional_processes``.
        """
        log.warning("worker %d: count=%r is only supported by SSHManager; ignored", pid,
                    config.count)

    def replacement(self, config: WorkerConfig) -> ClusterManager | None:
        """A manager that launches one worker like the one ``config`` describes.

        "Like" means the same host and options; an executor that replaces a dead or
        retired worker calls ``addprocs`` with it and the original ``addprocs`` keywords.
        ``config`` is the WorkerConfig this manager's ``launch`` produced (the worker may
        be dead by now). The default, None, says this manager cannot do it; the executor
        then does not replace its workers.
        """
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _kill_unjoined(process: subprocess.Popen) -> None:
    """Kill a launched process that never joined, and reap it.

    Its stdout is left to the output relay reading it, which closes it at EOF.
    """
    if process.poll() is None:
        process.kill()
    process.wait()
    if process.stdin is not None:
        try:
            process.stdin.close()
        except OSError:
            pass


def terminate_then_kill(pid: int, process: subprocess.Popen, timeout: float) -> None:
    """SIGTERM; SIGKILL if worker ``pid`` outlives ``timeout`` seconds (logged); reap it."""
    process.terminate()
    try:
        process.wait(timeout)
        return
    except subprocess.TimeoutExpired:
        log.warning("Worker %d ignored SIGTERM, sending SIGKILL", pid)
    process.kill()
    process.wait()


def exit_worker(code: int = 0) -> None:
    """Runs on a worker: leave now (what ``ClusterManager.kill`` asks for over the connection).

    Julia: ``exit()`` via ``remote_do``.
    """
    exit_now(code)


def exit_now(code: int) -> NoReturn:
    """End this process at once with ``code``, after flushing what it printed."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)
