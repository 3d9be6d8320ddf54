"""The command line: ``distexec run`` with local workers, and its argument parsing."""

from __future__ import annotations

import os
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


FAILING_SCRIPT = textwrap.dedent("""
    import distexec

    def lookup():
        try:
            {}["key"]
        except KeyError as exc:
            raise ValueError("boom") from exc

    lookup()
""")


@pytest.mark.parametrize("script, workers", [(FAILING_SCRIPT, ["-p", "1"]),
                                             ("def (\n", [])], ids=["raises", "syntax-error"])
def test_a_failing_script_shows_its_traceback_as_python_does(tmp_path, script, workers):
    """Only the script's frames, none of distexec's or runpy's; exit status 1, as python's."""
    done = run(tmp_path, *workers, [], script=script)
    alone = subprocess.run([sys.executable, str(tmp_path / "job.py")], capture_output=True,
                           text=True, timeout=50)
    assert (done.returncode, alone.returncode) == (1, 1)
    assert _from_traceback(done.stderr) == _from_traceback(alone.stderr), done.stderr
    assert "cli.py" not in done.stderr and "runpy" not in done.stderr


def _from_traceback(stderr: str) -> str:
    """What python prints for an uncaught exception: from its first traceback (or, for a
    SyntaxError, which has none, its first ``File`` line) to the end."""
    start = stderr.find("Traceback (most recent call last):")
    return stderr[start:] if start >= 0 else stderr[stderr.find('  File "'):]


def _distexec(*argv: str, env: dict | None = None,
              stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distexec", *argv], input=stdin,
                          capture_output=True, env=env, timeout=50)


@pytest.fixture
def started_pythons(tmp_path):
    """An environment in which every Python process logs its command line at start, and a
    function returning the command lines logged so far: proof of which processes ran."""
    spy, log = tmp_path / "spy", tmp_path / "pythons.log"
    spy.mkdir()
    (spy / "sitecustomize.py").write_text(
        f"import sys\nwith open({str(log)!r}, 'a') as log:\n"
        "    log.write(' '.join(sys.orig_argv) + '\\n')\n")
    path = os.pathsep.join(filter(None, [str(spy), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    return env, lambda: log.read_text().splitlines() if log.exists() else []


def test_a_missing_script_is_refused_before_any_worker_starts(tmp_path, started_pythons):
    env, logged = started_pythons
    missing = str(tmp_path / "missing.py")
    done = _distexec("run", "-p", "2", missing, env=env)
    assert done.returncode == 2
    assert done.stderr.decode().splitlines() == [
        f"distexec run: error: can't open file {missing!r}: [Errno 2] No such file or directory"]
    assert len(logged()) == 1 and " run -p 2 " in logged()[0]  # the command itself, no worker


@pytest.mark.parametrize("option, lines, message", [
    ("--machine-file", None, "can't open machine file {path!r}: [Errno 2] No such file or "
                             "directory"),
    ("--machine-file", "# hosts\nfoo*node1\n", "machine file {path!r}: line 2: the count "
                                                "before '*' must be a positive number or "
                                                "'auto', not 'foo'"),
    ("--machine-file", "node1\n0*node2\n", "machine file {path!r}: line 2: the count before "
                                           "'*' must be a positive number or 'auto', not '0'"),
    ("--machine-file", "node1:99999\n", "machine file {path!r}: line 1: invalid machine "
                                        "definition format string: invalid port number "
                                        "'node1:99999'"),
    ("--machine-file", "# no host yet\n", "machine file {path!r} names no host"),
    ("-p", "0", "-p needs a positive number of workers"),
], ids=["no-file", "bad-count", "zero-count", "bad-port", "no-host", "no-workers"])
def test_a_bad_cluster_option_is_one_line_and_status_2(tmp_path, option, lines, message):
    script, path = tmp_path / "job.py", str(tmp_path / "hosts")
    script.write_text("print('ran')\n")
    if option == "-p":
        value = lines
    else:
        value = path
        if lines is not None:
            (tmp_path / "hosts").write_text(lines)
    done = _distexec("run", option, value, str(script))
    assert (done.returncode, done.stdout) == (2, b"")
    assert done.stderr.decode().splitlines() == [
        "distexec run: error: " + message.format(path=path)]


@pytest.mark.parametrize("srun, message", [
    ("--slurm=-X 1", "unsupported srun option '-X' (use the --long=value form)"),
    ("--slurm=--ntasks=four", "--ntasks needs a positive number, not 'four'"),
], ids=["unknown-short", "bad-ntasks"])
def test_a_bad_srun_option_is_one_line_and_status_2(tmp_path, srun, message):
    script = tmp_path / "job.py"
    script.write_text("print('ran')\n")
    done = _distexec("run", srun, str(script))
    assert (done.returncode, done.stdout) == (2, b"")
    assert done.stderr.decode().splitlines() == ["distexec run: error: " + message]


def test_help_and_version_speak_plainly(capsys):
    from distexec import __version__
    overview = _printed(capsys, "--help")
    assert "``" not in overview and "Run a Python script" in overview
    worker = " ".join(_printed(capsys, "worker", "--help").split())
    assert "The first line of stdin must be the cluster cookie" in worker
    assert _printed(capsys, "--version") == f"distexec {__version__}\n"


def _printed(capsys, *argv: str) -> str:
    """What ``distexec ARGV`` prints before it exits with status 0 (help, version)."""
    from distexec.cli import main
    with pytest.raises(SystemExit) as stop:
        main(list(argv))
    assert stop.value.code == 0
    return capsys.readouterr().out


def test_run_without_a_script_requires_only_the_script(capsys):
    from distexec.cli import main
    with pytest.raises(SystemExit) as stop:
        main(["run", "-p", "2"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "distexec run: error: the following arguments are required: script")


@pytest.mark.parametrize("stdin, message", [
    (b"", "stdin ended before the cookie line (the master writes the cluster cookie as the "
          "first line of stdin)"),
    (b"\n", "the first line of stdin is not a cluster cookie: cookie must have 16 to 256 "
            "characters"),
    (b"short\n", "the first line of stdin is not a cluster cookie: cookie must have 16 to 256 "
                 "characters"),
    (b"a cookie line with spaces in it\n", "the first line of stdin is not a cluster cookie: "
                                           "cookie must be printable ASCII without whitespace"),
], ids=["eof", "empty", "short", "spaces"])
def test_a_worker_without_a_valid_cookie_refuses_to_serve(stdin, message):
    """It never listens: no address line, one line on stderr, status 1."""
    done = _distexec("worker", stdin=stdin)
    assert (done.returncode, done.stdout) == (1, b"")
    assert done.stderr.decode().splitlines() == ["distexec worker: " + message]


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
    with pytest.raises(ValueError, match="unsupported srun option"):
        srun_options("-X")
    with pytest.raises(ValueError, match="--ntasks needs a positive number, not 'four'"):
        srun_options("--ntasks=four")


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
