"""Local workers forked from a warm template process: the master's side.

Owns the template process of a master (one per ``ClusterContext``, started at its first local
launch that can use it, closed with the context), the requests to fork a worker, and
``TemplateProcess``, the ``subprocess.Popen`` that stands for a forked worker in its
``WorkerConfig``. The template's own side is ``template_server``, whose protocol (JSON and
descriptors over the control socket) this module speaks without importing it; it imports
``.launch`` only. multiprocessing's forkserver and Android's zygote work the same way.

    LocalManager._start ──► launch_worker(ctx, params, env, ...) ──► the context's Template
        no template yet ──► start one: python -m distexec.cluster.template_server (one cold
                            interpreter, ~ one worker's start), wait for its "ready"
        send {"op": "fork", ...} + fds ──► "forked" pid + pidfd ──► TemplateProcess
        reader thread ◄── "exit" pid, code (the template reaps its children) ──► returncode
    None instead (the caller spawns ``python -m distexec worker`` as before) when the template
    cannot give the worker what a spawned one gets: see ``unusable``.

A forked worker is the template's child, not the master's: the master signals it through
its pidfd (never a reused pid) and learns its exit status from the template. The template
dies with the master (``PR_SET_PDEATHSIG``) and then kills its children; a worker whose
template is killed goes on, reached as before, but its exit status is no longer known
(``TemplateProcess.wait`` returns None once it is gone).
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from .launch import worker_timeout

log = logging.getLogger("distexec")

DISABLE_ENV = "DISTEXEC_TEMPLATE"
"""``DISTEXEC_TEMPLATE=0`` in the master's environment: always spawn local workers."""
DEFAULT = "1"
"""The template is used unless ``DISTEXEC_TEMPLATE`` says otherwise."""
KEY = "template"
"""The context's ``launchers`` key of its Template (or of ``_Unavailable``: it could not
start)."""
RETRY_AFTER = 60.0
"""Seconds during which workers are spawned after the template failed to start."""
STARTUP_KEYS = ("PYTHON", "LD_", "MALLOC_", "GLIBC_TUNABLES", "LANG", "LC_")
"""Environment variables read when an interpreter starts (or its C library loads): a worker
whose values differ from the template's must start its own interpreter. ``PYTHONPATH`` is
not one of them: a forked worker's ``sys.path`` is made from it."""
MAX_MESSAGE = 1 << 16


class TemplateGone(Exception):
    """The template could not fork a worker (it died, or refused): spawn it instead."""


def launch_worker(ctx, params: dict, env: dict, bind_to: str, tls: bool,
                  link: socket.socket, lane: socket.socket | None) -> TemplateProcess | None:
    """Fork a worker from the context's template; None when it must be spawned instead.

    ``link`` and ``lane`` are the worker's ends (the caller closes its copies). The cookie
    is not here: the caller writes it to the returned process's ``stdin``, as to a spawned one.
    """
    reason = unusable(params)
    if reason is not None:
        log.debug("local worker spawned, not forked from the template: %s", reason)
        return None
    template = _template_of(ctx, env)
    if template is None:
        return None
    try:
        return template.fork(params, env, bind_to, tls, link, lane)
    except TemplateGone as exc:
        log.info("the local workers' template is gone (%s): spawning this worker", exc)
        return None


def unusable(params: dict) -> str | None:
    """Why a worker with these ``addprocs`` parameters cannot be forked from the template
    (None: it can)."""
    if os.environ.get(DISABLE_ENV, DEFAULT) == "0":
        return f"{DISABLE_ENV}=0"
    if not sys.platform.startswith("linux") or not hasattr(os, "pidfd_open") \
            or not hasattr(socket, "send_fds"):
        return "the template needs Linux, pidfds and SCM_RIGHTS"
    if str(params["exename"]) != sys.executable:
        return f"exename={params['exename']!r} is not this interpreter"
    if params["exeflags"]:
        return f"exeflags={params['exeflags']!r}"
    user_env = params.get("env") or {}
    pairs = user_env.items() if isinstance(user_env, dict) else user_env
    startup = sorted(k for k in (str(k) for k, _ in pairs) if _read_at_startup(k))
    if startup:
        return f"env= sets {', '.join(startup)}, read when an interpreter starts"
    workdir = str(params["dir"])
    if not os.path.isdir(workdir) or not os.access(workdir, os.X_OK):
        return f"dir={workdir!r} cannot be entered"  # the spawn path says why
    return None


def startup_environment(env: dict) -> dict:
    """The variables of ``env`` an interpreter reads when it starts (``STARTUP_KEYS``)."""
    return {k: v for k, v in env.items() if _read_at_startup(k)}


def _read_at_startup(key: str) -> bool:
    return key.startswith(STARTUP_KEYS) and key != "PYTHONPATH"


