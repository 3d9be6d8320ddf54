"""SlurmManager: workers as the tasks of one ``srun`` job step.

Owns building the ``srun`` command, reading the step's labelled output (where each task runs,
its address line, then its stdout and stderr relayed as ``From worker N:``), signalling one task
(``srun --overlap ... kill``) and ending a step that outlives its workers (``scancel``).
Imports the other cluster modules, ``distexec.runtime`` and below. Julia: ``SlurmManager``
of ClusterManagers.jl (``addprocs_slurm``).

    srun --input=all --label ... sh -c 'echo distexec_slurm_task:...; exec "$@"'
         python -m distexec worker --bind-to 0.0.0.0 --die-with-stdin --separate-stderr
      stdin  ◄── the cookie line, which --input=all broadcasts to every task; kept open, so
                 its EOF (the master is gone) makes every worker exit
      stdout ──► reader thread ──► "K: distexec_slurm_task:JOB:STEP:N:OSPID:NODE"  task K
                               ──► "K: distexec_worker:PORT#ADDR"  task K's address
                               ──► other lines: startup chatter, then "From worker PID:"
      stderr ──► reader thread ──► "K: ..." task K's stderr: startup chatter, then relayed
                               ──► srun's own messages: kept for LaunchWorkerError, logged

Inside an allocation (``SLURM_JOB_ID`` set, as under ``salloc`` or ``sbatch``) the step runs
in it and ``ntasks`` defaults to ``SLURM_NTASKS``; outside, ``srun`` asks Slurm for a job of
its own, which ends with the step. The manager cancels only what it started: its own job, or
its own step of the user's allocation, never the allocation.

Bind address: workers may run on any node of the allocation and must be reachable from the
master and from each other, so by default they listen on every interface (``0.0.0.0``) and
the master connects to the address of the node each task reports (Slurm's ``NodeAddr``,
resolved on the master). The ``bind_to`` keyword of ``addprocs`` chooses another address
(``bind_to="127.0.0.1"`` when the master and every task share one machine); a worker that
reports a specific address is reached at that address.
"""

from __future__ import annotations

import collections
import copy
import functools
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import LaunchWorkerError
from . import console
from .launch import ADDRESS_LINE, MAX_STARTUP_LINES, worker_timeout
from .local import worker_environment
from .manager import ClusterManager, WorkerConfig, default_addprocs_params
from .security import worker_flags, worker_stdin

log = logging.getLogger("distexec")

SRUN = "srun"
SCANCEL = "scancel"
SINFO = "sinfo"

_RELAY_PREFIX = "      From worker "
_TASK_LINE = re.compile(r"^\s*(\d+): ?(.*)$")
_IDENTITY = re.compile(r"^distexec_slurm_task:(\d*):([^:]*):(\d*):(\d+):(.*)$")
_IDENTIFY_SCRIPT = ('echo "distexec_slurm_task:${SLURM_JOB_ID}:${SLURM_STEP_ID}:'
                    '${SLURM_STEP_NUM_TASKS:-$SLURM_NTASKS}:$$:${SLURMD_NODENAME}"; exec "$@"')
_JOB_ANNOUNCED = re.compile(r"^srun: job (\d+) (?:queued|has been allocated)")
_TASK_FAILED = re.compile(r"^srun: error: \S+: tasks? [\d,\-\[\]]+: ")
_WILDCARDS = ("0.0.0.0", "::", "")
# Options the manager sets itself: changing them would break reading the tasks' output.
_RESERVED = {"input", "output", "label", "pty"}
# Options that shape a step of several tasks, which one replacement task cannot keep.
_LAYOUT = {"nodes", "nodelist", "nodefile", "relative", "ntasks_per_node", "ntasks_per_socket",
           "ntasks_per_core", "ntasks_per_gpu", "ntasks_per_tres"}
_HELPER_TIMEOUT = 30.0


