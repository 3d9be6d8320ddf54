"""The command line: ``distexec run`` with local workers, and its argument parsing."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import psutil
import pytest

from distexec.cli import read_machine_file, srun_options
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(60)

SCRIPT = textwrap.dedent("""
    import os, sys
    import distexec as d

    def where(x):
        return x, d.myid()

    print("workers", d.workers(), "argv", sys.argv[1:], flush=True)
    print("pids", *[d.remotecall_fetch(os.getpid, p) for p in d.workers()], flush=True)
    print("results", d.pmap(where, range(4)), flush=True)
    sys.exit(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
""")


def run(tmp_path, *args, script=SCRIPT):
    path = tmp_path / "job.py"
    path.write_text(script)
    return subprocess.run([sys.executable, "-m", "distexec", "run", *args[:-1], str(path),
                           *args[-1]], capture_output=True, text=True, timeout=50)


def _worker_os_pids(stdout: str) -> list[int]:
    line = next(l for l in stdout.splitlines() if l.startswith("pids"))
    return [int(x) for x in line.split()[1:]]


def test_run_starts_workers_runs_the_script_and_removes_them(tmp_path):
    done = run(tmp_path, "-p", "2", ["7", "extra"])
    assert done.returncode == 7, done.stderr
    assert "workers [2, 3] argv ['7', 'extra']" in done.stdout
    results = eval(next(l for l in done.stdout.splitlines() if l.startswith("results"))[8:])
    assert [x for x, _ in results] == [0, 1, 2, 3]
    assert {pid for _, pid in results} <= {2, 3}
    wait_until(lambda: not any(_running(p) for p in _worker_os_pids(done.stdout)), 5,
               message="the workers to exit")


def _running(os_pid: int) -> bool:
    try:
        return psutil.Process(os_pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_failing_script_exits_1_with_its_traceback(tmp_path):
    done = run(tmp_path, "-p", "1", [], script="import distexec\nraise ValueError('boom')\n")
    assert done.returncode == 1
    assert "ValueError: boom" in done.stderr


def test_run_without_workers_runs_on_the_master(tmp_path):
    done = run(tmp_path, [])
    assert done.returncode == 0, done.stderr
    assert "workers [1]" in done.stdout


def test_machine_file_grammar(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("# the cluster\nnode1\n4*user@node2:2222 10.0.0.2:9000\n"
                    "auto*[::1]\n\n  node3  # trailing comment\n")
    assert read_machine_file(str(path)) == [
        "node1", ("user@node2:2222 10.0.0.2:9000", 4), ("[::1]", "auto"), "node3"]


def test_srun_options_become_keywords():
    assert srun_options("--ntasks=4 -p debug --time 10 --exclusive") == {
        "ntasks": 4, "partition": "debug", "time": "10", "exclusive": True}
    with pytest.raises(SystemExit, match="unsupported srun option"):
        srun_options("-X")


@pytest.mark.parametrize("argv, rest, srun", [
    (["run", "--slurm", "--ntasks=2", "-p", "debug", "s.py", "a"], ["run", "--slurm", "s.py", "a"],
     ["--ntasks=2", "-p", "debug"]),
    (["run", "--slurm", "s.py"], ["run", "--slurm", "s.py"], []),
    (["run", "--slurm=--ntasks=2 --exclusive", "s.py"], ["run", "--slurm", "s.py"],
     ["--ntasks=2", "--exclusive"]),
    (["run", "-p", "2", "s.py", "--slurm"], ["run", "-p", "2", "s.py", "--slurm"], None),
])
def test_srun_options_are_cut_before_the_script(argv, rest, srun):
    from distexec.cli import _take_srun_options
    assert _take_srun_options(argv) == (rest, srun)


def test_the_hello_example_runs_on_local_workers():
    """The script the SSH and Slurm tests run too (tests/managers), here on local workers."""
    import pathlib
    hello = pathlib.Path(__file__).resolve().parents[2] / "examples" / "hello_cluster.py"
    done = subprocess.run([sys.executable, "-m", "distexec", "run", "-p", "2", str(hello)],
                          capture_output=True, text=True, timeout=50)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "hello from worker 2 at local" in done.stdout
    assert "2 workers, sum of squares 328350" in done.stdout


PROGRESS_SCRIPT = textwrap.dedent("""
    import distexec as d

    print("pmap", d.pmap(abs, range(-6, 0)), flush=True)
    with d.DistributedExecutor(pool=d.WorkerPool(d.workers())) as ex:
        print("map", list(ex.map(abs, range(-9, 0))), flush=True)
        print("quiet", list(ex.map(abs, range(-5, 0), progress=False)), flush=True)
""")


def test_run_progress_draws_bars_for_the_launch_and_every_map(tmp_path):
    pytest.importorskip("tqdm", reason="tqdm is in the test extra")
    done = run(tmp_path, "--progress", "-p", "2", [], script=PROGRESS_SCRIPT)
    assert done.returncode == 0, done.stderr
    assert "pmap [6, 5, 4, 3, 2, 1]" in done.stdout
    assert "map [9, 8, 7, 6, 5, 4, 3, 2, 1]" in done.stdout
    assert "starting workers" in done.stderr and "2/2" in done.stderr
    assert "pmap" in done.stderr and "6/6" in done.stderr
    assert "9/9" in done.stderr
    assert "5/5" not in done.stderr  # progress=False in the script wins


def test_run_without_progress_draws_no_bar(tmp_path):
    pytest.importorskip("tqdm", reason="tqdm is in the test extra")
    done = run(tmp_path, "-p", "2", [], script=PROGRESS_SCRIPT)
    assert done.returncode == 0, done.stderr
    assert "6/6" not in done.stderr and "starting workers" not in done.stderr
