"""SlurmManager against a real Slurm (slurmctld + slurmd, started by .ci/setup-slurm.sh).

Workers are the tasks of an ``srun`` step: from outside an allocation the manager gets a job
of its own, which ends when the workers are removed or the master dies; inside one (``salloc``)
it runs a step of that allocation and never cancels the allocation. Interrupts and the exit
escalation reach single tasks through ``srun --overlap``; a launch that fails says what Slurm
said. Tests that need Slurm skip, with the reason, when no Slurm cluster answers.
"""

from __future__ import annotations

import ctypes
import json
import logging
import collections
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import psutil
import pytest

import distexec as d
from distexec import LaunchWorkerError, ProcessExitedException, RemoteException
from distexec.cluster import membership
from distexec.cluster.slurm import SlurmManager, _Step, _Task
from distexec.runtime.context import current_context
from tests.docs_blocks import blocks_needing, problems, run_program
from tests.executor.helpers import mark_initialized, square
from tests.helpers import (assert_terminate_stops_a_sleeping_task, os_pid, wait_for_output,
                           wait_gone, wait_until)

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]
HELLO = Path(__file__).resolve().parents[2] / "examples" / "hello_cluster.py"
"""The program tests/managers/ runs unchanged on local, SSH and Slurm workers."""
JOB_END = 20.0
"""Seconds Slurm gets to forget a job whose tasks have all exited (KillWait and friends)."""


# --------------------------------------------------------------------------------------------
# helpers (the functions run on the workers are module-level so they pickle by reference)
# --------------------------------------------------------------------------------------------
def slurm_env() -> tuple[int, str | None, str | None, str | None]:
    return (os.getpid(), os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_STEP_ID"),
            os.environ.get("SLURM_PROCID"))


def signal_then_sleep(channel, seconds):
    channel.put("running")
    time.sleep(seconds)
    return "slept"


def hold_the_gil(seconds):
    """Sleep in C code without releasing the GIL: the worker cannot even read an exit request."""
    ctypes.PyDLL(None).sleep(seconds)


def own_cmdline() -> bytes:
    with open("/proc/self/cmdline", "rb") as f:
        return f.read()


def slurm_probe(seconds=0.0):
    """An executor task: (OS pid, SLURM_JOB_ID, SLURM_JOB_NAME, SLURMD_NODENAME, on the main
    thread?, what the initializer left there: ``(tag, OS pid)`` or None)."""
    import threading

    from tests.executor.helpers import initialized_in

    pid_here, mark = initialized_in(seconds)
    return (pid_here, os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_JOB_NAME"),
            os.environ.get("SLURMD_NODENAME"),
            threading.current_thread() is threading.main_thread(), mark)


def report_then_sleep(channel, seconds):
    """An executor task that says where it runs (``slurm_probe()``), then sleeps."""
    channel.put(slurm_probe())
    time.sleep(seconds)
    return "slept"


def kill_myself():
    os.kill(os.getpid(), signal.SIGKILL)


def job_state(job_id: str) -> str:
    """The job's state letters in squeue (``R``, ``CG`` ...), or "" once squeue lists it no more."""
    result = subprocess.run(["squeue", "--noheader", f"--jobs={job_id}", "--format=%t"],
                            capture_output=True, text=True, timeout=15)
    return result.stdout.strip()


def wait_job_gone(job_id: str, timeout: float = JOB_END) -> None:
    wait_until(lambda: job_state(job_id) == "", timeout, interval=0.2,
               message=f"Slurm job {job_id} to end")


