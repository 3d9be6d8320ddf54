"""Executors inside tasks: a task on a worker that makes a ``DistributedExecutor`` or a
``distexec.Pool`` gets workers of its own, children of that worker, as a
``ProcessPoolExecutor`` task that makes a pool does; they go away when it shuts down, and
die with that worker, also when the top-level master is killed. ``distexec.addprocs`` inside
a worker still refuses (only process 1 adds workers to a cluster).

The user's programs (``squares_program``, ``pool_program``) are written once and run under
distexec and under the standard library.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import psutil
import pytest

import distexec
from tests.helpers import launcher_of, local_workers_of, reap, wait_gone, wait_until

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]

_kept: list = []  # on a worker: executors a task made and left running


# -- the user's programs: module-level, so the workers import them by name ------------------
def square(x):
    return x * x


def meet(barrier, x):
    """Wait until the other task is running too (so each ran on a process of its own)."""
    barrier.wait(timeout=30)
    return x * x, os.getpid(), launcher_of(os.getpid())


def squares_program(executor_class, barrier, n):
    """A task that makes an executor of its own, maps over it, and shuts it down."""
    with executor_class(2) as ex:
        met = list(ex.map(meet, [barrier, barrier], [0, 1]))
        return os.getpid(), met, list(ex.map(square, range(n)))


def pool_program(pool_class, barrier, n):
    with pool_class(2) as pool:
        met = pool.starmap(meet, [(barrier, 0), (barrier, 1)], chunksize=1)
        return os.getpid(), met, pool.map(square, range(n))


def children_of_this_process():
    """The local workers this process launched (children, or its template's children)."""
    return local_workers_of(psutil.Process())


def start_and_keep(n):
    """Make an executor and leave it running; its workers' OS pids."""
    ex = distexec.DistributedExecutor(n)
    _kept.append(ex)
    return children_of_this_process()


def executor_on_other_threads(n):
    """Make the executor on one thread of the task, use it from another."""
    made: cf.Future = cf.Future()

    def make():
        try:
            made.set_result(distexec.DistributedExecutor(2))
        except BaseException as exc:
            made.set_exception(exc)
    threading.Thread(target=make).start()
    ex = made.result(timeout=60)
    with cf.ThreadPoolExecutor(1) as threads:
        results = threads.submit(lambda: list(ex.map(square, range(n)))).result(timeout=60)
    ex.shutdown()
    return results


def send_outer_channel(channel):
    """Pass a RemoteChannel of the outer cluster to a task of the task's own executor."""
    with distexec.DistributedExecutor(1) as ex:
        try:
            ex.submit(channel.put, 1).result(60)
        except distexec.DistributedError as exc:
            return str(exc)
    return None


def julia_view_and_addprocs():
    """What the worker's own Julia-style functions see once a task made an executor."""
    before = distexec.myid(), distexec.procs()
    with distexec.DistributedExecutor(1) as ex:
        assert ex.submit(square, 3).result() == 9
        during = distexec.myid(), distexec.procs()
    try:
        distexec.addprocs(1)
    except distexec.DistributedError as exc:
        refused = str(exc)
    else:
        refused = None
    return before, during, refused


# -- tests ---------------------------------------------------------------------------------
def _check_nested_run(result, n):
    """A nested run's answer, and its two inner workers: processes of their own, children of
    the (outer) worker that ran the task, itself a child of this process. Returns their pids."""
    owner, met, squares = result
    assert squares == [x * x for x in range(n)]
    assert sorted(value for value, _, _ in met) == [0, 1]
    inner = {pid for _, pid, _ in met}
    assert len(inner) == 2 and owner not in inner
    assert {parent for _, _, parent in met} == {owner}
    assert launcher_of(owner) == os.getpid()
    return inner


@pytest.mark.parametrize("outer_class, program, inner_class", [
    (distexec.DistributedExecutor, squares_program, distexec.DistributedExecutor),
    (cf.ProcessPoolExecutor, squares_program, cf.ProcessPoolExecutor),
    (distexec.DistributedExecutor, pool_program, distexec.Pool),
    (cf.ProcessPoolExecutor, pool_program, mp.Pool),
], ids=["distexec-executor", "ProcessPoolExecutor", "distexec-Pool", "multiprocessing-Pool"])
def test_a_task_makes_an_executor_or_pool_of_its_own(outer_class, program, inner_class):
    with mp.Manager() as manager, outer_class(2) as outer:
        result = outer.submit(program, inner_class, manager.Barrier(2), 20).result(60)
        inner = _check_nested_run(result, 20)
    wait_gone(inner)


def _os_pid_of_only_worker(executor) -> int:
    """The OS pid of the executor's one worker (the test process may have other children)."""
    (pid,) = executor.workers()
    return distexec.remotecall_fetch(os.getpid, pid)


def test_workers_a_task_left_running_exit_when_the_outer_executor_shuts_down():
    with distexec.DistributedExecutor(1) as outer:
        owner = _os_pid_of_only_worker(outer)
        inner = outer.submit(start_and_keep, 2).result(60)
        assert len(inner) == 2
        assert {launcher_of(pid) for pid in inner} == {owner}
    wait_gone([owner, *inner])


def test_an_executor_made_and_used_on_other_threads_of_a_task():
    with distexec.DistributedExecutor(1) as outer:
        assert outer.submit(executor_on_other_threads, 10).result(60) == [
            x * x for x in range(10)]
        owner = _os_pid_of_only_worker(outer)
        wait_until(lambda: not local_workers_of(psutil.Process(owner)),
                   message="the task's workers to exit after its shutdown")


def test_addprocs_on_a_worker_still_refuses_and_the_worker_keeps_its_view():
    with distexec.DistributedExecutor(1) as outer:
        (pid,) = outer.workers()
        before, during, refused = outer.submit(julia_view_and_addprocs).result(60)
    assert before == during and before[0] == pid
    assert refused == "Only process 1 can add and remove workers"


def test_references_of_the_outer_cluster_do_not_cross_into_the_tasks_own():
    channel = distexec.RemoteChannel()
    with distexec.DistributedExecutor(1) as outer:
        refused = outer.submit(send_outer_channel, channel).result(60)
    assert refused == "a RemoteChannel can only be sent to processes of its cluster"
    assert not channel.isready()


USER_SCRIPT = """
    import json, sys
    import concurrent.futures as cf
    import distexec

    Executor = {"distexec": distexec.DistributedExecutor,
                "stdlib": cf.ProcessPoolExecutor}[sys.argv[1]]
    OFFSET = 100

    def shifted_square(x):
        return x * x + OFFSET

    def task(n):
        with Executor(2) as ex:
            return list(ex.map(shifted_square, range(n)))

    if __name__ == "__main__":
        with Executor(2) as ex:
            print(json.dumps(list(ex.map(task, [3, 5]))))
"""


def _script_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


@pytest.mark.parametrize("executor", ["distexec", "stdlib"])
def test_a_script_whose_tasks_make_executors_answers_as_under_a_process_pool(tmp_path,
                                                                             executor):
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent(USER_SCRIPT), encoding="utf-8")
    done = subprocess.run([sys.executable, str(script), executor], capture_output=True,
                          text=True, timeout=100, cwd=tmp_path, env=_script_env())
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [
        [100, 101, 104], [100, 101, 104, 109, 116]]


