"""Many workers on few cores: the ``scale`` case, run at each of ``--workers 8,32,128``.

One run per (backend, worker count), in a fresh process like every case. It starts the
backend with N workers and measures, in this order:

- start: construct the executor -> every one of the N workers has run a task (lazy pools
  start workers on demand, so each must have answered); distexec's ``addprocs`` part is in
  the run's info as ``construct_s``;
- memory: the PSS (``/proc/PID/smaps_rollup``) of every process the backend started (workers,
  and whatever else it runs: dask's nannies, loky's resource tracker), divided by N;
- idle: CPU of the master and of all those processes over 10 s with nothing to do (1 s with
  ``--quick``), as a percentage of one core;
- ``map(inc, range(n))`` (chunksize 1), up to 100,000 items, fewer when the backend would
  take longer than the budget (the rate is what is compared); and ``map(sleep, [0.01] *
  2000)``: efficiency = ideal time (2000 × 10 ms / N) / measured;
- distexec only: ``pmap`` of the same two (``distexec.pmap``; peers have no pmap).

The rows read "what the master pays as workers are added": on 2 cores, 128 workers are 64
processes per core, so a backend whose master does per-worker work per task, or whose idle
workers wake up, shows it here. ``benchmarks/run.py`` prints the table (``scale_table``).
"""

from __future__ import annotations

import os
import time

from . import tasks
from .backends import open_backend
from .cases import sized
from .cpu_use import CpuMeter, process_cpu_seconds, worker_pids

WORKER_COUNTS = (8, 32, 128)
QUICK_WORKER_COUNTS = (8,)
TINY_ITEMS = 100_000
SLEEPS, SLEEP_S = 2000, 0.01

# metric -> (unit, higher_is_better, format, label); keyed "metric@N" in results
METRICS = {
    "start_s": ("s", False, "{:.2f}", "start N workers: construct → each has run a task"),
    "pss_mib": ("MiB", False, "{:.1f}", "memory per worker: PSS of the backend's processes / N"),
    "idle_master_pct": ("% core", False, "{:.2f}", "master CPU while idle"),
    "idle_workers_pct": ("% core", False, "{:.2f}", "all workers' CPU while idle"),
    "map_tiny_per_s": ("k items/s", True, "{:.1f}", "map(inc), chunksize 1, ≤ 100,000 items"),
    "map_tiny_master_cpu_us": ("µs", False, "{:.0f}", "map(inc): master CPU per item"),
    "map_sleep_efficiency": ("", True, "{:.3f}", "map: 2,000 × 10 ms sleeps, ideal/measured"),
    "pmap_tiny_per_s": ("k items/s", True, "{:.1f}", "pmap(inc), ≤ 100,000 items"),
    "pmap_tiny_master_cpu_us": ("µs", False, "{:.0f}", "pmap(inc): master CPU per item"),
    "pmap_sleep_efficiency": ("", True, "{:.3f}", "pmap: 2,000 × 10 ms sleeps, ideal/measured"),
}
SCALES = {"map_tiny_per_s": 1e-3, "pmap_tiny_per_s": 1e-3}
DISTEXEC_ONLY = ("pmap_tiny_per_s", "pmap_tiny_master_cpu_us", "pmap_sleep_efficiency")


def scale(name: str, cfg):
    """The scale case at ``cfg.workers`` workers (see the module docstring)."""
    n = cfg.workers
    budget = 1.0 if cfg.quick else 4.0
    t0 = time.perf_counter()
    backend = open_backend(name, n)
    construct_s = time.perf_counter() - t0
    try:
        pids = worker_pids(backend.submit, n, deadline_s=60.0)
        start_s = time.perf_counter() - t0
        info = {"workers": n, "answered": len(pids), "construct_s": round(construct_s, 3)}
        metrics = {"start_s": start_s}
        processes = descendants(os.getpid())
        metrics["pss_mib"] = sum(map(pss_kib, processes)) / 1024 / n
        info["processes"] = len(processes)
        metrics.update(_idle(processes, 1.0 if cfg.quick else IDLE_S))
        meter = CpuMeter([])
        metrics.update(_tiny(lambda k: _consume(backend.map(tasks.inc, range(k), 1), k),
                             "map", meter, budget, info))
        metrics["map_sleep_efficiency"] = _sleeps(
            lambda: _consume(backend.map(tasks.sleep, [SLEEP_S] * SLEEPS, 1), SLEEPS), n)
        if name == "distexec":
            import distexec
            metrics.update(_tiny(lambda k: _consume(distexec.pmap(tasks.inc, range(k)), k),
                                 "pmap", meter, budget, info))
            metrics["pmap_sleep_efficiency"] = _sleeps(
                lambda: _consume(distexec.pmap(tasks.sleep, [SLEEP_S] * SLEEPS), SLEEPS), n)
    finally:
        backend.close()
    return metrics, info


