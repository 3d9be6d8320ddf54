"""Load and chaos (spec/faults.md C10, C16, C17; goals G4, G12): the slow group.

- C16: 32 threads x 1000 mixed ``submit``/``map``/``remotecall_fetch`` (worker-to-worker calls
  included): 32,000 right results, each exactly once, no deadlock, and tail latency against a
  single client's.
- C17/G12: 100,000 queued no-op tasks in a fresh master: all right; master memory per queued
  task and the submit rate; ``map(buffersize=k)`` over an endless generator keeps memory flat.
- C10/G4: workers SIGKILLed at random (mean lifetime 2 s) and replaced while ``pmap`` with
  retries maps 10,000 items: exactly the sequential result; re-executions counted.

The measured numbers are printed (``-s`` shows them) so a run documents itself.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import pytest

import distexec
from distexec import DistributedExecutor, ExponentialBackOff, pmap
from distexec.runtime.context import default_context
from tests.executor.helpers import square
from tests.helpers import drain, new_log

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# Functions defined here travel by value, so workers never import this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

ROOT = Path(__file__).resolve().parents[2]
PERFORMANCE_ISSUE = "issue 6 (performance)"


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[round(q * (len(ordered) - 1))]


# --------------------------------------------------------------------------------------------
# C16: many concurrent clients
# --------------------------------------------------------------------------------------------
CLIENTS, OPS = 32, 1000
C16_BUDGET = 60.0


def _relay(target: int, x: int) -> int:
    """On a worker: ask another worker (a worker-to-worker call)."""
    return distexec.remotecall_fetch(square, target, x)


def _one_op(ex: DistributedExecutor, pids: list[int], value: int, kind: int) -> int:
    here, there = pids[value % 2], pids[(value + 1) % 2]
    if kind == 0:
        return ex.submit(square, value).result(timeout=C16_BUDGET)
    if kind == 1:
        first, second = ex.map(square, [value, -value], timeout=C16_BUDGET)
        assert first == second
        return first
    if kind == 2:
        return distexec.remotecall_fetch(square, here, value)
    return distexec.remotecall_fetch(_relay, here, there, value)


def _client(ex, pids, client: int, results: dict, latencies: list, lock) -> None:
    for op in range(OPS):
        value = client * OPS + op
        began = time.perf_counter()
        result = _one_op(ex, pids, value, op % 4)
        latencies.append(time.perf_counter() - began)
        with lock:
            assert (client, op) not in results, "an operation completed twice"
            results[(client, op)] = result


def _run_clients(ex, pids, clients: int) -> dict:
    results: dict = {}
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client(n):
        try:
            _client(ex, pids, n, results, latencies[n], lock)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(clients)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.1, began + C16_BUDGET - time.monotonic()))
    hung = sum(thread.is_alive() for thread in threads)
    return {"results": results, "errors": errors, "hung": hung,
            "seconds": time.monotonic() - began,
            "latencies": [x for per_client in latencies for x in per_client]}


@pytest.fixture(scope="module")
def c16_run():
    """A single-client baseline (five rounds) and one 32-client run, on two workers."""
    ex = DistributedExecutor(2)
    pids = ex.workers()
    try:
        single = [_run_clients(ex, pids, 1) for _ in range(5)]
        many = _run_clients(ex, pids, CLIENTS)
    finally:
        ex.shutdown(wait=True)
    # the best of five: a single client's tail at a quiet moment of this shared machine
    single_p99 = min(_quantile(run["latencies"], 0.99) for run in single)
    many_p99 = _quantile(many["latencies"], 0.99)
    print(f"\nC16: 1 client p99 {single_p99 * 1e3:.2f} ms; {CLIENTS} clients: "
          f"{len(many['results'])} results in {many['seconds']:.1f} s "
          f"({len(many['results']) / many['seconds']:.0f} ops/s), "
          f"p50 {_quantile(many['latencies'], 0.5) * 1e3:.2f} ms, "
          f"p99 {many_p99 * 1e3:.2f} ms ({many_p99 / single_p99:.1f}x the single client's)")
    return {"single_p99": single_p99, "many_p99": many_p99, **many}


@pytest.mark.fault("C16")
def test_32_clients_get_32000_right_results_without_deadlock(c16_run):
    assert not c16_run["errors"], c16_run["errors"][:3]
    assert c16_run["hung"] == 0, "clients still blocked after the budget (deadlock?)"
    assert c16_run["seconds"] < C16_BUDGET
    expected = {(c, op): (c * OPS + op) ** 2 for c in range(CLIENTS) for op in range(OPS)}
    assert c16_run["results"] == expected  # none lost, none twice, each right


@pytest.mark.fault("C16")
# Not strict: the ratio depends on how much batching the machine's load allows, and an
# unexpected pass on a quiet run must not fail CI; the measured ratio is printed either way.
@pytest.mark.xfail(strict=False, reason=(
    f"{PERFORMANCE_ISSUE}: on 2 shared cores 32 clients get ~1.5x one client's throughput, "
    "so by Little's law their p99 is ~10-40x a single client's, not within 5x"))
def test_32_clients_p99_latency_is_within_5x_of_a_single_client(c16_run):
    assert c16_run["many_p99"] <= 5 * c16_run["single_p99"]


# --------------------------------------------------------------------------------------------
# C17 / G12: 100k queued tasks, and map(buffersize=k) over an endless generator
# --------------------------------------------------------------------------------------------
QUEUED = 100_000

C17_MASTER = r'''
import gc, itertools, json, sys, time
import distexec as d

def rss():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024

n, streamed = int(sys.argv[1]), int(sys.argv[2])
ex = d.DistributedExecutor(2)
assert list(ex.map(abs, range(-1000, 0))) == list(range(1000, 0, -1))  # warm
gate = d.RemoteChannel(1, 4)
blockers = [ex.submit(gate.take) for _ in range(4)]  # every worker slot busy: the rest queue
while not all(f.running() for f in blockers):
    time.sleep(0.01)
gc.collect()
before = rss()
began = time.perf_counter()
futures = [ex.submit(abs, -i) for i in range(n)]
submit_seconds = time.perf_counter() - began
gc.collect()
queued_bytes = rss() - before
for _ in blockers:
    gate.put(None)
began = time.perf_counter()
correct = [f.result(timeout=120) for f in futures] == list(range(n))
drain_seconds = time.perf_counter() - began
del futures

samples, began = [], time.perf_counter()
results = ex.map(abs, itertools.count(), buffersize=100, chunksize=10)
for i, value in enumerate(results):
    if value != i:
        raise SystemExit(f"streamed map: got {value} at {i}")
    if i % (streamed // 20) == 0:
        samples.append(rss())
    if i + 1 == streamed:
        break
results.close()
stream_seconds = time.perf_counter() - began
ex.shutdown(wait=True)
print("REPORT", json.dumps({
    "correct": correct, "submit_rate": n / submit_seconds, "bytes_per_task": queued_bytes / n,
    "drain_rate": n / drain_seconds, "rss_samples": samples, "stream_seconds": stream_seconds,
    "stream_rate": streamed / stream_seconds}), flush=True)
'''

STREAMED = 1_000_000


@pytest.fixture(scope="module")
def c17_report(tmp_path_factory):
    """The C17 measurements, in a fresh master process (a clean RSS baseline)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                  os.environ.get("PYTHONPATH")]))}
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-c", C17_MASTER, str(QUEUED), str(STREAMED)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    report = json.loads(lines[-1][len("REPORT "):])
    report["seconds"] = time.monotonic() - began
    samples = report["rss_samples"]
    print(f"\nC17: {QUEUED} queued no-op tasks: submit {report['submit_rate']:.0f}/s, "
          f"{report['bytes_per_task']:.0f} B of master RSS per queued task, "
          f"completed at {report['drain_rate']:.0f}/s; map(buffersize=100, chunksize=10) over "
          f"{STREAMED} items of an endless generator at {report['stream_rate']:.0f}/s, RSS "
          f"{min(samples) / 2**20:.1f}-{max(samples) / 2**20:.1f} MiB; "
          f"{report['seconds']:.1f} s in all")
    return report


