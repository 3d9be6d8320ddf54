"""Large NumPy arrays between the master and its local workers travel in shared memory.

What a user observes: the array that arrives is equal, of the same dtype, shape, order and
writability as one that came through the socket (``DISTEXEC_SHM=0``), and it lives in a
``memfd`` mapping rather than in private memory (``/proc/self/maps``); a value kept beyond the
call stays valid while other transfers reuse the memory and after its sender is gone; writes
on one side never reach the other; ``/dev/shm`` gains nothing, also when the sender, the
receiver or the master is killed with SIGKILL; links that are not the master's Unix socket
pair (worker to worker over TCP, TLS) keep the socket.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

import distexec
from distexec import ProcessExitedException, Security
from distexec.runtime.context import default_context
from tests.helpers import is_gone, kill_worker, wait_gone, wait_until

pytestmark = pytest.mark.timeout(120)

MIB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]


def backing(a: np.ndarray) -> str:
    """Where an array's memory lives in this process: 'memfd' (shared memory), 'private'."""
    address = a.__array_interface__["data"][0]
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(None, 5)
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= address < high:
                return "memfd" if "memfd:distexec" in line else "private"
    return "unmapped"


def describe(a: np.ndarray) -> tuple:
    """What a user can tell of an array, its memory's place aside."""
    return (a.dtype.str, a.shape, a.flags.writeable, a.flags.c_contiguous, a.flags.f_contiguous,
            type(a).__name__)


def arrived(a: np.ndarray) -> tuple:
    """Runs on a worker: how its argument arrived, and the argument back."""
    return describe(a), backing(a), a


def _dev_shm() -> set[str]:
    # (other tools' POSIX semaphores come and go there: not segments)
    return {name for name in os.listdir("/dev/shm") if not name.startswith("sem.")}


