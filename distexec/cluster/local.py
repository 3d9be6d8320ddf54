"""LocalManager: workers as child processes on this machine.

Owns starting ``python -m distexec worker`` processes and signalling them (interrupt, the
exit escalation). Imports the other cluster modules, ``distexec.runtime`` and below.
Julia: ``LocalManager``.

Each worker gets the cookie (and, with TLS, the certificate line) on stdin, never in argv or
environ; it gets the master's ``sys.path`` and
working directory, its share of this host's cores for the thread pools of numeric
libraries (``thread_limits``), its own session (a terminal Ctrl-C reaches only the master),
and three ways to die with the master: the master connection's EOF, its stdin's EOF, and
``PR_SET_PDEATHSIG``.

The master's link to each worker is one end of a Unix socket pair made at launch (the worker
inherits the other end), not TCP: on loopback a message through TCP costs about twice the
CPU and the time of one through a Unix socket, and every task crosses the link twice. The
worker still listens on TCP for its peers, and the link is authenticated like any other.
"""

from __future__ import annotations

import copy
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from typing import Any

from ..errors import LaunchWorkerError
from ..transport.lane import lane_pair
from .launch import LANE_KEY, STDERR_KEY
from .manager import ClusterManager, WorkerConfig, default_addprocs_params, terminate_then_kill
from . import template
from .security import uses_tls, worker_flags, worker_stdin
from .thread_limits import HOST_WORKERS_ENV, cpu_share, forget_own_limits, limit_threads

log = logging.getLogger("distexec")


class LocalManager(ClusterManager):
    """Launches ``n`` workers on this host, bound to 127.0.0.1 unless ``restrict=False``.

    ``restrict=False`` binds every interface (0.0.0.0); ``addprocs`` then warns
    (``SecurityWarning``) unless the cluster uses TLS (``security=``).
    """

    def __init__(self, n: int, restrict: bool = True):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"number of workers must be a non-negative int, got {n!r}")
        self.n = n
        self.restrict = restrict

    def __repr__(self) -> str:
        return "LocalManager()"

    def launch(self, params: dict, launched: list[WorkerConfig],
               launch_ntfy: threading.Condition) -> None:
        bind_to = "127.0.0.1" if self.restrict else "0.0.0.0"
        # joblib's rule: the master's local workers, these included, share this host's cores
        thread_limit = cpu_share(_local_workers() + self.n)
        for _ in range(self.n):
            process, link, lane = self._start(params, bind_to, thread_limit)
            config = WorkerConfig(io=process.stdout, process=process,
                                  enable_threaded_blas=params["enable_threaded_blas"],
                                  environ={"exit_timeout": params["exit_timeout"],
                                           "link": link, LANE_KEY: lane,
                                           STDERR_KEY: process.stderr})
            with launch_ntfy:
                launched.append(config)
                launch_ntfy.notify()

    def _start(self, params: dict, bind_to: str, thread_limit: int
               ) -> tuple[subprocess.Popen, socket.socket, socket.socket | None]:
        """Start one worker; returns its process, the master's end of its link and of its
        task lane (``transport.lane``; none under TLS, where the worker's main thread does
        not read its connection itself, and so could not wait for both)."""
        from ..runtime.context import current_context
        security = params.get("security")
        link, worker_end = socket.socketpair()
        lane, lane_end = lane_pair() if not getattr(security, "tls", False) else (None, None)
        inherited = [worker_end] + ([lane_end] if lane_end is not None else [])
        try:
            env = worker_environment(params, thread_limit)
            process = (template.launch_worker(current_context(), params, env, bind_to,
                                              uses_tls(security), worker_end, lane_end)
                       or _spawn(params, env, bind_to, security, worker_end, lane_end))
        except BaseException:
            for end in (link, lane):
                if end is not None:
                    end.close()
            raise
        finally:
            for end in inherited:
                end.close()  # the worker's now
        self._send_cookie(process, security)
        return process, link, lane

    @staticmethod
    def _send_cookie(process: subprocess.Popen, security) -> None:
        """The cookie (and TLS) lines on the worker's stdin, a pipe only it reads."""
        from ..runtime.context import current_context
        assert process.stdin is not None  # stdin=PIPE
        process.stdin.write(worker_stdin(current_context().cookie, security))
        process.stdin.flush()  # stays open: its EOF tells the worker the master is gone

    def connect(self, pid: int, config: WorkerConfig) -> tuple[Any, Any]:
        """The link made at launch (after the address line, which tells peers where the
        worker listens); TCP like any manager for a worker launched another way."""
        link = _take_link(config)
        if link is None:
            return super().connect(pid, config)
        try:
            self._worker_address(pid, config)
        except BaseException:
            link.close()
            raise
        return link, link

    def manage(self, pid: int, config: WorkerConfig, op: str) -> None:
        if op == "interrupt" and config.process is not None and config.process.poll() is None:
            config.process.send_signal(signal.SIGINT)  # a forked worker's: by its pidfd

    def kill(self, pid: int, config: WorkerConfig) -> None:
        _close_link(config)  # still here: the worker never got as far as connecting
        process = config.process
        if process is None:
            return super().kill(pid, config)
        if config.os_pid is None:  # never joined: nothing to ask politely
            _terminate_now(process)
            return
        super().kill(pid, config)
        timeout = float((config.environ or {}).get("exit_timeout", 15.0))
        threading.Thread(target=_escalate, args=(pid, process, timeout), daemon=True,
                         name=f"distexec-kill-{pid}").start()

    def default_addprocs_params(self) -> dict:
        return default_addprocs_params()

    def replacement(self, config: WorkerConfig) -> LocalManager:
        """A copy of this manager that launches one worker (the same ``restrict``).

        A copy, so that a subclass stays its own class and keeps its settings.
        """
        clone = copy.copy(self)
        clone.n = 1
        return clone


