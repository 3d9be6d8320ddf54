"""The template process: a warm interpreter that forks local workers on the master's request.

Runs as ``python -m distexec.cluster.template_server CONTROL_FD MASTER_PID``, started once per
master by ``cluster.template`` (which owns the master's side and says when it is used). It
has imported distexec and everything a worker imports, and stays single-threaded, so a fork
of it is safe and costs a few milliseconds and little memory (its pages are shared until
written). Imports ``distexec.cluster.worker``, ``.thread_limits`` and below (run as
``__main__``, nothing imports it).

    master ──(CONTROL_FD, a SOCK_SEQPACKET pair; SCM_RIGHTS)──► template
      {"op": "fork", id, env, dir, worker options} + fds: stdin (cookie pipe), stdout and
      stderr pipes, the master link, [the task lane]   ──► fork ──► child: a worker
      ◄── {"op": "forked", id, pid} + the child's pidfd   (or {"op": "failed", id, error})
      ◄── {"op": "exit", pid, code}   (each child it reaps; code as Popen.returncode)
      {"op": "close"} ──► the template exits (the master is done with it, not its workers)
    control EOF without "close", or MASTER_DIED (our PR_SET_PDEATHSIG)
      ──► the master is gone: SIGKILL every child, exit

The cookie never passes through the template: it is on the stdin pipe, which the master
writes and the child reads. The child resets what it inherited from the template (signal
handlers, the wakeup fd, the template's descriptors, ``random``'s state), takes the worker's
environment, working directory, ``sys.path`` and session, and runs ``start_worker`` as
``distexec worker`` does. It never sees anything of the master's but what it is sent.
"""

from __future__ import annotations

import gc
import json
import os
import random
import select
import signal
import socket
import sys

import cloudpickle  # noqa: F401  (warm: every worker unpickles with it)

# Run with -m, this module is imported after the package root, which imports what a worker runs;
# these few a worker imports later, at its first calls.
import multiprocessing.resource_tracker  # noqa: F401
import multiprocessing.shared_memory  # noqa: F401
import multiprocessing.spawn  # noqa: F401
import runpy  # noqa: F401

from distexec.cluster import thread_limits, worker
from distexec.runtime import heartbeat  # noqa: F401

MASTER_DIED = signal.SIGRTMIN + 3
"""Our ``PR_SET_PDEATHSIG``: a signal of its own, as its handler cannot tell who sent it and
the kernel delivers it before ``getppid()`` shows the new parent."""
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_MESSAGE = 1 << 20
MAX_FDS = 8


def serve(control_fd: int, master_pid: int) -> None:
    """The template's loop: fork on request, report exits, end with the master."""
    control = socket.socket(fileno=control_fd)
    control.set_inheritable(False)
    children: set[int] = set()
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    signal.signal(MASTER_DIED, lambda signum, frame: _end(children))
    interpreter = interpreter_path()
    _die_with_master(master_pid)
    gc.collect()
    gc.freeze()  # the collector then leaves the shared pages alone in every child
    _send(control, {"op": "ready", "pid": os.getpid()})
    template = (control.fileno(), wake_r, wake_w)
    while True:
        try:
            ready = select.select([control.fileno(), wake_r], [], [])[0]
        except InterruptedError:
            continue
        if wake_r in ready:
            _drain(wake_r)
            _reap(control, children)
        if control.fileno() in ready:
            try:
                data, fds, _flags, _addr = socket.recv_fds(control, MAX_MESSAGE, MAX_FDS)
            except OSError:
                data, fds = b"", []
            request = json.loads(data) if data else {"op": "lost"}
            if request["op"] == "close":  # the master is done with us; its workers are not
                os._exit(0)
            if request["op"] == "lost":   # EOF without "close": the master is gone
                _end(children)
            _fork(control, request, fds, children, template, interpreter)


def _die_with_master(master_pid: int) -> None:
    """``MASTER_DIED`` (its handler: ``_end``) when the master dies; gone already: end now."""
    worker.signal_at_parent_death(MASTER_DIED)
    if os.getppid() != master_pid:
        os._exit(0)


def _end(children: set[int]) -> None:
    """The master is gone: its workers go too, then the template (they would leave on their
    own when their master link ends; this also stops one whose C code holds the GIL).
    Workers outlive a template that is merely closed or killed, not their master."""
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    os._exit(0)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except (BlockingIOError, InterruptedError):
        pass


def _reap(control: socket.socket, children: set[int]) -> None:
    """Report every child that ended: ``code`` as ``Popen.returncode`` (-N: signal N)."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)
        _send(control, {"op": "exit", "pid": pid, "code": os.waitstatus_to_exitcode(status)})


def _send(control: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    try:
        socket.send_fds(control, [json.dumps(message).encode()], fds or [])
    except OSError:  # the master is gone: the control EOF ends us
        pass


def _fork(control: socket.socket, request: dict, fds: list[int], children: set[int],
          template_fds: tuple[int, ...], interpreter: list[str]) -> None:
    try:
        pid = os.fork()
    except OSError as exc:
        _close_all(fds)
        _send(control, {"op": "failed", "id": request["id"], "error": str(exc)})
        return
    if pid == 0:  # the worker
        code = 1
        try:
            _become_worker(request, fds, template_fds, interpreter)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            os._exit(code)
    children.add(pid)
    _close_all(fds)
    pidfd = _pidfd(pid)
    _send(control, {"op": "forked", "id": request["id"], "pid": pid},
          [pidfd] if pidfd is not None else None)
    if pidfd is not None:
        os.close(pidfd)


def _pidfd(pid: int) -> int | None:
    """A pidfd of our child (it cannot be reaped before we send it: we reap it)."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# -- in the child --------------------------------------------------------------------------------
def _become_worker(request: dict, fds: list[int], template_fds: tuple[int, ...],
                   interpreter: list[str]) -> None:
    """Shed the template, take the worker's process state, run ``start_worker``."""
    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGCHLD, MASTER_DIED):
        signal.signal(signum, signal.SIG_DFL)
    _close_all(list(template_fds))
    os.setsid()  # its own session, as start_new_session gives a spawned worker
    stdin, stdout, stderr, link, *rest = fds
    for fd, target in ((stdin, 0), (stdout, 1), (stderr, 2)):
        os.dup2(fd, target)
    _close_all([stdin, stdout, stderr])
    lane = rest[0] if rest else None
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["dir"])
    sys.path[:] = worker_path(request["env"].get("PYTHONPATH", ""), interpreter)
    sys.argv = [os.path.join(PACKAGE_DIR, "__main__.py"), "worker"]
    random.seed()  # never the template's (or a sibling's) sequence
    thread_limits.apply_host_share()
    worker.start_worker(bind_to=request["bind_to"], die_with_stdin=True,
                        tls_from_stdin=request["tls"], master_fd=link, lane_fd=lane,
                        stderr_to_stdout=False)


def interpreter_path() -> list[str]:
    """The template's ``sys.path`` less its start directory and its ``PYTHONPATH``: the
    interpreter's own entries (stdlib, site-packages, what .pth files add)."""
    own = set(os.environ.get("PYTHONPATH", "").split(os.pathsep))
    return [p for p in sys.path[1:] if p not in own]


def worker_path(pythonpath: str, interpreter: list[str]) -> list[str]:
    """``sys.path`` as ``python -m distexec worker`` would have it with ``PYTHONPATH`` set:
    the working directory, ``PYTHONPATH``, then the interpreter's entries not already there."""
    start = [os.getcwd()] + [p for p in pythonpath.split(os.pathsep) if p]
    return start + [p for p in dict.fromkeys(interpreter) if p not in start]


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]))
