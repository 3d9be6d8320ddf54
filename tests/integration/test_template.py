"""Local workers forked from the template process (distexec.cluster.template).

A forked worker is what a spawned one is to its user: it carries nothing of the master but
what a spawned worker gets (sys.path, environment, working directory), nothing of the
template or of its siblings (random state), survives its template, dies with its master
(also when its C code holds the GIL), and is replaced from the template when it dies. When
the template is gone or cannot give a worker what it asks for, workers are spawned.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

import distexec
from distexec.errors import ProcessExitedException
from tests.helpers import is_template, launcher_of, os_pid, reap, wait_gone, wait_until

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
MARK = "set by the master after the template started"


def parent_of(pid: int) -> psutil.Process:
    parent = psutil.Process(os_pid(pid)).parent()
    assert parent is not None
    return parent


def forked(pid: int) -> bool:
    """Whether worker ``pid`` was forked by a template (its parent is one)."""
    return is_template(parent_of(pid))


def template_of(pid: int) -> psutil.Process:
    parent = parent_of(pid)
    assert is_template(parent), f"worker {pid} was spawned, not forked"
    return parent


def what_a_worker_sees():
    main = sys.modules["__main__"]
    return {"random": random.random(), "main": sorted(k for k in vars(main) if k[0] != "_"),
            "json_mark": getattr(json, "MARK", None), "env": os.environ.get("TEMPLATE_TEST"),
            "cwd": os.getcwd(), "path": sys.path, "pid": os.getpid()}


@pytest.fixture
def warm(add_workers):
    """One worker, so that the template is running before the test changes the master."""
    (pid,) = add_workers(1)
    return pid


def test_forked_workers_carry_no_state_of_the_master(warm, add_workers, monkeypatch, tmp_path):
    random.seed(7)
    monkeypatch.setattr(json, "MARK", MARK, raising=False)
    monkeypatch.setenv("TEMPLATE_TEST", "the master's environment at launch")
    monkeypatch.syspath_prepend(str(tmp_path))
    a, b = add_workers(2, dir=str(tmp_path))
    assert forked(a) and forked(b)
    seen = [distexec.remotecall_fetch(what_a_worker_sees, pid) for pid in (a, b)]
    for view in seen:
        assert view["json_mark"] is None  # the master's objects are not the worker's
        assert view["main"] == []        # an empty __main__, as a spawned worker's
        assert view["env"] == "the master's environment at launch"  # as spawn: at launch
        assert view["cwd"] == str(tmp_path)
        assert view["path"][:2] == [str(tmp_path), str(tmp_path)]  # dir, then the master's
    assert seen[0]["random"] != seen[1]["random"]  # not one sequence, nor the master's
    random.seed(7)
    assert random.random() not in {v["random"] for v in seen}


def test_forked_and_spawned_workers_see_the_same_process(add_workers, monkeypatch):
    (one,) = add_workers(1)
    monkeypatch.setenv("DISTEXEC_TEMPLATE", "0")
    (other,) = add_workers(1)
    assert forked(one) and not forked(other)
    views = [distexec.remotecall_fetch(what_a_worker_sees, pid) for pid in (one, other)]
    for key in ("main", "path", "cwd"):
        assert views[0][key] == views[1][key], key


def test_workers_outlive_their_template_and_later_ones_still_start(add_workers):
    a, b = add_workers(2)
    template = template_of(a)
    assert template_of(b).pid == template.pid
    template.kill()
    template.wait(10)
    assert distexec.remotecall_fetch(lambda: 6 * 7, a) == 42  # not killed with it
    assert distexec.remotecall_fetch(lambda: 6 * 7, b) == 42
    (c,) = add_workers(1)  # another template, or a spawned worker: either way it works
    assert distexec.remotecall_fetch(lambda: 6 * 7, c) == 42
    assert not forked(c) or template_of(c).pid != template.pid
    orphans = [os_pid(a), os_pid(b)]
    distexec.rmprocs([a, b], waitfor=20)
    wait_gone(orphans)  # no longer our children: the fixture would not see them


def test_addprocs_spawns_when_the_template_cannot_start(add_workers, monkeypatch):
    from distexec.runtime.context import current_context
    (a,) = add_workers(1)
    launchers = current_context().launchers
    monkeypatch.setitem(launchers, "template", launchers["template"])  # restored after
    template_of(a).kill()
    monkeypatch.setattr("distexec.cluster.template.Template.start",
                        classmethod(lambda cls, env: (_ for _ in ()).throw(OSError("no fork"))))
    orphan = os_pid(a)
    distexec.rmprocs([a], waitfor=20)
    wait_gone([orphan])
    b, c = add_workers(2)
    assert not forked(b) and not forked(c)
    assert launcher_of(os_pid(b)) == os.getpid()
    assert distexec.remotecall_fetch(lambda: 6 * 7, c) == 42


def test_options_a_template_cannot_give_spawn_the_worker(warm, add_workers):
    (a,) = add_workers(1, exeflags=["-X", "utf8"])
    (b,) = add_workers(1, env={"PYTHONHASHSEED": "123"})
    (c,) = add_workers(1)
    assert not forked(a) and not forked(b) and forked(c)
    assert distexec.remotecall_fetch(lambda: sys.flags.utf8_mode, a) == 1
    assert distexec.remotecall_fetch(lambda: os.environ["PYTHONHASHSEED"], b) == "123"


def test_a_forked_workers_exit_status_reaches_the_master(add_workers):
    a, b = add_workers(2)
    assert forked(a) and forked(b)
    with pytest.raises(ProcessExitedException, match=r"exit code 3\)"):
        distexec.remotecall_fetch(lambda: os._exit(3), a)
    target = os_pid(b)
    os.kill(target, signal.SIGKILL)
    with pytest.raises(ProcessExitedException, match="SIGKILL"):
        distexec.remotecall_fetch(lambda: __import__("time").sleep(30), b)


def forked_here() -> tuple[int, bool]:
    """On a worker: its OS pid, and whether a template forked it."""
    return os.getpid(), is_template(psutil.Process(os.getppid()))


def test_replacement_workers_are_forked_from_the_template():
    with distexec.DistributedExecutor(2, max_tasks_per_child=1) as ex:
        seen = [ex.submit(forked_here).result(30) for _ in range(4)]
    assert len({pid for pid, _ in seen}) == 4  # one task per worker: each had a new one
    assert all(was_forked for _, was_forked in seen)


def test_a_killed_workers_replacement_is_forked():
    with distexec.DistributedExecutor(2) as ex:
        victim = ex.workers()[0]
        assert forked(victim)
        os.kill(os_pid(victim), signal.SIGKILL)
        wait_until(lambda: victim not in ex.workers() and len(ex.workers()) == 2,
                   message="the killed worker's replacement")
        seen = {ex.submit(forked_here).result(30) for _ in range(4)}
    assert all(was_forked for _, was_forked in seen)


MASTER = """
    import ctypes, json, os, sys
    import distexec

    def hold_the_gil():
        print("holding the GIL", flush=True)
        ctypes.PyDLL(None).sleep(600)  # C code that never lets the GIL go

    if __name__ == "__main__":
        pids = distexec.addprocs(2)
        workers = [distexec.remotecall_fetch(os.getpid, p) for p in pids]
        print(json.dumps(workers), flush=True)
        distexec.remote_do(hold_the_gil, pids[0])
        sys.stdin.read()  # until the test kills us
"""


def test_a_master_killed_leaves_no_worker_and_no_template(tmp_path):
    script = tmp_path / "master.py"
    script.write_text(textwrap.dedent(MASTER), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    master = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    try:
        assert master.stdout is not None
        line = master.stdout.readline()
        assert line, "the master script printed nothing"
        workers = json.loads(line)
        templates = {psutil.Process(w).ppid() for w in workers}
        assert len(templates) == 1 and all(is_template(psutil.Process(t)) for t in templates)
        line = master.stdout.readline()  # relayed: "From worker 2: holding the GIL"
        assert "holding the GIL" in line, line
        master.send_signal(signal.SIGKILL)
        master.wait(10)
        wait_gone(workers + sorted(templates))
    finally:
        reap(master)