@pytest.mark.fault("C17")
def test_100k_queued_tasks_complete_with_bounded_master_memory(c17_report):
    assert c17_report["correct"]
    assert c17_report["bytes_per_task"] <= 2.5 * 1024  # G12 (CPython 3.11 here: ~2.1 KB)
    assert c17_report["seconds"] < 60 + 30  # the row's 60 s, plus the fresh master's start


@pytest.mark.fault("C17")
def test_submit_rate_is_at_least_20k_per_second(c17_report):
    assert c17_report["submit_rate"] >= 20_000


@pytest.mark.fault("C17")
def test_buffered_map_over_an_endless_generator_keeps_memory_flat(c17_report):
    """G12: RSS after the first tenth of 10^6 items stays within +-10 % (chunks of 10)."""
    samples = c17_report["rss_samples"][2:]  # past the warm-up
    reference = samples[0]
    assert all(abs(s - reference) <= 0.10 * reference for s in samples), samples


# --------------------------------------------------------------------------------------------
# C10 / G4: the chaos soak
# --------------------------------------------------------------------------------------------
ITEMS = 10_000
MEAN_LIFETIME = 2.0
SOAK_BUDGET = 90.0
INITIAL_WORKERS = 4


def _soak_item(log, x: int) -> int:
    log.put((x, distexec.myid()))
    time.sleep(0.02)  # 10,000 items on 4 workers: about the row's 60 s of chaos
    return 3 * x + 1