def outside_env(**extra: str) -> dict[str, str]:
    """The environment for a child process that starts outside any Slurm allocation."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**env, **extra}


def run_script(cmd: list[str], timeout: float = 45, **extra_env: str):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=outside_env(**extra_env))


def report_of_script_in_allocation(tmp_path, name: str, text: str) -> dict:
    """Run ``text`` as a script under ``salloc --ntasks=2``; the dict it printed after REPORT."""
    script = tmp_path / name
    script.write_text(text)
    result = run_script(["salloc", "--ntasks=2", sys.executable, str(script)])
    lines = [line for line in result.stdout.splitlines() if line.startswith("REPORT ")]
    assert result.returncode == 0 and lines, result.stdout + result.stderr
    return json.loads(lines[0][len("REPORT "):])


@pytest.fixture
def slurm_workers(slurm):
    """Factory: ``slurm_workers(ntasks, **options)`` adds Slurm workers, removed after the test."""
    added: list[int] = []

    def add(ntasks=2, /, addprocs_params=None, **srun_options):
        pids = d.addprocs(SlurmManager(ntasks, **srun_options), **(addprocs_params or {}))
        added.extend(pids)
        return pids

    yield add
    alive = [p for p in added if p in d.procs()]
    if alive:
        d.rmprocs(alive, waitfor=20)


# --------------------------------------------------------------------------------------------
# the srun command (no workers started)
# --------------------------------------------------------------------------------------------
def test_srun_options_become_flags_and_the_cookie_stays_off_the_command_line():
    manager = SlurmManager(3, partition="debug", cpus_per_task=1, time="00:05:00",
                           exclusive=True, overlap=False, mem_per_cpu=None)
    params = manager.default_addprocs_params()
    cmd = manager.srun_command(params, {})
    assert "srun" in cmd
    for flag in ("--ntasks=3", "--partition=debug", "--cpus-per-task=1", "--time=00:05:00",
                 "--exclusive", "--input=all", "--label"):
        assert flag in cmd
    assert not any(f.startswith(("--overlap", "--mem-per-cpu")) for f in cmd)
    assert cmd[-7:] == ["-m", "distexec", "worker", "--bind-to", "0.0.0.0", "--die-with-stdin",
                        "--separate-stderr"]
    cookie = str(d.cluster_cookie())
    assert not any(cookie in part for part in cmd)


def test_with_tls_the_tasks_are_told_to_read_the_certificate_line():
    manager = SlurmManager(2)
    plain = manager.srun_command(manager.default_addprocs_params(), {})
    params = {**manager.default_addprocs_params(), "security": d.Security.temporary()}
    cmd = manager.srun_command(params, {})
    assert cmd[-7:] == [*plain[-6:], "--tls"]
    assert not any("PRIVATE KEY" in part for part in cmd)  # the key goes on stdin only


def test_inside_an_allocation_ntasks_defaults_to_slurm_ntasks():
    manager = SlurmManager()
    cmd = manager.srun_command(manager.default_addprocs_params(),
                               {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"})
    assert "--ntasks=4" in cmd
    assert not any(f.startswith("--ntasks") for f in manager.srun_command(
        manager.default_addprocs_params(), {}))


def _launched_config(owns_job: bool, job_id: str | None = "7", node: str | None = "n3"):
    """The WorkerConfig a SlurmManager launch leaves for one task (no srun started)."""
    step = _Step(None, owns_job, 1.0)
    step.job_id = job_id
    return d.WorkerConfig(userdata={"slurm_step": step, "relay": _Task(0, node=node)})


def _replacement_command(manager: SlurmManager, config) -> list[str]:
    replacement = manager.replacement(config)
    assert type(replacement) is SlurmManager and replacement.ntasks == 1
    return replacement.srun_command(replacement.default_addprocs_params(), {})


def test_a_replacement_in_an_allocation_is_one_overlapping_task_on_the_same_node():
    manager = SlurmManager(4, nodes=2, ntasks_per_node=2, nodelist="n[3-4]", exclusive=True,
                           cpus_per_task=2, partition="debug")
    cmd = _replacement_command(manager, _launched_config(owns_job=False))
    for flag in ("--ntasks=1", "--nodes=1", "--nodelist=n3", "--jobid=7", "--overlap",
                 "--cpus-per-task=2", "--partition=debug"):
        assert flag in cmd
    assert not any(f.startswith(("--ntasks-per-node", "--exclusive", "--nodelist=n[")) for f in cmd)
    assert manager.ntasks == 4 and manager.srun_options["nodes"] == 2  # the original is unchanged


def test_a_replacement_of_a_job_of_its_own_asks_for_one_task_anywhere():
    manager = SlurmManager(None, nodes=2, ntasks_per_node=2, time="00:05:00", exclusive=True)
    cmd = _replacement_command(manager, _launched_config(owns_job=True))
    for flag in ("--ntasks=1", "--nodes=1", "--time=00:05:00", "--exclusive"):
        assert flag in cmd
    assert not any(f.startswith(("--ntasks-per-node", "--nodelist", "--jobid", "--overlap"))
                   for f in cmd)
    confined = SlurmManager(2, **{"nodelist": "n[3-4]"})  # stays inside the nodes it was given
    assert "--nodelist=n3" in _replacement_command(confined, _launched_config(owns_job=True))


def test_a_replacement_of_a_replacement_still_goes_wherever_slurm_finds_room():
    """A recycled or replaced worker is replaced in turn: it must not get confined to a node."""
    replacement = SlurmManager(2, time="00:05:00").replacement(_launched_config(owns_job=True))
    again = _replacement_command(replacement, _launched_config(owns_job=True))
    assert "--time=00:05:00" in again
    assert not any(f.startswith("--nodelist") for f in again)
    unset = SlurmManager(2, nodelist=None)  # an option set to None is no --nodelist either
    assert not any(f.startswith("--nodelist")
                   for f in _replacement_command(unset, _launched_config(owns_job=True)))
    confined = SlurmManager(2, nodelist="n[3-4]").replacement(_launched_config(owns_job=True))
    assert "--nodelist=n3" in _replacement_command(confined, _launched_config(owns_job=True))


def test_only_a_config_of_a_slurm_launch_has_a_replacement():
    assert SlurmManager(2).replacement(d.WorkerConfig()) is None


@pytest.mark.parametrize("bad", [{"ntasks": 0}, {"ntasks": "2"}, {"input": "0"},
                                 {"label": True}, {"output": "x.log"}])
def test_invalid_arguments_are_refused(bad):
    with pytest.raises(ValueError):
        SlurmManager(**bad)


# --------------------------------------------------------------------------------------------
# workers from outside an allocation
# --------------------------------------------------------------------------------------------
def test_workers_are_the_tasks_of_one_job_of_their_own(slurm_workers):
    pids = slurm_workers(2)
    assert len(pids) == 2 and pids == sorted(pids)
    envs = [d.remotecall_fetch(slurm_env, p) for p in pids]
    job_ids = {job for _os_pid, job, _step, _task in envs}
    assert len(job_ids) == 1 and None not in job_ids
    assert sorted(task for *_rest, task in envs) == ["0", "1"]
    (job_id,) = job_ids
    assert job_state(job_id) == "R"
    assert [d.remotecall_fetch(d.myid, p) for p in pids] == pids
    assert d.remotecall_fetch(lambda: sum(range(10)), pids[1]) == 45


def test_rmprocs_removes_the_workers_and_the_job_ends(slurm_workers):
    pids = slurm_workers(2)
    envs = [d.remotecall_fetch(slurm_env, p) for p in pids]
    d.rmprocs(pids, waitfor=20)
    assert d.procs() == [1]
    wait_gone([os_pid for os_pid, *_ in envs])
    wait_job_gone(envs[0][1])


def test_the_cookie_reaches_the_tasks_only_on_stdin(slurm_workers):
    (pid,) = slurm_workers(1)
    cookie = str(d.cluster_cookie())
    assert cookie.encode() not in d.remotecall_fetch(own_cmdline, pid)
    assert cookie not in "".join(d.remotecall_fetch(lambda: list(os.environ.values()), pid))


def test_a_workers_thread_limit_is_the_cpus_slurm_gives_its_task(slurm_workers, monkeypatch):
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    (pid,) = slurm_workers(1)
    assert d.remotecall_fetch(os.getenv, pid, "OPENBLAS_NUM_THREADS") == "1"  # Slurm's default
    job_id = d.remotecall_fetch(slurm_env, pid)[1]
    d.rmprocs([pid], waitfor=20)
    wait_job_gone(job_id)  # its CPU is free again for the next job
    cpus = min(2, len(os.sched_getaffinity(0)))
    (pid,) = slurm_workers(1, cpus_per_task=cpus)
    assert d.remotecall_fetch(os.getenv, pid, "OMP_NUM_THREADS") == str(cpus)
    assert d.remotecall_fetch(os.getenv, pid, "SLURM_CPUS_PER_TASK") == str(cpus)


def test_worker_output_is_relayed_to_the_master(slurm_workers, capfd):
    (pid,) = slurm_workers(1)
    d.remotecall_fetch(print, pid, "hello", "through", "srun")  # several writes, one line
    wait_for_output(capfd, f"From worker {pid}:\thello through srun", consume=False)
    d.remotecall_fetch(_print_to_stderr, pid, "trouble through srun")
    err = wait_for_output(capfd, f"From worker {pid}:\ttrouble through srun", stream="err")
    assert "hello" not in err


def _script_view():
    main = sys.modules["__main__"]
    return sys.argv, getattr(main, "__file__", None)


def test_a_slurm_worker_sees_the_masters_argv_and_script_path(slurm_workers):
    (pid,) = slurm_workers(1)
    argv, main_file = d.remotecall_fetch(_script_view, pid)
    assert argv == sys.argv
    assert main_file == os.path.abspath(sys.modules["__main__"].__file__)


def _print_to_stderr(text):
    import sys
    print(text, file=sys.stderr, flush=True)


def test_ntasks_may_come_from_other_srun_options(slurm_workers):
    pids = slurm_workers(None, nodes=1, ntasks_per_node=2)
    tasks = sorted(d.remotecall_fetch(slurm_env, p)[3] for p in pids)
    assert tasks == ["0", "1"]


def test_a_worker_that_fails_leaves_the_other_tasks_running(slurm_workers, caplog):
    caplog.set_level(logging.INFO, logger="distexec")
    pids = slurm_workers(2)
    job_id = d.remotecall_fetch(slurm_env, pids[0])[1]
    d.remote_do(os._exit, pids[0], 3)  # a failed task: srun may be told to end the others
    wait_until(lambda: "task 0: Exited with exit code 3" in caplog.text, 10,
               message="srun to report the failed task")
    # Were the step ended on a bad exit (--kill-on-bad-exit, --wait), this call would fail.
    assert d.remotecall_fetch(lambda: time.sleep(1) or d.myid(), pids[1]) == pids[1]
    assert job_state(job_id) == "R"
    d.rmprocs(pids[1], waitfor=20)
    wait_job_gone(job_id)


def test_interrupt_reaches_a_busy_worker(slurm_workers):
    pids = slurm_workers(2)
    channel = d.RemoteChannel(1, 10)
    call = d.remotecall(signal_then_sleep, pids[0], channel, 30)
    assert channel.take(timeout=10) == "running"
    start = time.monotonic()
    d.interrupt(pids[0])
    with pytest.raises(RemoteException) as info:
        call.fetch(timeout=10)
    assert time.monotonic() - start < 5
    assert isinstance(info.value.captured.ex, KeyboardInterrupt)
    assert [d.remotecall_fetch(d.myid, p) for p in pids] == pids


def test_a_worker_that_ignores_the_exit_request_is_terminated(slurm_workers):
    (pid,) = slurm_workers(1, addprocs_params={"exit_timeout": 1.0})
    os_pid, job_id, *_ = d.remotecall_fetch(slurm_env, pid)
    d.remote_do(hold_the_gil, pid, 60)
    start = time.monotonic()
    d.rmprocs(pid, waitfor=15)
    assert time.monotonic() - start < 10
    wait_gone([os_pid])
    wait_job_gone(job_id)


def test_a_step_that_outlives_its_workers_is_cancelled(slurm_workers):
    (pid,) = slurm_workers(1, addprocs_params={"exit_timeout": 1.0})
    os_pid, job_id, *_ = d.remotecall_fetch(slurm_env, pid)
    # The task's process becomes `sleep`: its connection closes, the task itself runs on.
    d.remote_do(os.execv, pid, "/bin/sleep", ["sleep", "60"])
    wait_until(lambda: pid not in d.procs(), 10, message="the worker to leave")
    assert psutil.Process(os_pid).name() == "sleep"
    wait_job_gone(job_id)
    wait_gone([os_pid])


def test_a_replacement_starts_one_task_in_a_job_of_its_own(slurm_workers):
    ctx = current_context()
    (pid,) = slurm_workers(1, job_name="distexec-replaced")
    _os_pid, old_job, *_ = d.remotecall_fetch(slurm_env, pid)
    d.remote_do(os._exit, pid, 3)  # the task dies; its job ends with its only step
    wait_until(lambda: pid not in d.procs(), 10, message="the worker to leave")
    manager, config = membership.launched_by(ctx, pid)
    new = membership.addprocs(ctx, manager.replacement(config), {})
    try:
        assert len(new) == 1
        _os_pid, job, _step, task = d.remotecall_fetch(slurm_env, new[0])
        assert job not in (None, old_job) and task == "0"
        assert d.remotecall_fetch(lambda: os.environ["SLURM_STEP_NUM_TASKS"], new[0]) == "1"
        assert d.remotecall_fetch(d.myid, new[0]) == new[0]
    finally:
        d.rmprocs(new, waitfor=20)
    wait_job_gone(job)


# --------------------------------------------------------------------------------------------
# DistributedExecutor and Pool on Slurm workers
# --------------------------------------------------------------------------------------------
# The node of .ci/setup-slurm.sh has 2 CPUs, and a job holds all its CPUs until every one of its
# tasks has ended (docs/managers.md, "Replacement workers under Slurm"): a replacement of one
# task of a two-task job would wait in the queue for the whole job. So the tests that replace
# workers from outside an allocation use jobs of one task, whose CPU is free once that task
# dies; inside an allocation replacements are --overlap steps, tested with two tasks below.
@pytest.mark.timeout(90)
def test_an_executor_initializes_a_slurm_worker_and_replaces_it_when_killed(slurm):
    name = f"distexec-test-replaced-{os.getpid()}"
    with d.DistributedExecutor(manager=SlurmManager(1, job_name=name),
                               initializer=mark_initialized, initargs=("slurm",)) as executor:
        (first,) = executor.workers()
        remote, job, job_name, node, on_main, mark = \
            executor.submit(slurm_probe).result(timeout=30)
        assert job and node and job_name == name
        assert on_main and mark == ("slurm", remote)

        started = d.RemoteChannel(1, 10)
        running = executor.submit(report_then_sleep, started, 60)
        assert started.take(timeout=15)[0] == remote
        d.remote_do(kill_myself, first)
        with pytest.raises(ProcessExitedException) as info:
            running.result(timeout=20)
        assert isinstance(info.value, BrokenProcessPool)
        assert info.value.worker_id == first

        # Its job ended with its only task: the replacement is a one-task job of its own, with
        # the same srun options, on the node Slurm has room on (here the only one).
        (replacement,) = wait_until(lambda: [p for p in executor.workers() if p != first], 30,
                                    message=f"a replacement of worker {first}")
        new_remote, new_job, new_job_name, new_node, on_main, mark = \
            executor.submit(slurm_probe).result(timeout=30)
        assert new_remote == os_pid(replacement) != remote
        assert new_job not in (None, job) and (new_job_name, new_node) == (name, node)
        assert on_main and mark == ("slurm", new_remote)
    assert d.procs() == [1]
    wait_gone([remote, new_remote])
    wait_job_gone(job)
    wait_job_gone(new_job)


@pytest.mark.timeout(90)
def test_max_tasks_per_child_recycles_slurm_workers_with_the_same_options(slurm):
    name = f"distexec-test-recycled-{os.getpid()}"
    with d.DistributedExecutor(manager=SlurmManager(1, job_name=name), max_tasks_per_child=2,
                               initializer=mark_initialized, initargs=("recycled",)) as executor:
        outcomes = list(executor.map(slurm_probe, [0.0] * 6, timeout=60))
    assert d.procs() == [1]
    ran = collections.Counter(remote for remote, *_ in outcomes)
    assert sorted(ran.values()) == [2, 2, 2], ran  # three processes, two tasks each
    jobs = {remote: job for remote, job, *_ in outcomes}
    assert len(set(jobs.values())) == 3  # each one the task of a one-task job of its own
    nodes = set()
    for remote, job, job_name, node, on_main, mark in outcomes:
        assert job_name == name and on_main
        assert mark == ("recycled", remote)  # each replacement ran the initializer first
        nodes.add(node)
    assert len(nodes) == 1 and None not in nodes
    wait_gone(list(jobs))
    for job in set(jobs.values()):
        wait_job_gone(job)


@pytest.mark.timeout(90)
def test_a_pool_on_slurm_workers_maps_calls_back_and_terminates_a_sleeping_task(slurm):
    pool = d.Pool(initializer=mark_initialized, initargs=("pool",), manager=SlurmManager(2))
    try:
        workers = d.workers()
        assert len(workers) == 2
        remotes = [os_pid(p) for p in workers]
        assert pool.map(square, range(20)) == [x * x for x in range(20)]
        called: list = []
        applied = pool.apply_async(slurm_probe, (0.0,), callback=called.append)
        outcome = applied.get(timeout=20)
        assert called == [outcome]
        remote, job, _job_name, node, on_main, mark = outcome
        assert remote in remotes and job and node and on_main and mark == ("pool", remote)
        assert list(pool.imap(square, range(10))) == [x * x for x in range(10)]

        assert_terminate_stops_a_sleeping_task(pool, report_then_sleep)
    finally:
        pool.terminate()
        pool.join()
    assert d.procs() == [1]
    wait_gone(remotes)
    wait_job_gone(job)


# --------------------------------------------------------------------------------------------
# launch failures
# --------------------------------------------------------------------------------------------
def test_an_invalid_partition_fails_quickly_with_slurms_message(slurm):
    start = time.monotonic()
    with pytest.raises(LaunchWorkerError) as info:
        d.addprocs(SlurmManager(2, partition="no_such_partition"))
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "Launch command exited with error?" in message
    assert "invalid partition" in message.lower()
    assert d.procs() == [1]


def test_a_worker_program_that_cannot_start_fails_the_launch(slurm):
    with pytest.raises(LaunchWorkerError) as info:
        d.addprocs(SlurmManager(2), exename="/nonexistent/python")
    assert "Launch command exited with error?" in str(info.value)
    assert "/nonexistent/python" in str(info.value)
    assert d.procs() == [1]


def test_without_srun_the_launch_fails_with_the_reason(empty_cluster, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(LaunchWorkerError, match="Unable to start 'srun': not found"):
        d.addprocs(SlurmManager(1))


def test_workers_that_never_report_time_out_and_their_job_is_cancelled(monkeypatch, capfd, slurm):
    monkeypatch.setenv("DISTEXEC_WORKER_TIMEOUT", "2")
    script = ("import os, time; print('pid', os.getpid(), os.environ['SLURM_JOB_ID']); "
              "time.sleep(60)")
    start = time.monotonic()
    with pytest.raises(LaunchWorkerError) as info:
        d.addprocs(SlurmManager(2), exeflags=["-c", script])
    assert time.monotonic() - start < 15
    assert "Timed out waiting to read host:port string from worker." in str(info.value)
    out = capfd.readouterr().out
    started = [line.split()[-2:] for line in out.splitlines() if "From worker startup" in line]
    assert len(started) == 2, out
    wait_gone([int(os_pid) for os_pid, _job in started])
    wait_job_gone(started[0][1])


@pytest.fixture
def busy_cluster(slurm):
    """Every CPU taken by another job for the length of the test."""
    name = f"distexec-test-blocker-{os.getpid()}"
    blocker = subprocess.Popen(["srun", f"--job-name={name}", "--ntasks=2", "sleep", "60"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=outside_env())

    def running_job() -> str:
        result = subprocess.run(["squeue", "--noheader", f"--name={name}", "--states=R",
                                 "--format=%i"], capture_output=True, text=True, timeout=15)
        return result.stdout.strip()

    job_id = None
    try:
        job_id = wait_until(running_job, JOB_END, interval=0.1, message="the blocking job")
        yield
    finally:
        if job_id is not None:
            subprocess.run(["scancel", job_id], timeout=15)
        else:
            blocker.terminate()
        blocker.wait(JOB_END)
    wait_job_gone(job_id)


def test_a_job_still_queued_at_the_timeout_is_cancelled(monkeypatch, busy_cluster):
    monkeypatch.setenv("DISTEXEC_WORKER_TIMEOUT", "2")
    with pytest.raises(LaunchWorkerError) as info:
        d.addprocs(SlurmManager(2))
    message = str(info.value)
    assert "Timed out waiting to read host:port string from worker." in message
    assert "queued and waiting for resources" in message
    job_id = message.split("srun: job ", 1)[1].split()[0]
    wait_job_gone(job_id)


QUEUED_MASTER = textwrap.dedent("""
    import sys
    import distexec as d
    from distexec.cluster.slurm import SlurmManager

    d.addprocs(SlurmManager(2, job_name=sys.argv[1]))