class SlurmManager(ClusterManager):
    """Starts workers as the ``ntasks`` tasks of one ``srun`` step.

    Every keyword besides ``ntasks`` is an ``srun`` option: ``partition="debug"`` becomes
    ``--partition=debug``, ``cpus_per_task=2`` becomes ``--cpus-per-task=2``, ``True`` a bare
    flag (``overlap=True`` is ``--overlap``); ``None`` and ``False`` leave it out.

    Inside an allocation every ``addprocs`` is a new step of it; a step's CPUs are its own
    until it ends, so a second one waits for free CPUs unless given ``overlap=True``.
    ``DISTEXEC_WORKER_TIMEOUT`` (60 s) bounds the whole launch, time in the queue included:
    raise it on a busy cluster. A launch that fails or times out cancels the job (or, inside
    an allocation, the step) it started and raises ``LaunchWorkerError`` with srun's messages.

    Args:
        ntasks: number of workers. Default: ``SLURM_NTASKS`` inside an allocation, else
            whatever ``srun`` starts for the other options (one task unless ``nodes`` etc.).
        **srun_options: further ``srun`` options (``partition``, ``time``, ``nodes`` ...).

    Julia: ``SlurmManager(np)`` / ``addprocs_slurm(np; kw...)`` of ClusterManagers.jl.
    """

    def __init__(self, ntasks: int | None = None, **srun_options: Any) -> None:
        if ntasks is not None and (isinstance(ntasks, bool) or not isinstance(ntasks, int)
                                   or ntasks < 1):
            raise ValueError(f"ntasks must be a positive int or None, got {ntasks!r}")
        reserved = sorted(_RESERVED.intersection(map(_option_name, srun_options)))
        if reserved:
            raise ValueError(f"srun option(s) {reserved} are set by SlurmManager itself")
        self.ntasks = ntasks
        self.srun_options = dict(srun_options)

    def __repr__(self) -> str:
        args = [f"ntasks={self.ntasks!r}"] if self.ntasks is not None else []
        args += [f"{key}={value!r}" for key, value in self.srun_options.items()]
        return f"SlurmManager({', '.join(args)})"

    def default_addprocs_params(self) -> dict:
        return {**default_addprocs_params(), "bind_to": "0.0.0.0"}

    def launch(self, params: dict, launched: list[WorkerConfig],
               launch_ntfy: threading.Condition) -> None:
        env = worker_environment(params, self._cpus_per_task())
        step = _Step.start(self.srun_command(params, env), env, self._owns_job(env),
                           float(params["exit_timeout"]))
        try:
            step.wait_for_addresses(self.ntasks or _allocation_ntasks(env))
            _translate_wildcards(step)
        except BaseException:
            step.abandon()  # idempotent: after a failed wait the step has already ended
            raise
        for task in step.ordered_tasks():
            assert task.address is not None  # ordered_tasks() lists tasks with an address
            host, port = task.address
            config = WorkerConfig(host=host, port=port, bind_addr=host,
                                  enable_threaded_blas=params["enable_threaded_blas"],
                                  userdata={"relay": task, "slurm_step": step},
                                  environ={"exit_timeout": params["exit_timeout"]})
            with launch_ntfy:
                launched.append(config)
                launch_ntfy.notify()

    def srun_command(self, params: dict, env: dict) -> list[str]:
        """The ``srun`` command line that starts the workers (for ``params`` of addprocs)."""
        options = {"job_name": "distexec", **self.srun_options, "chdir": params["dir"]}
        ntasks = self.ntasks or _allocation_ntasks(env)
        if ntasks is not None:
            options["ntasks"] = ntasks
        exeflags = params["exeflags"]
        exeflags = [exeflags] if isinstance(exeflags, str) else list(exeflags)
        worker = [str(params["exename"]), *exeflags, "-m", "distexec", "worker",
                  "--bind-to", str(params.get("bind_to") or "0.0.0.0"), "--die-with-stdin",
                  "--separate-stderr", *worker_flags(params.get("security"))]
        # --kill-on-bad-exit=0 and --wait=0 whatever the site's defaults: one worker that
        # exits (rmprocs, a crash) must not take the other tasks of the step with it.
        # No --unbuffered: with it srun labels every chunk a task writes as a line of its
        # own; line-buffered, each line arrives whole and as soon as it ends.
        return [*_die_with_master(), SRUN, *_option_flags(options), "--kill-on-bad-exit=0",
                "--wait=0", "--input=all", "--label",
                "sh", "-c", _IDENTIFY_SCRIPT, "distexec-worker", *worker]

    def _cpus_per_task(self) -> int:
        """The CPUs Slurm gives each task, the workers' thread limit: ``cpus_per_task``, else
        the allocation's ``SLURM_CPUS_PER_TASK``, else 1 (Slurm's default)."""
        given = {_option_name(k): v for k, v in self.srun_options.items()}.get("cpus_per_task")
        try:
            return max(1, int(given or os.environ.get("SLURM_CPUS_PER_TASK") or 1))
        except ValueError:
            return 1

    def _owns_job(self, env: dict) -> bool:
        """Whether srun will ask for a job of its own (rather than use an existing one)."""
        return not (env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
                    or self.srun_options.get("jobid"))

    def replacement(self, config: WorkerConfig) -> SlurmManager | None:
        """A copy of this manager that starts one task like the one ``config`` describes.

        The same srun options, less those that lay out several tasks (``nodes``,
        ``nodelist``, ``ntasks_per_node`` ...): one task on one node. Inside an allocation
        it is a step of the same one (``jobid``), on the node of the task it replaces,
        with ``overlap`` (that task's step keeps its CPUs until all its tasks end) and so
        without ``exclusive``. When this manager asked Slurm for a job, the replacement
        asks for one of its own, for one task; it stays on the old task's node only if a
        ``nodelist`` or ``nodefile`` confined the original. None for a config that no
        SlurmManager launched.
        """
        step, task = _step_and_task(config)
        if step is None:
            return None
        # An option set to None or False gives no flag (_option_flags): it confines nothing.
        given = {_option_name(k) for k, v in self.srun_options.items()
                 if v is not None and v is not False}
        dropped = set(_LAYOUT)
        if not step.owns_job:
            dropped |= {"exclusive", "overlap"} | ({"jobid"} if step.job_id else set())
        options = {k: v for k, v in self.srun_options.items() if _option_name(k) not in dropped}
        node = task.node if task is not None else None
        if not step.owns_job:
            options.update(overlap=True, **({"jobid": step.job_id} if step.job_id else {}))
        elif not given & {"nodelist", "nodefile"}:
            node = None  # a job of its own goes wherever Slurm finds room
        options["nodes"] = 1
        if node is not None:
            options["nodelist"] = node
        clone = copy.copy(self)
        clone.ntasks, clone.srun_options = 1, options
        return clone

    def manage(self, pid: int, config: WorkerConfig, op: str) -> None:
        step, task = _step_and_task(config)
        if task is None:
            return
        if op == "interrupt":
            if step.job_id is None or task.os_pid is None:
                log.warning("Worker %d cannot be presently interrupted.", pid)
            elif not step.signal(task, "INT"):
                log.warning("Error sending a Ctrl-C to worker %d on %s", pid, task.node)
        elif op == "deregister":
            step.task_gone(task)

    def kill(self, pid: int, config: WorkerConfig) -> None:
        step, task = _step_and_task(config)
        if task is None:
            return super().kill(pid, config)
        if config.os_pid is None:  # never joined: nothing to ask politely
            step.signal(task, "KILL")
            step.task_gone(task)
            return
        super().kill(pid, config)
        threading.Thread(target=step.escalate, args=(pid, task), daemon=True,
                         name=f"distexec-kill-{pid}").start()


