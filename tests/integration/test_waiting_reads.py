"""A waiting thread reads its own reply (transport.connection, "Reading on the waiting thread").

What a user could notice if the read role went wrong: a worker busy on its main thread that
stops answering until the call ends (nobody reading its master connection), and a Ctrl-C
that lands while the master's main thread is reading a reply and leaves the connection
broken (a frame half read). Both are checked against real workers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import distexec
from distexec.errors import RemoteException
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]


def _busy_on_main_thread(flag_dir: str, how: str) -> None:
    """Sleep or compute (holding the GIL between switch intervals) until interrupted."""
    Path(flag_dir, "started").touch()
    deadline = time.monotonic() + 30  # (a clock read through the vDSO: the GIL stays held)
    while time.monotonic() < deadline:
        if how == "sleep":
            time.sleep(0.005)
        else:
            sum(range(20_000))


@pytest.mark.parametrize("how", ["sleep", "compute"])
def test_a_worker_busy_on_its_main_thread_answers_other_calls_meanwhile(shared_workers, tmp_path,
                                                                        how):
    worker = shared_workers[0]
    busy = distexec.remotecall(_busy_on_main_thread, worker, str(tmp_path), how)
    wait_until(lambda: (tmp_path / "started").exists(), 20, message="the long call to start")
    try:
        for _ in range(5):
            asked = time.monotonic()
            assert distexec.remotecall_fetch(os.getpid, worker) > 0
            # A frame must not wait for the long call to end (30 s here): the worker's
            # reader thread takes the read role back from its busy main thread.
            assert time.monotonic() - asked < 1.0
    finally:
        distexec.interrupt(worker)
    # The long call did hold the main thread: only there does SIGINT end a computation.
    with pytest.raises(RemoteException) as failed:
        busy.fetch()
    assert "KeyboardInterrupt" in str(failed.value)


STORM_MASTER = r'''
import json, os, random, signal, sys, threading, time
import distexec as d

signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal-started python has
pids = d.addprocs(1)
worker = pids[0]
worker_pid = d.remotecall_fetch(os.getpid, worker)
executor = d.DistributedExecutor(pool=d.WorkerPool(pids))

# Ctrl-C, over and over at random moments, but only while the main thread waits for a reply
# (remotecall_fetch, Future.result): what is under test is reading a reply, not submit().
gate, stop = threading.Lock(), threading.Event()
armed = False
late = 0

def storm():
    rng = random.Random(1)
    while not stop.is_set():
        with gate:
            if armed:
                os.kill(os.getpid(), signal.SIGINT)
        stop.wait(rng.uniform(0, 0.002))

def arm(on):
    global armed, late
    while True:
        try:
            with gate:
                armed = on
            (lambda: None)()  # a Ctrl-C sent before the gate closed is raised by now
            return
        except KeyboardInterrupt:
            late += 1

rng = random.Random(2)
interrupted = completed = 0
storm_thread = threading.Thread(target=storm, daemon=True)
storm_thread.start()
deadline = time.monotonic() + 3
while time.monotonic() < deadline:
    size = rng.randrange(1, 400_000)  # replies of several reads each
    via_executor = rng.random() < 0.5
    future = executor.submit(bytes, size) if via_executor else None
    try:
        arm(True)
        got = future.result() if via_executor else d.remotecall_fetch(bytes, worker, size)
        assert len(got) == size
        completed += 1
    except KeyboardInterrupt:
        interrupted += 1
    arm(False)
stop.set()
storm_thread.join()
sizes = [rng.randrange(1, 400_000) for _ in range(100)]
after = [len(d.remotecall_fetch(bytes, worker, n)) for n in sizes]
after += [len(f.result()) for f in [executor.submit(bytes, n) for n in sizes]]
report = {
    "interrupted": interrupted,
    "completed": completed,
    "after_ok": after == sizes + sizes,
    "same_worker": d.remotecall_fetch(os.getpid, worker) == worker_pid,
    "workers": d.workers(),
}
executor.shutdown()
print("REPORT", json.dumps(report), flush=True)
'''


def test_ctrl_c_while_the_main_thread_reads_a_reply_leaves_the_connection_whole(tmp_path):
    script = tmp_path / "master.py"
    script.write_text(STORM_MASTER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                  os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=50, start_new_session=True)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.split("REPORT", 1)[1])
    assert report["interrupted"] > 20, report  # the storm did interrupt waits, many times
    assert report["completed"] > 20, report
    assert report["after_ok"] and report["same_worker"], report
    assert len(report["workers"]) == 1, report
    assert "closing connection" not in done.stderr, done.stderr[-3000:]


def test_an_executor_that_only_runs_long_tasks_leaves_their_replies_to_the_reader_thread():
    """Reading a reply on the waiting thread pays only when the reply comes soon: for a long
    task it wakes the reader thread twice for nothing. An executor that has run nothing but
    250 ms tasks must still know they are long; its yardstick is the empty task each worker
    gets first, whose reply the worker sends before it starts the first real task. (A task
    counts as long past 4 times the yardstick's round trip: 250 ms keeps the test true on a
    machine so loaded that an empty round trip takes 50 ms; 50 ms tasks failed there.)"""
    with distexec.DistributedExecutor(1) as executor:
        executor.submit(time.sleep, 0.25).result()
        later = executor.submit(time.sleep, 0.25)
        assert later._sent_to is None  # not read by the thread waiting in result()
        assert later.result() is None
        quick = executor.submit(abs, -1)  # a function not seen yet counts as short
        assert quick._sent_to is not None
        assert quick.result() == 1


def _sleeps_by_thread(pid: int) -> dict[str, int]:
    """How many times each thread of process ``pid`` has gone to sleep (woken since), by
    "name (tid)"."""
    counts = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                counts[f"{name} ({tid})"] = sum(int(line.split()[1]) for line in f
                                                if line.startswith("voluntary_ctxt_switches:"))
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
    return counts


def _wait_quiet(pid: int, quiet_for: float, timeout: float) -> None:
    """Return once no thread of ``pid`` has woken for ``quiet_for`` s (polled meanwhile)."""
    last = [_sleeps_by_thread(pid), time.monotonic()]

    def quiet() -> bool:
        now = _sleeps_by_thread(pid)
        if now != last[0]:
            last[:] = [now, time.monotonic()]
        return time.monotonic() - last[1] >= quiet_for

    wait_until(quiet, timeout=timeout, interval=0.05,
               message=f"process {pid}'s threads quiet for {quiet_for} s")


def test_an_idle_worker_sleeps_until_it_is_called(add_workers):
    """An idle worker's threads stay asleep: its main thread waits in its read of the master
    connection with no timeout, and heartbeats come every 10 s (they used to wake it about
    five times a second: a 0.5 s poll of the main thread, the reader thread taking over at
    each, and a ping each way every 2 s)."""
    (worker,) = add_workers(1)  # its own: no call thread of an earlier test ends meanwhile
    os_pid = distexec.remotecall_fetch(os.getpid, worker)
    # What its joining set going (a peer's departure from an earlier test told to it, its
    # threads settling) may still wake it on a loaded machine: measure once it has been
    # quiet for a moment, as an idle worker is.
    _wait_quiet(os_pid, quiet_for=0.5, timeout=15)
    window = 3.0
    before = _sleeps_by_thread(os_pid)
    time.sleep(window)  # the span measured, not a wait for an event
    after = _sleeps_by_thread(os_pid)
    woken = {t: n - before.get(t, 0) for t, n in after.items() if n != before.get(t, 0)}
    # At most a heartbeat from each side can fall in the window (each wakes one thread).
    assert sum(woken.values()) <= 4, f"an idle worker's threads woke in {window} s: {woken}"
    asked = time.monotonic()
    assert distexec.remotecall_fetch(os.getpid, worker) == os_pid
    assert time.monotonic() - asked < 1.0  # and it answers at once