""")


def test_a_master_killed_while_its_job_waits_in_the_queue_withdraws_it(tmp_path, busy_cluster):
    script = tmp_path / "queued.py"
    script.write_text(QUEUED_MASTER)
    name = f"distexec-test-queued-{os.getpid()}"
    master = subprocess.Popen([sys.executable, str(script), name], stdin=subprocess.DEVNULL,
                              cwd=REPO, env=outside_env())

    def pending_job() -> str:
        result = subprocess.run(["squeue", "--noheader", f"--name={name}", "--states=PD",
                                 "--format=%i"], capture_output=True, text=True, timeout=15)
        return result.stdout.strip()

    try:
        job_id = wait_until(pending_job, JOB_END, interval=0.1, message="the queued job")
        srun = [p.pid for p in psutil.Process(master.pid).children()]
    finally:
        master.kill()
        master.wait()
    assert srun
    wait_job_gone(job_id, timeout=5)
    wait_gone(srun)


# --------------------------------------------------------------------------------------------
# whole programs: inside an allocation, a master that dies, `distexec run --slurm`
# --------------------------------------------------------------------------------------------
INSIDE = textwrap.dedent("""
    import json, os, subprocess, sys
    import distexec as d
    from distexec.cluster.slurm import SlurmManager

    def env():
        return os.environ["SLURM_JOB_ID"], os.environ["SLURM_STEP_ID"]

    def job_state():
        return subprocess.run(["squeue", "-h", "-j", os.environ["SLURM_JOB_ID"], "-o", "%t"],
                              capture_output=True, text=True).stdout.strip()

    def steps():
        out = subprocess.run(["squeue", "-h", "-s", "-j", os.environ["SLURM_JOB_ID"], "-o", "%i"],
                             capture_output=True, text=True).stdout.split()
        return [s for s in out if not s.endswith((".extern", ".batch", ".interactive"))]

    pids = d.addprocs(SlurmManager(), exit_timeout=1.0)
    report = {"job": os.environ["SLURM_JOB_ID"], "pids": pids,
              "workers": [d.remotecall_fetch(env, p) for p in pids]}
    # One worker leaves politely; the other's task runs on as `sleep`, so the manager has
    # to cancel its step, and only its step.
    d.remote_do(os.execv, pids[0], "/bin/sleep", ["sleep", "60"])
    d.rmprocs(pids[1], waitfor=20)
    import time
    deadline = time.monotonic() + 20
    while steps() and time.monotonic() < deadline:
        time.sleep(0.2)
    report["steps_left"] = steps()
    report["state_after"] = job_state()
    print("REPORT", json.dumps(report), flush=True)