MASTER_SCRIPT = """
    import json, os, sys
    import distexec
    from tests.integration.test_nesting import start_and_keep

    if __name__ == "__main__":
        ex = distexec.DistributedExecutor(2)
        owners = [distexec.remotecall_fetch(os.getpid, pid) for pid in ex.workers()]
        started = [ex.submit(start_and_keep, 2) for _ in ex.workers()]  # one on each
        inner = [future.result(60) for future in started]
        print(json.dumps({"outer": owners, "inner": inner}), flush=True)
        sys.stdin.read()  # until the test kills us
"""


def test_every_worker_dies_when_the_top_level_master_is_killed(tmp_path):
    script = tmp_path / "master.py"
    script.write_text(textwrap.dedent(MASTER_SCRIPT), encoding="utf-8")
    master = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=tmp_path,
                              env=_script_env())
    try:
        assert master.stdout is not None
        line = master.stdout.readline()
        assert line, "the master script printed nothing"
        printed = json.loads(line)
        outer, inner = printed["outer"], [pid for pids in printed["inner"] for pid in pids]
        assert len(set(inner)) == 4 and not set(inner) & set(outer)
        assert {launcher_of(pid) for pid in inner} <= set(outer)
        master.send_signal(signal.SIGKILL)
        master.wait(10)
        wait_gone(outer + inner)
    finally:
        reap(master)