def _step_and_task(config: WorkerConfig):
    userdata = config.userdata if isinstance(config.userdata, dict) else {}
    return userdata.get("slurm_step"), userdata.get("relay")


def _option_name(key: str) -> str:
    """An srun option keyword in one spelling: ``--cpus-per-task`` -> ``cpus_per_task``."""
    return key.lstrip("-").replace("-", "_")


def _allocation_ntasks(env: dict) -> int | None:
    """``SLURM_NTASKS`` of the enclosing allocation, when there is one."""
    if not env.get("SLURM_JOB_ID"):
        return None
    value = env.get("SLURM_NTASKS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def _option_flags(options: dict) -> list[str]:
    flags = []
    for key, value in options.items():
        if value is None or value is False:
            continue
        name = "--" + key.lstrip("-").replace("_", "-")
        flags.append(name if value is True else f"{name}={value}")
    return flags


@functools.cache
def _die_with_master() -> tuple[str, ...]:
    """``setpriv --pdeathsig TERM`` when it works here: srun ends when the master dies.

    On SIGTERM srun withdraws a job request still waiting in the queue, or cancels its
    running step; the workers would notice the master's death anyway, but a queued job
    would wait for resources first. Without util-linux's setpriv (>= 2.33) this is skipped.
    Linux sends the signal when the forking *thread* ends: srun is started on the cluster's
    long-lived launcher thread.
    """
    prefix = (shutil.which("setpriv") or "setpriv", "--pdeathsig", "TERM")
    try:
        works = subprocess.run([*prefix, "true"], stdin=subprocess.DEVNULL,
                               capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        works = False
    return prefix if works else ()


def _helper_env() -> dict:
    """Environment for srun/scancel helpers: no SLURM_* settings of an enclosing allocation.

    Those (SLURM_NTASKS, SLURM_CPUS_PER_TASK ...) would be read as options of the helper.
    """
    return {k: v for k, v in os.environ.items()
            if not k.startswith("SLURM_") or k == "SLURM_CONF"}


def _run_helper(cmd: list[str]) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              env=_helper_env(), timeout=_HELPER_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("%s failed: %s", cmd[0], exc)
        return None


# --------------------------------------------------------------------------------------------
# one srun step
# --------------------------------------------------------------------------------------------
@dataclass(eq=False)
class _Task:
    """One task of the step: where it runs and, once the master knows it, its worker pid.

    Sits in ``config.userdata["relay"]``, where ``create_worker`` sets ``pid``.
    """

    index: int
    node: str | None = None
    os_pid: int | None = None
    address: tuple[str, int] | None = None
    pid: int | None = None
    startup: list[str] = field(default_factory=list)
    prefix: str = field(default_factory=console.resolve_prefix)
    gone: threading.Event = field(default_factory=threading.Event)


class _Step:
    """One ``srun`` process and its tasks, from launch until the step has ended."""

    def __init__(self, process: subprocess.Popen, owns_job: bool, exit_timeout: float):
        self.process = process
        self.owns_job = owns_job
        self.exit_timeout = exit_timeout
        self.job_id: str | None = None
        self.step_id: str | None = None
        self.ntasks: int | None = None
        self.tasks: dict[int, _Task] = {}
        self.errors: collections.deque[str] = collections.deque(maxlen=30)
        self.failed: list[str] = []
        self.output_closed = False
        self.launched = False
        self.finishing = False
        self.cond = threading.Condition()

    @classmethod
    def start(cls, cmd: list[str], env: dict, owns_job: bool, exit_timeout: float) -> _Step:
        """Start ``srun``, hand it the cookie, and start reading its output."""
        from ..runtime.context import current_context
        if shutil.which(SRUN, path=env.get("PATH", os.defpath)) is None:
            raise LaunchWorkerError(f"Unable to start {SRUN!r}: not found on PATH "
                                    "(is Slurm installed on this machine?)")
        try:
            process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, env=env, start_new_session=True)
        except OSError as exc:
            raise LaunchWorkerError(f"Unable to start {SRUN!r}: {exc}") from exc
        step = cls(process, owns_job, exit_timeout)
        for target, name in ((step._read_stdout, "distexec-srun-out"),
                             (step._read_stderr, "distexec-srun-err")):
            threading.Thread(target=target, name=name, daemon=True).start()
        try:
            ctx = current_context()  # the cookie (and TLS) line, broadcast to every task
            assert process.stdin is not None  # stdin=PIPE
            process.stdin.write(worker_stdin(ctx.cookie, ctx.security))
            process.stdin.flush()  # stays open: its EOF tells every task the master is gone
        except OSError:  # srun already exited: its output says why
            pass
        return step

    # ---- reading srun's output ------------------------------------------------------------
    def _read_stdout(self) -> None:
        stream = self.process.stdout
        assert stream is not None  # stdout=PIPE
        try:
            for raw in iter(stream.readline, b""):
                line = raw.decode(errors="replace").rstrip("\r\n")
                match = _TASK_LINE.match(line)
                if match:
                    self._on_task_line(int(match.group(1)), match.group(2))
                else:  # srun labels every task line: anything else is srun's own
                    self._on_error_line(line)
        except (ValueError, OSError):
            pass
        finally:
            with self.cond:
                self.output_closed = True
                self.cond.notify_all()
            stream.close()

    def _on_task_line(self, index: int, text: str, is_stderr: bool = False) -> None:
        with self.cond:
            task = self.tasks.setdefault(index, _Task(index))
            if task.address is not None:
                relay = True
            else:
                relay = False
                if is_stderr:  # kept for LaunchWorkerError too: why a task could not start
                    task.startup.append(text)
                    self.errors.append(f"{index}: {text}")
                else:
                    self._on_startup_line(task, text)
                self.cond.notify_all()
        if relay:
            _relay(task, text, is_stderr)

    def _on_startup_line(self, task: _Task, text: str) -> None:
        identity = _IDENTITY.match(text)
        address = ADDRESS_LINE.match(text)
        if identity:
            job, step, ntasks, os_pid, node = identity.groups()
            self.job_id = self.job_id or job or None
            self.step_id = self.step_id or step or None
            if ntasks.isdigit():
                self.ntasks = self.ntasks or int(ntasks)
            task.os_pid, task.node = int(os_pid), node
        elif address:
            task.address = (address.group(2), int(address.group(1)))
        else:
            task.startup.append(text)

    def _read_stderr(self) -> None:
        stream = self.process.stderr
        assert stream is not None  # stderr=PIPE
        try:
            for raw in iter(stream.readline, b""):
                line = raw.decode(errors="replace").rstrip("\r\n")
                match = _TASK_LINE.match(line)
                if match:  # a task's stderr (the worker keeps it apart: --separate-stderr)
                    self._on_task_line(int(match.group(1)), match.group(2), is_stderr=True)
                else:
                    self._on_error_line(line)
        except (ValueError, OSError):
            pass
        finally:
            stream.close()

    def _on_error_line(self, line: str) -> None:
        if not line:
            return
        log.info("%s", line)
        with self.cond:
            self.errors.append(line)
            announced = _JOB_ANNOUNCED.match(line)
            if announced and self.job_id is None:
                self.job_id = announced.group(1)
            if not self.launched and _TASK_FAILED.match(line):
                self.failed.append(line)
            self.cond.notify_all()

    # ---- launch ---------------------------------------------------------------------------
    def wait_for_addresses(self, expected: int | None) -> None:
        """Block until every task has reported its address; on failure end the step, raise."""
        timeout = worker_timeout()
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                problem = self._launch_problem(expected)
                if problem is None:
                    self.launched = True
                    break
                if problem:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    problem = "Timed out waiting to read host:port string from worker."
                    break
                self.cond.wait(left)
            ready = self._ready_count()
        self._print_startup_lines()
        if problem is not None:
            message = self._failure_message(problem, expected, ready)
            self.abandon()
            raise LaunchWorkerError(message)

    def _launch_problem(self, expected: int | None) -> str | None:
        """None once every task is ready; a message when launching failed; "" to keep waiting."""
        wanted = expected or self.ntasks
        if wanted is not None and self._ready_count() >= wanted:
            return None
        if self.failed or self.output_closed:
            return "Unable to read host:port string from worker. Launch command exited with error?"
        if any(len(t.startup) >= MAX_STARTUP_LINES for t in self.tasks.values()):
            return "Unexpected output from worker launch command. Host:port string not found."
        return ""

    def _ready_count(self) -> int:
        return sum(1 for t in self.tasks.values() if t.address is not None)

    def _failure_message(self, problem: str, expected: int | None, ready: int) -> str:
        try:  # srun closed its output: its exit status is a moment away
            code = self.process.wait(2) if self.output_closed else self.process.poll()
        except subprocess.TimeoutExpired:
            code = None
        wanted = expected or self.ntasks
        facts = [f"srun exit status {code}"] if code is not None else []
        if wanted is not None:
            facts.append(f"{ready} of {wanted} Slurm tasks reported an address")
        detail = f" ({'; '.join(facts)})" if facts else ""
        tail = "".join(f"\n    {line}" for line in list(self.errors)[-15:])
        return f"{problem}{detail}" + (f"\nsrun said:{tail}" if tail else "")

    def _print_startup_lines(self) -> None:
        for task in self.ordered_tasks(all_tasks=True):
            for line in task.startup[-MAX_STARTUP_LINES:]:
                print(f"\tFrom worker startup:\t[task {task.index}] {line}", flush=True)
            task.startup.clear()

    def ordered_tasks(self, all_tasks: bool = False) -> list[_Task]:
        with self.cond:
            return [t for _, t in sorted(self.tasks.items())
                    if all_tasks or t.address is not None]

    # ---- signals and the end of the step --------------------------------------------------
    def signal(self, task: _Task, sig: str) -> bool:
        """Send ``sig`` (``INT``, ``TERM``, ``KILL``) to one task's worker; True on success.

        A new step with ``--overlap`` shares the running step's resources, on the task's node.
        """
        if self.job_id is None or task.os_pid is None or task.node is None:
            return False
        result = _run_helper([SRUN, "--overlap", f"--jobid={self.job_id}",
                              f"--nodelist={task.node}", "--nodes=1", "--ntasks=1", "--quiet",
                              "sh", "-c", f"kill -s {sig} {task.os_pid}"])
        if result is not None and result.returncode != 0:
            log.info("signalling task %d: %s", task.index, result.stderr.strip())
        return result is not None and result.returncode == 0

    def escalate(self, pid: int, task: _Task) -> None:
        """After the polite exit request: wait, SIGTERM, wait, SIGKILL; log each step."""
        if task.gone.wait(self.exit_timeout):
            return
        log.warning("Failed to gracefully kill worker %d, sending SIGTERM", pid)
        self.signal(task, "TERM")
        if task.gone.wait(self.exit_timeout):
            return
        log.warning("Worker %d ignored SIGTERM, sending SIGKILL", pid)
        self.signal(task, "KILL")

    def task_gone(self, task: _Task) -> None:
        """A task's worker left; once all have, make sure srun (and the step) ends."""
        task.gone.set()
        with self.cond:
            if self.finishing or not all(t.gone.is_set() for t in self.ordered_tasks()):
                return
            self.finishing = True
        threading.Thread(target=self._finish, daemon=True, name="distexec-srun-end").start()

    def _finish(self) -> None:
        try:
            self.process.wait(self.exit_timeout)
        except subprocess.TimeoutExpired:
            log.warning("srun (job %s) still runs after its workers left: cancelling it",
                        self.job_id)
            self.abandon()
            return
        _close_quietly(self.process.stdin)

    def abandon(self) -> None:
        """End the step now: scancel what this manager started, then srun itself.

        Nothing to cancel once srun has exited: its job or step ended with it.
        """
        target = self._cancel_target()
        if target is not None and self.process.poll() is None:
            _run_helper([SCANCEL, "--quiet", target])
        if self.process.poll() is None:
            self.process.terminate()  # srun cancels a pending job request on SIGTERM
        try:
            self.process.wait(self.exit_timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        _close_quietly(self.process.stdin)

    def _cancel_target(self) -> str | None:
        """Our own job; inside the user's allocation only our own step, never the job."""
        if self.job_id is None:
            return None
        if self.owns_job:
            return self.job_id
        return f"{self.job_id}.{self.step_id}" if self.step_id else None


def _relay(task: _Task, text: str, is_stderr: bool) -> None:
    prefix = console.label(task.prefix, task.pid) if task.pid is not None \
        else f"{_RELAY_PREFIX}(Slurm task {task.index}):\t"
    console.console.line(sys.stderr if is_stderr else sys.stdout, (id(task), is_stderr),
                         prefix, text)


def _close_quietly(stream) -> None:
    try:
        if stream is not None:
            stream.close()
    except (ValueError, OSError):
        pass


# --------------------------------------------------------------------------------------------
# addresses
# --------------------------------------------------------------------------------------------
def _translate_wildcards(step: _Step) -> None:
    """Replace a worker's wildcard address (it listens everywhere) by its node's address."""
    tasks = [t for t in step.ordered_tasks() if t.address is not None
             and t.address[0] in _WILDCARDS]
    if not tasks:
        return
    addresses = _node_addresses(sorted({t.node for t in tasks if t.node}))
    for task in tasks:
        assert task.address is not None  # ordered_tasks() lists tasks with an address
        wildcard, port = task.address
        family = socket.AF_INET6 if ":" in wildcard else socket.AF_INET
        name = addresses.get(task.node or "", task.node or "localhost")
        task.address = (_resolve(name, family), port)


def _node_addresses(nodes: list[str]) -> dict[str, str]:
    """Slurm's ``NodeAddr`` of each node (the name Slurm itself reaches the node by)."""
    if not nodes:
        return {}
    result = _run_helper([SINFO, "--noheader", "--Node", f"--nodes={','.join(nodes)}",
                          "--format=%N %o"])
    addresses = {}
    if result is not None and result.returncode == 0:
        for line in result.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2:
                addresses[parts[0]] = parts[1]
    return addresses


def _resolve(name: str, family: int) -> str:
    try:
        # an AF_INET/AF_INET6 sockaddr: the host is a string
        return str(socket.getaddrinfo(name, None, family, socket.SOCK_STREAM)[0][4][0])
    except OSError:  # leave it to the connection attempt to say what is wrong
        return name