""")


def test_inside_an_allocation_the_workers_use_it_and_it_survives(tmp_path, slurm):
    report = report_of_script_in_allocation(tmp_path, "inside.py", INSIDE)
    assert len(report["pids"]) == 2  # SLURM_NTASKS of the allocation
    assert {job for job, _step in report["workers"]} == {report["job"]}
    assert report["steps_left"] == []
    assert report["state_after"] == "R"  # the allocation outlived the cancelled step
    wait_job_gone(report["job"])


REPLACED_INSIDE = textwrap.dedent("""
    import json, os
    import distexec as d
    from distexec.cluster import membership
    from distexec.cluster.slurm import SlurmManager
    from distexec.runtime.context import current_context

    def env():
        return (os.environ["SLURM_JOB_ID"], os.environ["SLURM_STEP_ID"],
                os.environ["SLURMD_NODENAME"])

    ctx = current_context()
    pids = d.addprocs(SlurmManager())  # every CPU of the allocation: one step of two tasks
    before = [d.remotecall_fetch(env, p) for p in pids]
    d.remote_do(os._exit, pids[0], 3)
    with ctx.lock:
        assert ctx.changed.wait_for(lambda: pids[0] not in ctx.peers, 20)
    manager, config = membership.launched_by(ctx, pids[0])
    new = membership.addprocs(ctx, manager.replacement(config), {})
    report = {"job": os.environ["SLURM_JOB_ID"], "pids": pids, "before": before, "new": new,
              "after": d.remotecall_fetch(env, new[0]), "myid": d.remotecall_fetch(d.myid, new[0]),
              "other": d.remotecall_fetch(d.myid, pids[1])}
    d.rmprocs(d.workers(), waitfor=20)
    print("REPORT", json.dumps(report), flush=True)