# Long enough to hold one of distexec's heartbeats (every 10 s): a shorter window can miss
# them, and report less than an idle cluster takes.
IDLE_S = 10.0


def _idle(processes: list[int], seconds: float) -> dict:
    master = os.getpid()
    others = [p for p in processes if p != master]
    before = process_cpu_seconds(master), sum(map(process_cpu_seconds, others))
    time.sleep(seconds)
    after = process_cpu_seconds(master), sum(map(process_cpu_seconds, others))
    return {"idle_master_pct": (after[0] - before[0]) / seconds * 100,
            "idle_workers_pct": (after[1] - before[1]) / seconds * 100}


def _tiny(run_n, prefix: str, meter: CpuMeter, budget: float, info: dict) -> dict:
    def run(k):
        t = time.perf_counter()
        run_n(k)
        return time.perf_counter() - t

    # the pilot (2,000 items) sizes the measured run; the master's CPU counts the latter
    rate = 2000 / run(2000)
    k = min(TINY_ITEMS, max(2000, int(rate * budget)))
    meter.start()
    seconds = run(k)
    cpu = meter.stop(k)
    info[f"{prefix}_items"], info[f"{prefix}_seconds"] = k, round(seconds, 3)
    return {f"{prefix}_tiny_per_s": k / seconds, f"{prefix}_tiny_master_cpu_us": cpu["master"]}


def _sleeps(run, n: int) -> float:
    t = time.perf_counter()
    run()
    return SLEEPS * SLEEP_S / n / (time.perf_counter() - t)


def _consume(results, k: int) -> None:
    count = 0
    for _ in results:
        count += 1
    assert count == k, (count, k)


# -- processes ---------------------------------------------------------------------------------
def descendants(root: int) -> list[int]:
    """Every live process below ``root`` (children, their children...), from ``/proc``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def pss_kib(pid: int) -> int:
    """Proportional set size of ``pid`` in KiB (0 if it is gone): its private pages, and its
    share of the pages it shares with other processes (a forked parent's, libraries)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


# -- the table -----------------------------------------------------------------------------------
def scale_table(med: dict, errs: dict, backends: list[str], labels: dict,
                counts: list[int]) -> str | None:
    """Rows (metric, N), columns backends; each peer's value / distexec's in parentheses."""
    cols = [b for b in backends if any(k[1] == b for k in med) or any(
        k[1] == b for k in errs)]
    if not cols:
        return None
    head = ["case", "unit", "workers", *(labels[c] for c in cols)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for metric, (unit, higher, form, label) in METRICS.items():
        for n in counts:
            key = f"{metric}@{n}"
            if not any((key, c) in med for c in cols):
                continue
            base = med.get((key, "distexec"))
            cells = [label, f"{unit} {'↑' if higher else '↓'}".strip(), str(n)]
            for c in cols:
                v = med.get((key, c))
                if v is None:
                    failed = (f"scale@{n}", c) in errs and (
                        c == "distexec" or metric not in DISTEXEC_ONLY)
                    cells.append("error" if failed else "")
                    continue
                shown = form.format(v * SCALES.get(metric, 1.0))
                if c != "distexec" and base:
                    shown += f" ({v / base:.2f}×)"
                cells.append(shown)
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else None  # None: the scale case did not run