def _spawn(params: dict, env: dict, bind_to: str, security, worker_end: socket.socket,
           lane_end: socket.socket | None) -> subprocess.Popen:
    """``python -m distexec worker`` in a new interpreter, inheriting the worker's ends of
    its link and of its task lane (if it has one)."""
    exeflags = params["exeflags"]
    exeflags = [exeflags] if isinstance(exeflags, str) else list(exeflags)
    inherited = [end for end in (worker_end, lane_end) if end is not None]
    cmd = [str(params["exename"]), *exeflags, "-m", "distexec", "worker",
           "--bind-to", bind_to, "--parent-pid", str(os.getpid()), "--die-with-stdin",
           "--master-fd", str(worker_end.fileno()), "--separate-stderr",
           *(["--lane-fd", str(lane_end.fileno())] if lane_end is not None else []),
           *worker_flags(security)]
    try:
        return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, cwd=params["dir"], env=env,
                                start_new_session=True,
                                pass_fds=[end.fileno() for end in inherited])
    except OSError as exc:  # bad exename or dir: a launch failure like any other
        raise LaunchWorkerError(_start_failure(cmd[0], params["dir"], exc)) from exc


def _start_failure(exename: str, workdir: object, exc: OSError) -> str:
    """Why a worker could not start. Popen's error names the executable even when the
    missing file is the working directory, so that one is checked first."""
    if not os.path.isdir(str(workdir)):
        return (f"Unable to start worker process: its working directory dir={workdir!r} does "
                "not exist or is not a directory")
    if not os.access(str(workdir), os.X_OK):
        return (f"Unable to start worker process: its working directory dir={workdir!r} "
                "cannot be entered (permission denied)")
    return f"Unable to start worker process {exename!r}: {exc}"


def worker_environment(params: dict, thread_limit: int = 1) -> dict:
    """The master's environment, its current ``sys.path``, ``env``, then thread limits.

    Unless ``enable_threaded_blas``, each thread-pool variable of the numeric libraries
    (``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``, ``MKL_NUM_THREADS``, ...) that neither the
    master's environment nor ``env`` sets becomes ``thread_limit`` (or the user's
    ``OMP_NUM_THREADS``). ``LocalManager`` passes its host's share of the cores per worker;
    a manager that starts several workers on one host passes
    ``thread_limits.cpu_share(n)``.
    """
    env = dict(os.environ)
    env.pop(HOST_WORKERS_ENV, None)  # meant for one worker, never inherited further
    limited = not params.get("enable_threaded_blas")
    if limited:
        forget_own_limits(env)  # a worker's workers: what distexec set for it is not the user's
    path = [p if p else os.getcwd() for p in sys.path]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(path))
    env["PYTHONUNBUFFERED"] = "1"
    user_env = params.get("env") or {}
    for key, value in (user_env.items() if isinstance(user_env, dict) else user_env):
        env[str(key)] = str(value)
    if limited:
        limit_threads(env, thread_limit)
    return env


def _local_workers() -> int:
    """Local workers of this master that are starting or running (not leaving)."""
    from ..runtime.context import WorkerState, current_context
    ctx = current_context()
    with ctx.lock:
        return sum(1 for record in ctx.peers.values()
                   if isinstance(record.manager, LocalManager)
                   and record.state in (WorkerState.CREATED, WorkerState.CONNECTED))


def _terminate_now(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()
    _close_pipes(process)


def _take_link(config: WorkerConfig) -> socket.socket | None:
    """The master's end of the link ``launch`` made for this worker, if not taken yet."""
    return (config.environ or {}).pop("link", None)


def _close_link(config: WorkerConfig) -> None:
    """Close the master's end of a link (and of a task lane) that was never used (the worker
    did not start)."""
    for end in (_take_link(config), (config.environ or {}).pop(LANE_KEY, None)):
        if end is not None:
            end.close()


def _close_pipes(process: subprocess.Popen) -> None:
    for stream in (process.stdin, process.stdout, process.stderr):
        try:
            if stream is not None:
                stream.close()
        except OSError:
            pass


def _escalate(pid: int, process: subprocess.Popen, timeout: float) -> None:
    """Julia's ladder after the exit request: wait, SIGTERM, wait, SIGKILL; log each step."""
    try:
        process.wait(timeout)
        return
    except subprocess.TimeoutExpired:
        log.warning("Failed to gracefully kill worker %d, sending SIGTERM", pid)
    terminate_then_kill(pid, process, timeout)