""")


def test_inside_an_allocation_a_replacement_is_a_step_of_it_on_the_same_node(tmp_path, slurm):
    report = report_of_script_in_allocation(tmp_path, "replaced.py", REPLACED_INSIDE)
    (job, step, node), (new_job, new_step, new_node) = report["before"][0], report["after"]
    assert (new_job, new_node) == (job, node) == (report["job"], node)
    assert new_step != step
    assert len(report["new"]) == 1 and report["myid"] == report["new"][0]
    assert report["other"] == report["pids"][1]  # the other original task runs on
    wait_job_gone(report["job"])


EXECUTOR_INSIDE = textwrap.dedent("""
    import json, os
    from concurrent.futures.process import BrokenProcessPool
    import distexec as d
    from distexec.cluster.slurm import SlurmManager
    from distexec.runtime.context import current_context
    from tests.executor.helpers import mark_initialized
    from tests.helpers import wait_until
    from tests.managers.test_slurm import kill_myself, report_then_sleep, slurm_probe

    def step():
        return os.environ["SLURM_STEP_ID"]

    ctx = current_context()
    with d.DistributedExecutor(manager=SlurmManager(), initializer=mark_initialized,
                               initargs=("alloc",)) as executor:
        first = executor.workers()  # every CPU of the allocation: one step of two tasks
        by_os_pid = {ctx.record(p).os_pid: p for p in first}
        started = d.RemoteChannel(1, 10)
        running = executor.submit(report_then_sleep, started, 60)
        before = started.take(timeout=15)
        victim = by_os_pid[before[0]]
        victim_step = d.remotecall_fetch(step, victim)
        d.remote_do(kill_myself, victim)
        try:
            running.result(timeout=20)
            error = None
        except BrokenProcessPool as exc:
            error = [type(exc).__name__, exc.worker_id]
        (new,) = wait_until(lambda: [p for p in executor.workers() if p not in first], 30,
                            message="a replacement")
        new_os_pid = ctx.record(new).os_pid
        seen = {}

        def landed():  # until a task ran on the replacement (the other worker takes some too)
            seen.update((o[0], o) for o in executor.map(slurm_probe, [0.01] * 4, timeout=30))
            return new_os_pid in seen

        wait_until(landed, 30, interval=0, message="a task on the replacement")
        report = {"job": os.environ["SLURM_JOB_ID"], "before": before, "victim": victim,
                  "victim_step": victim_step, "error": error, "new": new,
                  "new_step": d.remotecall_fetch(step, new), "after": seen[new_os_pid],
                  "workers": executor.workers(), "first": first}
    report["left"] = d.procs()
    print("REPORT", json.dumps(report), flush=True)