def _template_of(ctx, env: dict) -> Template | None:
    """The context's running template for workers of this environment, started if needed."""
    with ctx.lock:
        template = ctx.launchers.get(KEY)
    if isinstance(template, _Unavailable):
        if time.monotonic() < template.until:
            return None
        template = None
    if template is not None:
        if template.alive and template.startup_env == startup_environment(env):
            return template
        template.close()  # dead, or the master's environment changed since it started
    try:
        template = Template.start(env)
    except Exception as exc:  # whatever it was, spawning still works
        log.warning("the local workers' template could not start (%s): workers are spawned "
                    "for the next %g s", exc, RETRY_AFTER)
        with ctx.lock:
            ctx.launchers[KEY] = _Unavailable(time.monotonic() + RETRY_AFTER)
        return None
    with ctx.lock:
        ctx.launchers[KEY] = template
    return template


class _Unavailable:
    """In the context's ``launchers`` while the template could not start: workers are
    spawned until ``until`` (``time.monotonic()``), then a template is tried again."""

    __slots__ = ("until",)

    def __init__(self, until: float):
        self.until = until

    def close(self) -> None:
        """Nothing runs: a launcher's ``close`` (the context closes every launcher)."""


class _Exit:
    """A forked worker's pidfd, and where the reader thread puts its exit status.

    The pidfd is closed as soon as the status is known (a process that is gone needs no
    signal), under ``lock``, which every signal through it also holds: a closed descriptor's
    number, reused, is never signalled.
    """

    def __init__(self, pidfd: int) -> None:
        self.pidfd: int | None = pidfd
        self.code: int | None = None  # None once known: the template died first, it is lost
        self.known = threading.Event()
        self.lock = threading.Lock()

    def settle(self, code: int | None) -> None:
        """The status is ``code`` (None with the template gone: unknown)."""
        with self.lock:
            self.code = code
            if code is not None:
                self._close()
        self.known.set()

    def signal(self, sig: int) -> None:
        with self.lock:
            if self.pidfd is None or self.code is not None:
                return
            try:
                signal.pidfd_send_signal(self.pidfd, sig)
            except ProcessLookupError:
                pass

    def await_gone(self, timeout: float | None) -> bool:
        """An orphan's end (its status will never come): poll its pidfd."""
        with self.lock:
            fd = self.pidfd
            if fd is None:
                return True
            poller = select.poll()
            poller.register(fd, select.POLLIN)
        if not poller.poll(None if timeout is None else int(timeout * 1000)):
            return False
        with self.lock:
            self._close()
        return True

    def _close(self) -> None:
        fd, self.pidfd = self.pidfd, None
        if fd is not None:
            os.close(fd)


