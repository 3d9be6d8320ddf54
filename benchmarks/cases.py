"""The benchmark cases. Each runs in a fresh subprocess (``benchmarks.child``).

A case is ``fn(backend_name, cfg) -> (metrics, info)``: ``metrics`` are the numbers the table
shows (name -> float; see ``METRICS`` for units and direction), ``info`` says how they were
taken (sizes, counts). Every loop is bounded in time: sizes come from issue 6, and a case
whose backend is too slow for them within ``cfg.budget`` seconds measures fewer items
(after a pilot run that estimates the rate) and says so in ``info``.
"""

from __future__ import annotations

import functools
import statistics
import sys
import time
from dataclasses import dataclass

from . import tasks
from .backends import NWORKERS, open_backend
from .cpu_use import CpuMeter, worker_pids

MiB = 1 << 20


@dataclass(frozen=True)
class Config:
    quick: bool = False
    workers: int = NWORKERS  # the scale case only: the others always run two

    @property
    def budget(self) -> float:
        """Seconds one measured loop may take (roughly)."""
        return 0.5 if self.quick else 2.0


# metric -> (unit, higher_is_better, scale for display, format)
METRICS = {
    "startup_s": ("s", False, 1.0, "{:.3f}"),
    "latency_us": ("µs", False, 1.0, "{:.0f}"),
    "latency_p99_us": ("µs", False, 1.0, "{:.0f}"),
    "latency_master_cpu_us": ("µs", False, 1.0, "{:.0f}"),
    "latency_worker_cpu_us": ("µs", False, 1.0, "{:.0f}"),
    "submit_per_s": ("k/s", True, 1e-3, "{:.1f}"),
    "submit_master_cpu_us": ("µs", False, 1.0, "{:.0f}"),
    "submit_worker_cpu_us": ("µs", False, 1.0, "{:.0f}"),
    "latency_script_us": ("µs", False, 1.0, "{:.0f}"),
    "latency_script_p99_us": ("µs", False, 1.0, "{:.0f}"),
    "latency_script_master_cpu_us": ("µs", False, 1.0, "{:.0f}"),
    "latency_script_worker_cpu_us": ("µs", False, 1.0, "{:.0f}"),
    "submit_script_per_s": ("k/s", True, 1e-3, "{:.1f}"),
    "submit_script_master_cpu_us": ("µs", False, 1.0, "{:.0f}"),
    "submit_script_worker_cpu_us": ("µs", False, 1.0, "{:.0f}"),
    "map1_per_s": ("k items/s", True, 1e-3, "{:.1f}"),
    "map100_per_s": ("k items/s", True, 1e-3, "{:.0f}"),
    "map1000_per_s": ("k items/s", True, 1e-3, "{:.0f}"),
    "bandwidth_MBps": ("MB/s", True, 1.0, "{:.0f}"),
    "bandwidth_socket_MBps": ("MB/s", True, 1.0, "{:.0f}"),
    "sleep_efficiency": ("", True, 1.0, "{:.3f}"),
    "cpu_efficiency": ("", True, 1.0, "{:.3f}"),
    "cpu_master_cpu_us": ("µs", False, 1.0, "{:.0f}"),
    "cpu_worker_cpu_us": ("µs", False, 1.0, "{:.0f}"),
    "closure_s": ("s", False, 1.0, "{:.2f}"),
    "closure_cached_pmap_s": ("s", False, 1.0, "{:.3f}"),
    "closure_cached_fetch_s": ("s", False, 1.0, "{:.3f}"),
    "remotecall_fetch_us": ("µs", False, 1.0, "{:.0f}"),
    "remotecall_fetch_p99_us": ("µs", False, 1.0, "{:.0f}"),
    "pingpong_us": ("µs", False, 1.0, "{:.0f}"),
    "pingpong_p99_us": ("µs", False, 1.0, "{:.0f}"),
    "pingpong_unix_us": ("µs", False, 1.0, "{:.0f}"),
    "pingpong_unix_p99_us": ("µs", False, 1.0, "{:.0f}"),
    "tcp_MBps": ("MB/s", True, 1.0, "{:.0f}"),
    "memcpy_MBps": ("MB/s", True, 1.0, "{:.0f}"),
    "joblib_call_ms": ("ms", False, 1.0, "{:.1f}"),
    "sklearn_cv_ms": ("ms", False, 1.0, "{:.0f}"),
}