""")


def test_inside_an_allocation_an_executor_replaces_a_killed_worker_by_an_overlapping_step(
        tmp_path, slurm):
    report = report_of_script_in_allocation(tmp_path, "executor_inside.py", EXECUTOR_INSIDE)
    victim_os_pid, job, _name, node, on_main, mark = report["before"]
    assert job == report["job"] and on_main and mark == ["alloc", victim_os_pid]
    assert report["error"] == ["ProcessExitedException", report["victim"]]
    new_os_pid, new_job, _name, new_node, on_main, mark = report["after"]
    # a step of the same allocation, on the same node, beside the step the victim was in
    assert (new_job, new_node) == (job, node)
    assert report["new_step"] != report["victim_step"]
    assert on_main and mark == ["alloc", new_os_pid]
    assert sorted(report["workers"]) == sorted(
        [*(set(report["first"]) - {report["victim"]}), report["new"]])
    assert report["left"] == [1]
    wait_job_gone(report["job"])


MASTER = textwrap.dedent("""
    import json, os, sys
    import psutil
    import distexec as d
    from distexec.cluster.slurm import SlurmManager

    pids = d.addprocs(SlurmManager(2))
    workers = [d.remotecall_fetch(lambda: (os.getpid(), os.environ["SLURM_JOB_ID"]), p)
               for p in pids]
    srun = [p.pid for p in psutil.Process().children() if p.name() == "srun"]
    print(json.dumps({"workers": workers, "srun": srun}), flush=True)
    sys.stdin.read()  # until the test kills us