class _Chaos:
    """Kills a random worker at Poisson times (each lives ~``MEAN_LIFETIME`` s) and adds a
    replacement after each kill, until stopped."""

    def __init__(self, add_workers, pids: list[int], seed: int):
        self.add_workers = add_workers
        self.live = list(pids)
        self.added: list[int] = []
        self.kills = 0
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="chaos")
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stop.wait(self.rng.expovariate(len(self.live) / MEAN_LIFETIME)):
                victim = self.live.pop(self.rng.randrange(len(self.live)))
                os.kill(default_context().record(victim).os_pid, signal.SIGKILL)
                self.kills += 1
                (new,) = self.add_workers(1)
                self.added.append(new)
                self.live.append(new)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive(), "the chaos thread did not stop"


@pytest.mark.fault("C10")
def test_chaos_soak_pmap_with_retries_gives_exactly_the_sequential_result(no_workers,
                                                                          add_workers):
    pool = distexec.default_worker_pool()  # replacement workers join it
    pids = add_workers(INITIAL_WORKERS)
    log = new_log()
    chaos = _Chaos(add_workers, pids, seed=10)
    began = time.monotonic()
    try:
        output = pmap(lambda x: _soak_item(log, x), range(ITEMS), pool=pool,
                      retry_delays=ExponentialBackOff(n=10, first_delay=0.05, max_delay=1.0))
    finally:
        chaos.finish()
    seconds = time.monotonic() - began
    executions = drain(log)
    assert chaos.error is None, repr(chaos.error)
    assert output == [3 * x + 1 for x in range(ITEMS)]  # each item once, in order, right
    ran = sorted({x for x, _ in executions})
    assert ran == list(range(ITEMS))
    reexecuted = len(executions) - ITEMS
    on_replacements = sum(1 for _, pid in executions if pid in chaos.added)
    print(f"\nC10: {ITEMS} items in {seconds:.1f} s with {chaos.kills} workers killed and "
          f"replaced; {reexecuted} re-executions (at-least-once), {on_replacements} executions "
          "on replacement workers")
    assert seconds < SOAK_BUDGET
    assert chaos.kills >= 10  # the soak really was chaotic
    assert on_replacements > 0  # the pool picked up the new workers
    assert set(chaos.live) <= set(pool.workers())
