"""The evidence of an OOM kill that a worker's death message may cite (``cluster.oom``).

A SIGKILL alone is no evidence: only the kernel log naming the process, or the ``oom_kill``
counter of its memory cgroup having grown, makes the message speak of memory. The kernel log
and the cgroup tree are files here, written by the tests.
"""

from __future__ import annotations

import os
import pickle
import signal
from pathlib import Path

import pytest

from distexec.cluster import oom
from distexec.errors import AllWorkersExited, ProcessExitedException

pytestmark = pytest.mark.timeout(30)


def _fake_cgroup_tree(root: Path, oom_kills: int) -> list[Path]:
    """The counter files of this process's cgroups under ``root`` (v1 and v2 names)."""
    files = oom._counter_files(os.getpid(), root)
    assert files, "this process has no cgroup (not Linux?)"
    for path in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_oom_kills(path, oom_kills)
    return files


def _write_oom_kills(path: Path, count: int) -> None:
    if path.name == "memory.events":
        path.write_text(f"low 0\nhigh 0\nmax 3\noom 1\noom_kill {count}\noom_group_kill 0\n")
    else:
        path.write_text(f"oom_kill_disable 0\nunder_oom 0\noom_kill {count}\n")


def test_a_grown_cgroup_counter_is_evidence(tmp_path):
    files = _fake_cgroup_tree(tmp_path, oom_kills=2)
    counter = oom.OomKillCounter.of_process(os.getpid(), tmp_path)
    assert counter is not None and counter.start == 2
    no_log = str(tmp_path / "no-kmsg")
    assert oom.oom_evidence(os.getpid(), counter, no_log) is None
    for path in files:
        _write_oom_kills(path, 3)
    assert oom.oom_evidence(os.getpid(), counter, no_log) == (
        f"its memory cgroup counted an OOM kill since it started ({counter.path.name}: "
        "oom_kill)")


def test_no_cgroup_to_read_is_no_evidence(tmp_path):
    assert oom.OomKillCounter.of_process(os.getpid(), tmp_path) is None
    assert oom.oom_evidence(os.getpid(), None, str(tmp_path / "no-kmsg")) is None


@pytest.mark.parametrize("record", [
    "3,1234,5678,-;Out of memory: Killed process {pid} (python) total-vm:123kB, anon-rss:99kB",
    "6,1233,5677,-;oom-kill:constraint=CONSTRAINT_MEMCG,task=python,pid={pid},uid=0",
])
def test_the_kernel_log_naming_the_process_is_evidence(tmp_path, record):
    log = tmp_path / "kmsg"
    log.write_text("6,1,2,-;Linux version 6\n" + record.format(pid=4242) + "\n")
    assert oom.oom_evidence(4242, None, str(log)) == \
        "the kernel log says the OOM killer killed it"
    assert oom.oom_evidence(424, None, str(log)) is None  # another process's kill


def test_a_death_by_sigkill_speaks_of_memory_only_with_evidence():
    plain = ProcessExitedException(3, signal=signal.SIGKILL)
    assert str(plain) == "Worker 3 has exited (killed by SIGKILL(-9))."
    evidence = "the kernel log says the OOM killer killed it"
    oom_killed = ProcessExitedException(3, signal=signal.SIGKILL, oom_evidence=evidence)
    assert str(oom_killed) == ("Worker 3 has exited (killed by SIGKILL(-9)); it ran out of "
                               "memory: the kernel log says the OOM killer killed it.")
    assert str(pickle.loads(pickle.dumps(oom_killed))) == str(oom_killed)
    assert str(ProcessExitedException(3, signal=signal.SIGSEGV)) == \
        "Worker 3 has exited (terminated by SIGSEGV(-11))."
    assert str(AllWorkersExited(3, None, signal.SIGKILL, None, evidence)) == (
        "All workers of this executor have exited; the last: " + str(oom_killed))