""")


def test_a_killed_master_takes_its_workers_and_job_with_it(tmp_path, slurm):
    script = tmp_path / "master.py"
    script.write_text(MASTER)
    master = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=REPO, env=outside_env())
    try:
        report = json.loads(master.stdout.readline())
    finally:
        master.kill()
        master.wait()
        master.stdin.close()
        master.stdout.close()
    worker_pids = [os_pid for os_pid, _job in report["workers"]]
    assert len(worker_pids) == 2 and len(report["srun"]) == 1
    wait_gone(worker_pids + report["srun"])
    wait_job_gone(report["workers"][0][1])


def test_the_same_script_runs_with_distexec_run_under_slurm(slurm):
    name = f"distexec-test-hello-{os.getpid()}"
    result = run_script([sys.executable, "-m", "distexec", "run",
                         f"--slurm=--ntasks=2 --job-name={name}", str(HELLO)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert len([line for line in result.stdout.splitlines()
                if line.startswith("hello from worker")]) == 2, result.stdout
    assert "2 workers, sum of squares 328350" in result.stdout
    # The script's workers were the tasks of a job of that name (Slurm lists a finished job
    # for MinJobAge seconds, and this one may still be finishing).
    listed = subprocess.run(["squeue", "--noheader", "--states=all", f"--name={name}",
                             "--format=%i"], capture_output=True, text=True, timeout=15)
    (job_id,) = listed.stdout.split()
    wait_job_gone(job_id)


# --------------------------------------------------------------------------------------------
# the docs' blocks marked <!-- needs: slurm --> (tests/integration/test_docs_snippets.py says how)
# --------------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
@pytest.mark.parametrize("block", blocks_needing("slurm"), ids=str)
def test_a_docs_block_that_needs_slurm_runs_and_prints_what_the_page_shows(block, slurm):
    outcome = run_program([block], timeout=100)
    found = problems([block], outcome)
    assert not found, "\n\n".join(found)