ARRAYS = {
    "float64 2-D": lambda: np.random.default_rng(0).random((1024, 512)),
    "int32 Fortran order": lambda: np.asfortranarray(
        np.arange(3 * MIB, dtype=np.int32).reshape(1024, -1)),
    "structured": lambda: np.zeros(MIB // 4, dtype=[("x", "<f8"), ("n", "<i4"), ("c", "S4")]),
    "uint8 8 MiB": lambda: np.random.default_rng(1).integers(0, 255, 8 * MIB, dtype=np.uint8),
    "read-only": lambda: _read_only(np.arange(MIB, dtype=np.float32)),
}


def _read_only(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def _round_trips(pid: int) -> dict:
    seen = {}
    for name, make in ARRAYS.items():
        sent = make()
        there, where_there, back = distexec.remotecall_fetch(arrived, pid, sent)
        np.testing.assert_array_equal(back, sent)
        seen[name] = (there, where_there, describe(back), backing(back))
    return seen


def test_arrays_arrive_as_through_the_socket_but_in_shared_memory(add_workers, monkeypatch):
    (pid,) = add_workers(1)
    shared = _round_trips(pid)
    distexec.rmprocs(pid, waitfor=20)
    monkeypatch.setenv("DISTEXEC_SHM", "0")  # the master's new link, and the worker's
    (pid,) = add_workers(1)
    socket_ = _round_trips(pid)
    for name in ARRAYS:
        there, where_there, here, where_here = shared[name]
        s_there, s_where_there, s_here, s_where_here = socket_[name]
        assert (there, here) == (s_there, s_here), name  # dtype, shape, order, writability
        assert (where_there, where_here) == ("memfd", "memfd"), name
        assert (s_where_there, s_where_here) == ("private", "private"), name
        assert here[2] == (name != "read-only"), f"{name}: writable unless sent read-only"


def test_small_arrays_keep_the_socket(add_workers):
    (pid,) = add_workers(1)
    _, where, back = distexec.remotecall_fetch(arrived, pid, np.ones(1000))
    assert where == "private" and backing(back) == "private"


_kept: list = []


def keep(a: np.ndarray) -> float:
    """Runs on a worker: keeps its argument beyond the call."""
    _kept.append(a)
    return float(a.sum())


def kept_sums() -> list[float]:
    gc.collect()
    return [float(a.sum()) for a in _kept]


def add_one(a: np.ndarray) -> np.ndarray:
    a += 1  # in place, on the worker's copy
    return a


def test_a_value_kept_beyond_the_call_stays_valid(add_workers):
    (pid,) = add_workers(1)
    first = np.full(2 * MIB, 1.0)
    kept_here = distexec.remotecall_fetch(lambda a: a, pid, first)
    assert distexec.remotecall_fetch(keep, pid, first) == 2 * MIB
    for i in range(2, 12):  # other transfers, same size: the free blocks are reused
        echoed = distexec.remotecall_fetch(lambda a: a, pid, np.full(2 * MIB, float(i)))
        assert echoed[0] == echoed[-1] == float(i)
        del echoed
        gc.collect()
    assert (kept_here == 1.0).all()
    assert distexec.remotecall_fetch(kept_sums, pid) == [2 * MIB]
    distexec.rmprocs(pid, waitfor=20)  # its sender is gone, and so is its link
    gc.collect()
    assert backing(kept_here) == "memfd" and (kept_here == 1.0).all()


def test_writes_on_one_side_never_reach_the_other(add_workers):
    (pid,) = add_workers(1)
    sent = np.zeros(2 * MIB)
    back = distexec.remotecall_fetch(add_one, pid, sent)
    assert (sent == 0).all() and (back == 1).all()
    assert distexec.remotecall_fetch(keep, pid, sent) == 0.0
    back += 5  # the master's array: the worker's kept copy stays as it was
    again = distexec.remotecall_fetch(add_one, pid, back)
    assert (back == 6).all() and (again == 7).all()
    assert distexec.remotecall_fetch(kept_sums, pid) == [0.0]


def _echo_until_dead(pid: int, done: threading.Event, results: list, errors: list) -> None:
    i = 0
    try:
        while True:
            i += 1
            results.append(distexec.remotecall_fetch(lambda a: a, pid, np.full(4 * MIB, float(i))))
            del results[:-2]
            done.set()
    except (ProcessExitedException, distexec.DistributedError) as exc:
        errors.append(exc)
        done.set()


def test_no_segment_is_left_when_a_worker_is_killed_mid_transfer(add_workers):
    before = _dev_shm()
    (pid,) = add_workers(1)
    kept_here = distexec.remotecall_fetch(lambda a: a, pid, np.full(2 * MIB, 7.0))
    done, results, errors = threading.Event(), [], []
    loop = threading.Thread(target=_echo_until_dead, args=(pid, done, results, errors))
    loop.start()
    try:
        assert done.wait(60)  # arrays go both ways: the worker sends and receives
        assert _dev_shm() == before
        os_pid = kill_worker(pid)
        loop.join(60)
        assert not loop.is_alive() and errors
        wait_gone([os_pid])
    finally:
        loop.join(60)
    assert _dev_shm() == before
    assert (kept_here == 7.0).all()  # what it sent before it died stays valid


MASTER = """
import sys, threading, numpy as np, distexec, os
(pid,) = distexec.addprocs(1)
kept = distexec.remotecall_fetch(lambda a: a, pid, np.ones(4 << 20))
distexec.remotecall_fetch(lambda a: globals().setdefault("kept", a).sum(), pid, np.ones(4 << 20))
print(distexec.remotecall_fetch(os.getpid, pid), flush=True)
def loop():
    while True:
        distexec.remotecall_fetch(lambda a: a, pid, np.ones(4 << 20))
threading.Thread(target=loop, daemon=True).start()
sys.stdin.read()
"""


def test_no_segment_is_left_when_the_master_is_killed(tmp_path):
    before = _dev_shm()
    script = tmp_path / "master.py"
    script.write_text(textwrap.dedent(MASTER))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    master = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, env=env, cwd=ROOT, text=True)
    worker = None
    try:
        reader = threading.Thread(target=lambda: lines.append(master.stdout.readline()))
        lines: list[str] = []
        reader.start()
        reader.join(60)
        worker = int(lines[0])
        assert _dev_shm() == before
        master.send_signal(signal.SIGKILL)
        master.wait(30)
        wait_gone([worker], 30)  # it dies with its master
    finally:
        master.kill()
        master.wait(30)
        master.stdin.close()
        master.stdout.close()
        if worker is not None and not is_gone(worker):
            os.kill(worker, signal.SIGKILL)
    assert _dev_shm() == before


def _fetch_from(other: int) -> tuple:
    """Runs on a worker: an array from another worker, over their TCP link."""
    back = distexec.remotecall_fetch(lambda: np.ones(4 * MIB), other)
    return backing(back), float(back.sum())


def test_worker_to_worker_links_keep_the_socket(add_workers):
    a, b = add_workers(2)
    assert distexec.remotecall_fetch(_fetch_from, a, b) == ("private", 4.0 * MIB)
    _, where, back = distexec.remotecall_fetch(arrived, a, np.ones(4 * MIB))
    assert (where, backing(back)) == ("memfd", "memfd")  # the master's link to it does not


@pytest.fixture
def plaintext_afterwards():
    yield
    default_context().security = None


def test_tls_links_keep_the_socket(add_workers, plaintext_afterwards):
    (pid,) = add_workers(1, security=Security.temporary())
    _, where, back = distexec.remotecall_fetch(arrived, pid, np.ones(4 * MIB))
    assert (where, backing(back)) == ("private", "private")
    assert (back == 1).all()


def test_many_arrays_both_ways_at_once(add_workers):
    import concurrent.futures as cf
    a, b = add_workers(2)
    sizes = [MIB // 8 * k for k in (1, 2, 3, 5, 8, 13)]  # 1 to 13 MiB

    def one(i: int) -> bool:
        sent = np.random.default_rng(i).random(sizes[i % len(sizes)])
        back = distexec.remotecall_fetch(np.negative, (a, b)[i % 2], sent)
        return bool((back == -sent).all())

    with cf.ThreadPoolExecutor(6) as pool:
        assert all(pool.map(one, range(60), timeout=100))