# -- helpers ---------------------------------------------------------------------------------
def percentile(samples, q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def timed_calls(call, budget: float, n_max: int, n_min: int = 50, warmup: int = 20) -> list:
    """Seconds per sequential ``call()``: up to ``n_max`` calls or ``budget`` seconds."""
    for _ in range(warmup):
        call()
    samples = []
    clock = time.perf_counter
    deadline = clock() + budget
    while len(samples) < n_max and (len(samples) < n_min or clock() < deadline):
        t0 = clock()
        call()
        samples.append(clock() - t0)
    return samples


def sized(run, n_full: int, n_pilot: int, budget: float, step: int = 1):
    """Run ``run(n)`` (returns seconds) for ``n_full`` items, or fewer if that exceeds budget.

    A pilot of ``n_pilot`` items (also the warm-up) estimates the rate. Returns (n, seconds).
    """
    n_pilot = min(n_pilot, n_full)
    rate = n_pilot / run(n_pilot)
    n = min(n_full, max(n_pilot, int(rate * budget)))
    n = max(step, n // step * step)
    return n, run(n)


def warm_up(backend) -> None:
    """Make sure both workers exist and have run something (lazy pools spawn on demand)."""
    for f in [backend.submit(tasks.sleep, 0.05) for _ in range(4)]:
        f.result()


def with_backend(fn):
    """Open the backend (not timed), warm it up, run the case, close it."""
    @functools.wraps(fn)
    def case(name: str, cfg: Config):
        backend = open_backend(name)
        try:
            warm_up(backend)
            return fn(backend, cfg)
        finally:
            backend.close()
    return case


# -- cases -----------------------------------------------------------------------------------
def startup(name: str, cfg: Config):
    """Construct the executor -> first result (imports done before the clock starts)."""
    from .child import preimport
    import_s = preimport(name)
    t0 = time.perf_counter()
    backend = open_backend(name)
    backend.submit(tasks.noop).result()
    elapsed = time.perf_counter() - t0
    info = {"import_s": round(import_s, 4), **backend.versions()}
    backend.close()
    return {"startup_s": elapsed}, info


def _latency_case(task, prefix: str):
    @with_backend
    def case(backend, cfg: Config):
        meter = CpuMeter(worker_pids(backend.submit, NWORKERS))
        call = lambda: backend.submit(task()).result()  # noqa: E731
        for _ in range(20):
            call()
        meter.start()
        samples = timed_calls(call, cfg.budget, n_max=2000 if cfg.quick else 10000, warmup=0)
        cpu = meter.stop(len(samples))
        return ({f"{prefix}_us": statistics.median(samples) * 1e6,
                 f"{prefix}_p99_us": percentile(samples, 0.99) * 1e6,
                 f"{prefix}_master_cpu_us": cpu["master"],
                 f"{prefix}_worker_cpu_us": cpu["worker"]},
                {"calls": len(samples)})
    return case


def _submit_case(task, prefix: str):
    @with_backend
    def case(backend, cfg: Config):
        fn = task()

        def run(n):
            t0 = time.perf_counter()
            futures = [backend.submit(fn) for _ in range(n)]
            for f in futures:
                f.result()
            return time.perf_counter() - t0

        meter = CpuMeter(worker_pids(backend.submit, NWORKERS))
        n, _ = sized(run, 5000 if cfg.quick else 20000, 1000, cfg.budget)
        meter.start()
        seconds = run(n)
        cpu = meter.stop(n)
        return ({f"{prefix}_per_s": n / seconds, f"{prefix}_master_cpu_us": cpu["master"],
                 f"{prefix}_worker_cpu_us": cpu["worker"]},
                {"submits": n, "seconds": round(seconds, 3)})
    return case


def _importable_noop():
    return tasks.noop


def _script_noop():
    """The noop of the script that runs (``benchmarks/child.py`` as ``__main__``), as most
    users' functions are: backends that cannot name it on a worker ship it by value."""
    return sys.modules["__main__"].script_noop


latency = _latency_case(_importable_noop, "latency")
latency.__doc__ = """Sequential ``submit(noop).result()``; and the CPU each call costs the master
and the worker (``cpu_use``)."""
latency_script = _latency_case(_script_noop, "latency_script")
latency_script.__doc__ = "``latency`` with a noop defined in the script (``__main__``)."
submit = _submit_case(_importable_noop, "submit")
submit.__doc__ = "``n`` submits of noop, then every result."
submit_script = _submit_case(_script_noop, "submit_script")
submit_script.__doc__ = "``submit`` with a noop defined in the script (``__main__``)."


def _map_case(chunksize: int):
    @with_backend
    def case(backend, cfg: Config):
        def run(n):
            t0 = time.perf_counter()
            count = last = 0
            for last in backend.map(tasks.inc, range(n), chunksize):
                count += 1
            elapsed = time.perf_counter() - t0
            assert count == n and last == n, (count, last, n)
            return elapsed

        n_full = 50_000 if cfg.quick else 200_000
        n, seconds = sized(run, n_full, max(1000, 20 * chunksize), cfg.budget, step=chunksize)
        return ({f"map{chunksize}_per_s": n / seconds},
                {"items": n, "chunksize": chunksize, "seconds": round(seconds, 3)})
    case.__name__ = case.__qualname__ = f"map{chunksize}"
    case.__doc__ = f"``map(inc, range(n), chunksize={chunksize})``, every result consumed."
    return case


map1, map100, map1000 = _map_case(1), _map_case(100), _map_case(1000)


def bandwidth_socket(name: str, cfg: Config):
    """``bandwidth`` with ``DISTEXEC_SHM=0``: the array through the socket both ways (local
    workers otherwise take shared memory; docs/performance.md)."""
    import os
    os.environ["DISTEXEC_SHM"] = "0"  # this child process and the workers it starts
    metrics, info = bandwidth(name, cfg)
    return {"bandwidth_socket_MBps": metrics["bandwidth_MBps"]}, info


@with_backend
def bandwidth(backend, cfg: Config):
    """A 64 MiB float64 array to a worker and back (``echo``); MB/s = 2 × 64 MiB / round trip."""
    import numpy as np
    array = np.random.default_rng(0).random(64 * MiB // 8)
    backend.submit(tasks.echo, array).result()  # warm-up: the worker imports numpy
    rounds = []
    deadline = time.perf_counter() + cfg.budget
    while len(rounds) < (3 if cfg.quick else 7) and (len(rounds) < 2
                                                      or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        out = backend.submit(tasks.echo, array).result()
        rounds.append(time.perf_counter() - t0)
        assert out.shape == array.shape and out[-1] == array[-1]
        del out
    rtt = statistics.median(rounds)
    return {"bandwidth_MBps": 2 * array.nbytes / rtt / 1e6}, {"rounds": len(rounds),
                                                              "rtt_s": round(rtt, 4)}


@with_backend
def sleep(backend, cfg: Config):
    """200 tasks of ``time.sleep(0.01)`` on 2 workers: ideal 1.0 s / measured."""
    return _efficiency(backend, tasks.sleep, "sleep_efficiency")


@with_backend
def cpu(backend, cfg: Config):
    """Like ``sleep`` with 10 ms of CPU work per task (thread CPU time): ideal 1.0 s / measured.

    Not in issue 6; added because a backend that runs two tasks at once on one worker
    (threads) scores above 1 on ``sleep`` without being faster on real work.
    """
    meter = CpuMeter(worker_pids(backend.submit, NWORKERS))
    meter.start()
    metrics, info = _efficiency(backend, tasks.spin, "cpu_efficiency")
    # what the backend adds to the 10 ms of each task, on the master and on the workers
    cpu = meter.stop(EFFICIENCY_TASKS, work_s=EFFICIENCY_TASK_S)
    return {**metrics, "cpu_master_cpu_us": cpu["master"],
            "cpu_worker_cpu_us": cpu["worker"]}, info


EFFICIENCY_TASKS, EFFICIENCY_TASK_S = 200, 0.01


def _efficiency(backend, task, metric: str):
    """200 tasks of 10 ms on 2 workers: the ideal 1.0 s / the time they took."""
    ntasks, seconds = EFFICIENCY_TASKS, EFFICIENCY_TASK_S
    t0 = time.perf_counter()
    for f in [backend.submit(task, seconds) for _ in range(ntasks)]:
        f.result()
    elapsed = time.perf_counter() - t0
    ideal = ntasks * seconds / 2
    return {metric: ideal / elapsed}, {"seconds": round(elapsed, 4)}


def _closure_data():
    import numpy as np
    return np.random.default_rng(1).integers(0, 255, 10 * MiB, dtype=np.uint8)


@with_backend
def closure(backend, cfg: Config):
    """One lambda capturing a 10 MiB array, called 100 times (all submitted, then gathered).

    ProcessPoolExecutor cannot pickle a lambda: it gets ``functools.partial`` of a module
    function with the same array, the same bytes on the wire.
    """
    data = _closure_data()
    if backend.ships_lambdas:
        fn = lambda: data.nbytes  # noqa: E731  (the point: a closure, pickled by value)
    else:
        fn = functools.partial(tasks.nbytes_plus, data)
    calls = 25 if cfg.quick else 100
    t0 = time.perf_counter()
    for f in [backend.submit(fn) for _ in range(calls)]:
        assert f.result() == data.nbytes
    elapsed = time.perf_counter() - t0
    return {"closure_s": elapsed * 100 / calls}, {"calls": calls, "seconds": round(elapsed, 3)}


@with_backend
def closure_cached(backend, cfg: Config):
    """distexec only: the closure case through ``CachingPool`` (pmap, and remotecall_fetch)."""
    import distexec
    data = _closure_data()
    calls = 100  # cheap once cached; the first call per worker ships the array

    fn = lambda x: data.nbytes + x  # noqa: E731
    pool = distexec.CachingPool(backend.workers())
    t0 = time.perf_counter()
    out = distexec.pmap(fn, range(calls), pool=pool)
    pmap_s = time.perf_counter() - t0
    assert out == [data.nbytes + x for x in range(calls)]
    pool.clear()

    fn2 = lambda: data.nbytes  # noqa: E731
    pool = distexec.CachingPool(backend.workers())
    t0 = time.perf_counter()
    for _ in range(calls):
        assert distexec.remotecall_fetch(fn2, pool) == data.nbytes
    fetch_s = time.perf_counter() - t0
    pool.clear()
    return ({"closure_cached_pmap_s": pmap_s, "closure_cached_fetch_s": fetch_s},
            {"calls": calls})


def remotecall(name: str, cfg: Config):
    """distexec only, Julia style: ``addprocs(2)``, then ``remotecall_fetch(noop, 2)``."""
    import distexec
    pids = distexec.addprocs(2)
    try:
        pid = pids[0]
        samples = timed_calls(lambda: distexec.remotecall_fetch(tasks.noop, pid), cfg.budget,
                              n_max=2000 if cfg.quick else 10000)
    finally:
        distexec.rmprocs(pids)
    return ({"remotecall_fetch_us": statistics.median(samples) * 1e6,
             "remotecall_fetch_p99_us": percentile(samples, 0.99) * 1e6},
            {"calls": len(samples)})


def joblib_call(name: str, cfg: Config):
    """joblib's ``Parallel(n_jobs=2, backend=name)`` over 8 tiny tasks, a new call each time.

    The median call after warm-up: what a library that calls ``Parallel`` per operation pays.
    The backends here are joblib's (``"loky"``, ``"distexec"``), not the executors above.
    """
    from joblib import Parallel, delayed

    def call():
        out = Parallel(n_jobs=2, backend=name)(delayed(tasks.inc)(i) for i in range(8))
        assert out == list(range(1, 9)), out

    samples = timed_calls(call, cfg.budget, n_max=300 if cfg.quick else 1000, n_min=20,
                          warmup=5)
    return ({"joblib_call_ms": statistics.median(samples) * 1e3},
            {"calls": len(samples), "tasks_per_call": 8})


SKLEARN_MISSING = "scikit-learn is not installed (pip install -e '.[bench]')"


def sklearn_cv(name: str, cfg: Config):
    """scikit-learn's ``cross_val_score(n_jobs=2)``: logistic regression, iris, 5 folds,
    inside ``parallel_config(backend=name)``; the median call after warm-up."""
    try:
        from sklearn.datasets import load_iris
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import cross_val_score
    except ImportError:
        return {}, {"skipped": SKLEARN_MISSING}
    from joblib import parallel_config

    X, y = load_iris(return_X_y=True)

    def call():
        scores = cross_val_score(LogisticRegression(max_iter=1000), X, y, cv=5, n_jobs=2)
        assert len(scores) == 5 and scores.min() > 0.8, scores

    with parallel_config(backend=name):
        samples = timed_calls(call, cfg.budget * 2, n_max=100 if cfg.quick else 400,
                              n_min=10 if cfg.quick else 20, warmup=3)
    return ({"sklearn_cv_ms": statistics.median(samples) * 1e3},
            {"calls": len(samples), "folds": 5})


def pingpong(name: str, cfg: Config):
    from . import limits
    return limits.pingpong(cfg)


def tcp(name: str, cfg: Config):
    from . import limits
    return limits.tcp_transfer(cfg)


def memcpy(name: str, cfg: Config):
    from . import limits
    return limits.memcpy(cfg)


def scale(name: str, cfg: Config):
    """Many workers on few cores, at ``cfg.workers`` workers: ``benchmarks/scale.py``."""
    from .scale import scale as run
    return run(name, cfg)


PEERS = ("distexec", "pp-fork", "pp-forkserver", "loky", "dask")

#: cases run once per worker count of ``run.py --workers``; their metrics are keyed "name@N"
#: and shown in a table of their own (``scale.scale_table``)
PER_WORKER_COUNT = ("scale",)

#: case -> the metrics it reports
CASE_METRICS = {
    "startup": ("startup_s",),
    "latency": ("latency_us", "latency_p99_us", "latency_master_cpu_us",
                "latency_worker_cpu_us"),
    "submit": ("submit_per_s", "submit_master_cpu_us", "submit_worker_cpu_us"),
    "latency_script": ("latency_script_us", "latency_script_p99_us",
                       "latency_script_master_cpu_us", "latency_script_worker_cpu_us"),
    "submit_script": ("submit_script_per_s", "submit_script_master_cpu_us",
                      "submit_script_worker_cpu_us"),
    "map1": ("map1_per_s",),
    "map100": ("map100_per_s",),
    "map1000": ("map1000_per_s",),
    "bandwidth": ("bandwidth_MBps",),
    "bandwidth_socket": ("bandwidth_socket_MBps",),
    "sleep": ("sleep_efficiency",),
    "cpu": ("cpu_efficiency", "cpu_master_cpu_us", "cpu_worker_cpu_us"),
    "closure": ("closure_s",),
    "closure_cached": ("closure_cached_pmap_s", "closure_cached_fetch_s"),
    "remotecall": ("remotecall_fetch_us", "remotecall_fetch_p99_us"),
    "pingpong": ("pingpong_us", "pingpong_p99_us", "pingpong_unix_us", "pingpong_unix_p99_us"),
    "tcp": ("tcp_MBps",),
    "memcpy": ("memcpy_MBps",),
    "joblib_call": ("joblib_call_ms",),
    "sklearn_cv": ("sklearn_cv_ms",),
    "scale": (),
}

#: case -> (function, backends it runs on), in table order
CASES = {
    "startup": (startup, PEERS),
    "latency": (latency, PEERS),
    "submit": (submit, PEERS),
    "latency_script": (latency_script, PEERS),
    "submit_script": (submit_script, PEERS),
    "map1": (map1, PEERS),
    "map100": (map100, PEERS),
    "map1000": (map1000, PEERS),
    "bandwidth": (bandwidth, PEERS),
    "bandwidth_socket": (bandwidth_socket, ("distexec",)),
    "sleep": (sleep, PEERS),
    "cpu": (cpu, PEERS),
    "closure": (closure, PEERS),
    "closure_cached": (closure_cached, ("distexec",)),
    "remotecall": (remotecall, ("distexec",)),
    "pingpong": (pingpong, ("machine",)),
    "tcp": (tcp, ("machine",)),
    "memcpy": (memcpy, ("machine",)),
    "joblib_call": (joblib_call, ("distexec", "loky")),
    "sklearn_cv": (sklearn_cv, ("distexec", "loky")),
    "scale": (scale, PEERS),
}