class Template:
    """A running template process and the master's end of its control socket."""

    def __init__(self, process: subprocess.Popen, control: socket.socket, startup_env: dict):
        self.process = process
        self.control = control
        self.startup_env = startup_env
        self.alive = True
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[threading.Event, list]] = {}
        self._exits: dict[int, _Exit] = {}

    def __repr__(self) -> str:
        return f"<Template pid={self.process.pid} alive={self.alive}>"

    @classmethod
    def start(cls, env: dict) -> Template:
        """Start the template with the workers' environment (``PYTHONPATH``: distexec's
        directory only) and wait for it to be ready."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        template_env = dict(env)
        template_env["PYTHONPATH"] = _package_parent()
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "distexec.cluster.template_server",
                 str(theirs.fileno()), str(os.getpid())],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=template_env,
                cwd=_package_parent(), start_new_session=True, pass_fds=[theirs.fileno()])
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        template = cls(process, ours, startup_environment(env))
        try:
            template._await_ready(worker_timeout())
        except BaseException:
            template.close()
            raise
        threading.Thread(target=template._read, daemon=True,
                         name="distexec-template").start()
        return template

    def _await_ready(self, timeout: float) -> None:
        self.control.settimeout(timeout)
        try:
            data, _fds, _flags, _addr = socket.recv_fds(self.control, MAX_MESSAGE, 1)
        except (OSError, socket.timeout) as exc:
            raise TemplateGone(f"no word from it within {timeout} s: {exc}") from None
        finally:
            self.control.settimeout(None)
        if not data or json.loads(data).get("op") != "ready":
            raise TemplateGone(f"it exited (status {self.process.poll()})")

    def fork(self, params: dict, env: dict, bind_to: str, tls: bool,
             link: socket.socket, lane: socket.socket | None) -> TemplateProcess:
        """Have the template fork one worker; its output and stdin pipes are made here."""
        stdin_r, stdin_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        theirs = [stdin_r, out_w, err_w, link.fileno()] + ([lane.fileno()] if lane else [])
        ours = [stdin_w, out_r, err_r]
        request = {"op": "fork", "env": env, "dir": str(params["dir"]), "bind_to": bind_to,
                   "tls": tls}
        try:
            pid, status = self._request(request, theirs)
        except BaseException:
            for fd in ours:
                os.close(fd)
            raise
        finally:
            for fd in (stdin_r, out_w, err_w):
                os.close(fd)
        return TemplateProcess(pid, status, io.open(stdin_w, "wb"), io.open(out_r, "rb"),
                               io.open(err_r, "rb"))

    def _request(self, request: dict, fds: list[int]) -> tuple[int, _Exit]:
        answered, answer = threading.Event(), []  # type: tuple[threading.Event, list[Any]]
        with self._lock:
            if not self.alive:
                raise TemplateGone("it has exited")
            request["id"] = key = next(self._ids)
            self._pending[key] = (answered, answer)
            try:
                socket.send_fds(self.control, [json.dumps(request).encode()], fds)
            except OSError as exc:
                del self._pending[key]
                raise TemplateGone(str(exc)) from None
        if not answered.wait(worker_timeout()):
            with self._lock:
                self._pending.pop(key, None)
            raise TemplateGone(f"no answer within {worker_timeout()} s")
        if not answer or isinstance(answer[0], str):
            raise TemplateGone(answer[0] if answer else "it exited")
        return answer[0]

    def _read(self) -> None:
        """The reader thread: fork answers and exit statuses, until the template ends."""
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.control, MAX_MESSAGE, 1)
            except OSError:
                data, fds = b"", []
            if not data:
                break
            self._handle(json.loads(data), fds)
        self._gone()

    def _handle(self, message: dict, fds: list[int]) -> None:
        op = message.get("op")
        with self._lock:
            if op == "exit":
                status = self._exits.pop(message["pid"], None)
                if status is not None:
                    status.settle(int(message["code"]))
                return
            waiter = self._pending.pop(int(message.get("id", 0)), None)
            if op == "forked" and fds:
                status = self._exits[message["pid"]] = _Exit(fds[0])
                answer: Any = (message["pid"], status)
            else:
                answer = str(message.get("error", "it could not fork"))
                for fd in fds:
                    os.close(fd)
        if waiter is None:  # its requester gave up: the worker must not live on unseen
            if not isinstance(answer, str):
                answer[1].signal(signal.SIGKILL)
            return
        waiter[1].append(answer)
        waiter[0].set()

    def _gone(self) -> None:
        """The template ended: fail what waits on it; its workers' statuses are lost."""
        with self._lock:
            self.alive = False
            pending, self._pending = self._pending, {}
            exits, self._exits = self._exits, {}
        for answered, _answer in pending.values():
            answered.set()
        for status in exits.values():
            status.settle(None)
        try:
            self.process.wait(timeout=worker_timeout())
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        """End the template (its workers live on: they are its context's to remove)."""
        with self._lock:
            self.alive = False
            try:  # not an EOF alone: that would tell the template the master died
                socket.send_fds(self.control, [json.dumps({"op": "close"}).encode()], [])
            except OSError:
                pass
        try:
            self.control.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.control.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _package_parent() -> str:
    """The directory distexec is imported from (the template needs only that)."""
    import distexec.cluster as cluster
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(cluster.__file__))))


class TemplateProcess(subprocess.Popen):
    """A worker forked by the template, as the ``subprocess.Popen`` a spawned one would be.

    ``pid``, ``stdin`` (the cookie pipe, kept open as the worker's lifeline), ``stdout``,
    ``stderr``, ``poll``, ``wait``, ``send_signal``, ``terminate`` and ``kill`` behave as
    Popen's; signals go through a pidfd, and the exit status comes from the template. Once
    the template is gone the status is unknown: ``poll`` and ``wait`` return None (``wait``
    after the worker is gone).
    """

    def __init__(self, pid: int, status: _Exit, stdin, stdout, stderr):
        # Not Popen.__init__: the process exists. The attributes Popen's methods read:
        self.args = [sys.executable, "-m", "distexec", "worker", "(forked by the template)"]
        self.pid, self.returncode = pid, None
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.text_mode, self.universal_newlines = False, False
        self.encoding = self.errors = None
        self._child_created = False  # not our child: Popen.__del__ has nothing to reap
        self._waitpid_lock = threading.Lock()
        self._sigint_wait_secs = 0.25
        self._communication_started = False
        self._input = None
        self._fileobj2output: dict = {}
        self._status = status

    def _internal_poll(self, _deadstate=None, **_ignored) -> int | None:
        if self.returncode is None and self._status.code is not None:
            self.returncode = self._status.code
        return self.returncode

    def _wait(self, timeout: float | None) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._status.known.wait(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        if self._status.code is not None:
            return self._internal_poll()
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not self._status.await_gone(left):  # orphaned: wait for the process itself
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        return None

    def send_signal(self, sig: int) -> None:
        self._status.signal(sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)
